"""Pictures of balancing: per output, the raw stream's histogram next to what the balancer emitted.

The seed judged its balancing v1/v2/v3 by exactly this picture; here it is made on request
(``charles balance-plot``), for the viewer (:func:`histogram_png`), and from any label stream, live or
recorded, or from a running balancer's own counts (``--from URL``: its ``/histogram.json``). The same
counts go to Prometheus (:mod:`charles.balancer.metrics`) for Grafana.

Figures are built on matplotlib's Agg canvas without pyplot, so drawing in a service thread never
touches a GUI or pyplot's global state.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from charles.balancer.balancer import Balancer, BalancerStats, run_stream
from charles.balancer.synthetic import RATE_HZ, load_labels, samples_from_labels, synthetic_labels, times
from charles.cli import help_text
from charles.sections.balancer import BalancerConfig

RAW_COLOUR = "#8c8c8c"
EMITTED_COLOUR = "#1f77b4"
CROSS_COLOUR = "#2ca02c"
LIVE_PATH = "/histogram.json"
"""Where a running balancer serves its counts (next to ``/histogram.png`` on its HTTP port)."""


@dataclass
class OutputHistogram:
    """The counts one row of the picture shows."""

    name: str
    bin_labels: list[str]
    raw: np.ndarray
    """The raw stream: arrivals per bin."""
    emitted: np.ndarray
    """Samples emitted in the sets that balance this output, per bin of this output."""
    cross: np.ndarray | None = None
    """v3/v4: this output's bins among the samples of the *other* outputs' sets (sub-balancing shows here)."""
    balanced_by: str = ""
    """The group whose sets ``emitted`` counts: the output itself, or the joint group in v1."""


Plottable = BalancerStats | Balancer | Sequence[OutputHistogram] | Mapping[str, Mapping]


def histograms(source: Plottable) -> tuple[list[OutputHistogram], str]:
    """Normalise what :func:`plot_histograms` accepts into rows and a title.

    A mapping is ``{output: {"bins": [...], "raw": [...], "emitted": [...], "cross": [...]?}}``, for
    counts that come from elsewhere (a metrics scrape, a recording).
    """
    if isinstance(source, Balancer):
        source = source.stats()
    if isinstance(source, BalancerStats):
        rows = []
        for name in source.outputs:
            own = source.balanced_group(name)
            others = [g for g in source.groups.values() if name not in g.outputs]
            cross = None
            if others and source.version in (3, 4):
                cross = np.sum([g.emitted[name] for g in others], axis=0)
            rows.append(
                OutputHistogram(
                    name, source.bin_labels[name], source.arrivals[name], own.emitted[name], cross, own.name
                )
            )
        sets = source.sets
        title = (
            f"Balancing v{source.version}: {source.arrived:,} samples in, "
            f"{sum(g.samples_emitted for g in source.groups.values()):,} emitted in "
            f"{sets['complete']:,} complete + {sets['flushed']:,} flushed sets"
        )
        return rows, title
    if isinstance(source, Mapping):
        rows = [
            OutputHistogram(
                name,
                [str(b) for b in d["bins"]],
                np.asarray(d["raw"], dtype=np.int64),
                np.asarray(d["emitted"], dtype=np.int64),
                None if d.get("cross") is None else np.asarray(d["cross"], dtype=np.int64),
            )
            for name, d in source.items()
        ]
        return rows, "Balancing"
    return list(source), "Balancing"


def _bars(ax: Axes, labels: list[str], counts: np.ndarray, colour: str, title: str) -> None:
    x = np.arange(len(labels))
    total = int(counts.sum())
    share = counts / total if total else counts.astype(float)
    # exact-value bins (no parenthesis) are hatched: "exactly 0" and "exactly full" are what a raw
    # stream is made of, and the reader should see them apart from the ranges around them
    bars = ax.bar(x, share, color=colour, width=0.85)
    for bar, label in zip(bars, labels, strict=True):
        if not label.startswith("("):
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    if len(labels):
        ax.axhline(1.0 / len(labels), color="#d62728", lw=0.8, ls="--")  # a perfectly even histogram
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(f"{title} (n={total:,})", fontsize=8)
    top = max(float(share.max()) if len(share) else 0.0, 1.0 / max(len(labels), 1))
    ax.set_ylim(0.0, top * 1.12)


def figure(source: Plottable) -> Figure:
    """The picture: one row per output; raw stream, emitted, and (v3/v4) the output inside other sets."""
    rows, title = histograms(source)
    ncols = 3 if any(r.cross is not None for r in rows) else 2
    fig = Figure(figsize=(4.2 * ncols, 2.6 * max(len(rows), 1) + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(max(len(rows), 1), ncols, squeeze=False)
    for r, row in enumerate(rows):
        _bars(axes[r][0], row.bin_labels, row.raw, RAW_COLOUR, f"{row.name}: raw stream")
        group = row.balanced_by or row.name
        _bars(axes[r][1], row.bin_labels, row.emitted, EMITTED_COLOUR, f"{row.name}: emitted in {group} sets")
        axes[r][0].set_ylabel("share of samples", fontsize=7)
        if ncols == 3:
            if row.cross is not None:
                _bars(
                    axes[r][2],
                    row.bin_labels,
                    row.cross,
                    CROSS_COLOUR,
                    f"{row.name}: in the other outputs' sets",
                )
            else:
                axes[r][2].set_axis_off()
    fig.suptitle(title + "  (hatched: exact-value bins; dashed: even)", fontsize=9)
    return fig


def plot_histograms(stats_or_counts: Plottable, path: str | Path) -> Path:
    """Write the picture as PNG to ``path`` (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(histogram_png(stats_or_counts))
    return path


def histogram_png(stats_or_counts: Plottable) -> bytes:
    """The picture as PNG bytes, for the viewer."""
    buf = io.BytesIO()
    figure(stats_or_counts).savefig(buf, format="png")
    return buf.getvalue()


def fetch_stats(url: str, timeout_s: float = 5.0) -> BalancerStats:
    """A running balancer's counts as of its last refresh (about once a second), from its HTTP port."""
    if "://" not in url:
        url = "http://" + url
    url = url.rstrip("/")
    if not url.endswith(LIVE_PATH):
        url += LIVE_PATH
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            body = r.read()
    except urllib.error.HTTPError as e:
        raise OSError(f"{url} answered HTTP {e.code}: is this a balancer's HTTP port?") from None
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise OSError(f"cannot reach a balancer at {url}: {reason}") from None
    try:
        return BalancerStats.from_dict(json.loads(body))
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"{url} did not answer with a balancer's counts ({e!r})") from None


