"""``python -m charles.topology``: print the facts of the deployment; ``--check`` also checks the files."""

from __future__ import annotations

import argparse
import sys

from charles import topology
from charles.cli import help_text


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m charles.topology",
        description=help_text(topology.__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="also check the files (no external tools; `make validate` does all)",
    )
    args = ap.parse_args(argv)
    print(topology.render(), end="")
    if not args.check:
        return 0
    failed = 0
    for name, problems in topology.check_files().items():
        print(f"{'ok  ' if not problems else 'FAIL'}  {name}")
        for p in problems:
            print(f"        {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
