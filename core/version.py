"""Which code this is: the package version, and ``git describe`` of the checkout when it is one.

Checkpoints and training periods record ``code_version()``; ``charles --version`` prints both.
"""

from __future__ import annotations

import functools
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
"""The repository when this is a checkout (core/ is charles/)."""


def package_version() -> str:
    """The installed distribution's version (pyproject's), or "unknown" when it is not installed."""
    try:
        from importlib.metadata import PackageNotFoundError, version

        return version("charles")
    except PackageNotFoundError:
        return "unknown"


@functools.lru_cache(maxsize=1)
def git_describe() -> str | None:
    """``git describe --always --dirty --tags`` of the checkout; None when this is no checkout or no git."""
    if not (ROOT / ".git").exists():
        return None
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def code_version() -> str:
    """``git:<describe>`` of the source tree when it is a checkout, else ``charles==<version>``."""
    described = git_describe()
    if described:
        return f"git:{described}"
    v = package_version()
    return f"charles=={v}" if v != "unknown" else "unknown"
