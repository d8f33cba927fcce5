"""Benchmark conventions: ``python bench/<name>.py [--quick]``; the last stdout line is one JSON object."""

from __future__ import annotations

import argparse
import json
import sys


def args(description: str) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=description)
    ap.add_argument("--quick", action="store_true", help="finish in under 30 seconds (CI, make bench)")
    return ap.parse_args()


def report(figures: dict) -> None:
    """Print the figures as the last line of stdout."""
    sys.stdout.flush()
    print(json.dumps(figures), flush=True)
