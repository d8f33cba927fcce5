"""Only what pyproject.toml cannot say: the optional C part (the broker's counting proxy).

``optional=True``: where it does not compile (no C compiler, e.g. a Windows game PC), the install goes on
and the broker counts with a capture socket instead. The wire codec has no C of its own: msgspec parses
and validates every header (charles.proto.wire).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        # the broker's counting proxy: POSIX only (dlopen); elsewhere the broker counts with a capture socket
        Extension("charles.broker._countproxy", ["services/broker/_countproxy.c"], optional=True),
    ]
)
