"""Only what pyproject.toml cannot say: the optional C parts (the codec's fast path, the broker's proxy).

``optional=True``: where it does not compile (no C compiler, e.g. a Windows game PC), the install goes on
and ``charles.proto.codec`` runs the same checks in Python.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension("charles.proto._fastcodec", ["proto/_fastcodec.c"], optional=True),
        # the broker's counting proxy: POSIX only (dlopen); elsewhere the broker counts with a capture socket
        Extension("charles.broker._countproxy", ["services/broker/_countproxy.c"], optional=True),
    ]
)
