"""``charles dataset info|plot PATH``: what a recorded dataset holds, and how the balancer would see it.

    charles dataset info data/drive1                 # counts, sources, collectors, time span, labels (JSON)
    charles dataset plot data/drive1 --out d.png     # label histograms, raw vs balanced (balance-plot's picture)

It lives with the balancer because ``plot`` is the balancer's own picture (charles.balancer.plot) of the
dataset's labels run through a Balancer; reading the dataset is charles.dataset's (core).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from charles.balancer.balancer import Balancer
from charles.balancer.plot import plot_histograms
from charles.balancer.synthetic import RATE_HZ, times
from charles.cli import help_text
from charles.dataset import SkipCounter, samples, shards, summary
from charles.sections.balancer import BalancerConfig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="charles dataset", description=help_text(__doc__.split("\n\n")[0]))
    sub = p.add_subparsers(dest="what", required=True)
    info = sub.add_parser("info", help="counts, sources, collectors, time span, label summaries (JSON)")
    info.add_argument("path")
    plot = sub.add_parser("plot", help="label histograms of the dataset, raw and balanced, as PNG")
    plot.add_argument("path")
    plot.add_argument("--out", default="dataset.png", help="PNG to write")
    defaults = BalancerConfig()
    plot.add_argument("--version", type=int, default=defaults.version, help="balancing version 1-4")
    plot.add_argument("--cap", type=int, default=defaults.cap_per_bin, help="samples held per bin")
    plot.add_argument(
        "--rate", type=float, default=RATE_HZ, help="arrival rate in Hz (timestamps for timeouts)"
    )
    args = p.parse_args(argv)
    if not shards(args.path):
        print(f"charles dataset: no shard-*.tar in {args.path}", file=sys.stderr)
        return 2
    if args.what == "info":
        print(json.dumps(summary(args.path), indent=1))
        return 0
    skipped = SkipCounter()
    balancer = Balancer(BalancerConfig(version=args.version, cap_per_bin=args.cap))
    # one sample at a time, the sets dropped as made: memory is the balancer's bins, whatever the size
    for sample, now in zip(samples(args.path, skipped), times(2**62, args.rate), strict=False):
        balancer.add(sample, now)
    stats = balancer.stats()
    path = plot_histograms(stats, args.out)
    print(
        json.dumps(
            {
                "png": str(path),
                "samples": stats.arrived,
                "sets": stats.sets,
                "version": stats.version,
                "skipped": dict(skipped.counts),
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