def _parse_kinds(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, kind = item.partition("=")
        if not sep:
            raise argparse.ArgumentTypeError(f"--kind wants output=kind, got {item!r}")
        out[name] = kind
    return out


def _run(args: argparse.Namespace) -> BalancerStats:
    """The command line's balancer over its label stream (recorded or synthetic)."""
    config = BalancerConfig(
        version=args.version,
        outputs=args.outputs,
        kinds=_parse_kinds(args.kind),
        cap_per_bin=args.cap,
        set_timeout_s=args.timeout,
        timeout_policy=args.policy,
    )
    labels = load_labels(args.labels) if args.labels else synthetic_labels(args.synthetic, args.seed)
    balancer = Balancer(config)
    samples = samples_from_labels(labels)
    run_stream(balancer, samples, times(len(samples), args.rate))
    return balancer.stats()


def main(argv: Sequence[str] | None = None) -> int:
    """``charles balance-plot``: run a label stream through a balancer, or ask a running one, and draw what it did."""
    defaults = BalancerConfig()
    p = argparse.ArgumentParser(prog="charles balance-plot", description=help_text(main.__doc__))
    p.add_argument("--out", default="balance.png", help="PNG to write")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--labels", help="recorded labels: .npy (N x 2) or CSV with steering,throttle_brake columns"
    )
    source.add_argument(
        "--from",
        dest="from_url",
        metavar="URL",
        help="a running balancer's HTTP address (http://host:port): draw its live counts; the balancing "
        "options below are then its own, not these",
    )
    p.add_argument("--synthetic", type=int, default=30_000, help="synthetic NPC samples when no --labels")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic stream")
    p.add_argument("--rate", type=float, default=RATE_HZ, help="arrival rate in Hz (timestamps for timeouts)")
    p.add_argument("--version", type=int, default=defaults.version, help="balancing version 1-4")
    p.add_argument("--outputs", default=",".join(defaults.outputs), help="comma-separated outputs")
    p.add_argument(
        "--kind", action="append", default=[], help="output=kind (regression, classification, delta)"
    )
    p.add_argument("--cap", type=int, default=defaults.cap_per_bin, help="samples held per bin")
    p.add_argument("--timeout", type=float, default=defaults.set_timeout_s, help="set timeout in seconds")
    p.add_argument(
        "--policy", default=defaults.timeout_policy, choices=("flush", "drop"), help="timeout policy"
    )
    args = p.parse_args(argv)

    try:
        stats = fetch_stats(args.from_url) if args.from_url else _run(args)
    except (ValueError, OSError, argparse.ArgumentTypeError) as e:
        print(f"balance-plot: {e}", file=sys.stderr)
        return 2
    path = plot_histograms(stats, args.out)
    summary = {
        "png": str(path),
        **({"from": args.from_url} if args.from_url else {}),
        "version": stats.version,
        "samples": stats.arrived,
        "sets": stats.sets,
        "emit_rate": round(stats.emit_rate, 4),
        "acceptance_rate": round(stats.acceptance_rate, 4),
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
