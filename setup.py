"""Only what pyproject.toml cannot say: the optional C fast path of the codec.

``optional=True``: where it does not compile (no C compiler, e.g. a Windows game PC), the install goes on
and ``charles.proto.codec`` runs the same checks in Python.
"""

from setuptools import Extension, setup

setup(ext_modules=[Extension("charles.proto._fastcodec", ["proto/_fastcodec.c"], optional=True)])
