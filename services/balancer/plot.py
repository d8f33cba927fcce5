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
import math
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


YLIM_STEP = 0.05
"""Each panel's y axis ends on a multiple of this share: a live picture's axes (the costly part to draw)
stay put while its bars move, and only a bar outgrowing its axis redraws them (:class:`LivePicture`)."""


def _top(counts: np.ndarray, n_labels: int) -> float:
    """Where a panel's y axis ends: above its tallest share and the even line, on a :data:`YLIM_STEP`."""
    total = int(counts.sum())
    tallest = float(counts.max()) / total if total and len(counts) else 0.0
    top = max(tallest, 1.0 / max(n_labels, 1)) * 1.12
    return min(1.0 + YLIM_STEP, math.ceil(top / YLIM_STEP - 1e-9) * YLIM_STEP)


def _shares(counts: np.ndarray) -> np.ndarray:
    total = int(counts.sum())
    return counts / total if total else counts.astype(float)


def _panel_title(title: str, counts: np.ndarray) -> str:
    return f"{title} (n={int(counts.sum()):,})"


def _bars(ax: Axes, labels: list[str], counts: np.ndarray, colour: str, title: str, top: float) -> None:
    x = np.arange(len(labels))
    # exact-value bins (no parenthesis) are hatched: "exactly 0" and "exactly full" are what a raw
    # stream is made of, and the reader should see them apart from the ranges around them
    bars = ax.bar(x, _shares(counts), color=colour, width=0.85)
    for bar, label in zip(bars, labels, strict=True):
        if not label.startswith("("):
            bar.set_hatch("///")
            bar.set_edgecolor("white")
    if len(labels):
        ax.axhline(1.0 / len(labels), color="#d62728", lw=0.8, ls="--")  # a perfectly even histogram
    ax.set_xticks(x)
    ax.set_xticklabels(labels, rotation=90, fontsize=6)
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(_panel_title(title, counts), fontsize=8)
    ax.set_ylim(0.0, top)


@dataclass
class _Panel:
    """One panel of the picture: where it sits and what it shows."""

    row: int
    col: int
    labels: list[str]
    counts: np.ndarray
    colour: str
    title: str


def _layout(source: Plottable) -> tuple[list[_Panel], int, int, str]:
    """The picture's panels, its grid (rows, columns) and its title."""
    rows, title = histograms(source)
    ncols = 3 if any(r.cross is not None for r in rows) else 2
    panels = []
    for r, row in enumerate(rows):
        group = row.balanced_by or row.name
        panels.append(_Panel(r, 0, row.bin_labels, row.raw, RAW_COLOUR, f"{row.name}: raw stream"))
        panels.append(
            _Panel(r, 1, row.bin_labels, row.emitted, EMITTED_COLOUR, f"{row.name}: emitted in {group} sets")
        )
        if row.cross is not None:
            panels.append(
                _Panel(
                    r, 2, row.bin_labels, row.cross, CROSS_COLOUR, f"{row.name}: in the other outputs' sets"
                )
            )
    return panels, max(len(rows), 1), ncols, title + "  (hatched: exact-value bins; dashed: even)"


def _draw(
    panels: list[_Panel], nrows: int, ncols: int, title: str, tops: list[float] | None = None
) -> tuple[Figure, list[Axes]]:
    """A figure of these panels on an Agg canvas, each y axis ending at ``tops`` (default: :func:`_top`
    of its counts); returns it and each panel's axes, in panel order."""
    if tops is None:
        tops = [_top(p.counts, len(p.labels)) for p in panels]
    fig = Figure(figsize=(4.2 * ncols, 2.6 * nrows + 0.6), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(nrows, ncols, squeeze=False)
    for p, top in zip(panels, tops, strict=True):
        _bars(axes[p.row][p.col], p.labels, p.counts, p.colour, p.title, top)
    for r in range(nrows):
        axes[r][0].set_ylabel("share of samples", fontsize=7)
        for c in range(ncols):
            if not any(p.row == r and p.col == c for p in panels):
                axes[r][c].set_axis_off()
    fig.suptitle(title, fontsize=9)
    return fig, [axes[p.row][p.col] for p in panels]


def figure(source: Plottable) -> Figure:
    """The picture: one row per output; raw stream, emitted, and (v3/v4) the output inside other sets."""
    return _draw(*_layout(source))[0]


class LivePicture:
    """The picture of a running balancer, redrawn every few seconds at a fraction of :func:`figure`'s cost.

    Drawing the whole figure costs matplotlib 1-2.5 s of CPU (laying out and rendering some 200 tick
    labels), every ``balancer.picture_s``: on a 2-core box that is CPU taken from learning. Between
    pictures only the bars and the titles' counts change, so this keeps one figure, its axes rendered
    once into a background, and per picture restores the background and draws the bars, the even lines
    and the titles over it (blitting). The axes are drawn again only when the panels change, a bar
    outgrows its axis or the tallest bar fills less than half of it; in between a y axis may end higher
    than :func:`figure` would end it, otherwise the pixels are :func:`figure`'s.
    """

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._tops: list[float] = []
        self._fig: Figure | None = None
        self._axes: list[Axes] = []
        self._background = None
        self.full_draws = 0
        """How many times the axes were drawn from scratch (the rest were blits)."""

    def render(self, source: Plottable) -> np.ndarray:
        """The picture of ``source`` as an RGB uint8 array (H x W x 3)."""
        panels, nrows, ncols, title = _layout(source)
        key = (nrows, ncols, tuple((p.row, p.col, p.colour, tuple(p.labels)) for p in panels))
        need = [_top(p.counts, len(p.labels)) for p in panels]
        # an axis is kept while its bars fit and the tallest still fills over half of it
        if key != self._key or any(n > t or n < t / 2 for n, t in zip(need, self._tops, strict=True)):
            self._redraw(panels, nrows, ncols, title, need)
            self._key, self._tops = key, need
        fig = self._fig
        canvas = fig.canvas
        canvas.restore_region(self._background)
        for ax, p in zip(self._axes, panels, strict=True):
            for bar, h in zip(ax.patches, _shares(p.counts), strict=True):
                bar.set_height(h)
                ax.draw_artist(bar)
            for artist in (*ax.lines, *ax.spines.values()):  # over the bars, as figure() draws them
                ax.draw_artist(artist)
            ax.title.set_text(_panel_title(p.title, p.counts))
            ax.draw_artist(ax.title)
        fig._suptitle.set_text(title)
        fig.draw_artist(fig._suptitle)
        return np.asarray(canvas.buffer_rgba())[..., :3].copy()

    def _redraw(self, panels: list[_Panel], nrows: int, ncols: int, title: str, tops: list[float]) -> None:
        """A new figure, laid out and rendered once without what :meth:`render` draws over it."""
        fig, axes = _draw(panels, nrows, ncols, title, tops)
        moving = [fig._suptitle]
        for ax in axes:
            moving += [*ax.patches, *ax.lines, *ax.spines.values(), ax.title]
        for artist in moving:
            artist.set_animated(True)  # left out of canvas.draw(): the background is the axes alone
        fig.canvas.draw()  # constrained layout runs here, once per figure
        fig.set_layout_engine("none")  # the positions it found stay as they are
        self._background = fig.canvas.copy_from_bbox(fig.bbox)
        self._fig, self._axes = fig, axes
        self.full_draws += 1


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
