"""``charles models``: the model lines, their runs, batch counters and training periods (the seed's model list).

charles models                 every line with runs, newest information from each run's manifest
charles models --line tiny     one line
charles models --presets       also the lines (presets) that have no runs yet
charles models --json          the same as JSON (scripts, the e2e bench)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from charles.cli import help_text
from charles.trainer.runs import RunDir, checkpoint_batches, list_lines, list_runs, runs_root


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(t))


def _duration(s: float) -> str:
    s = int(s)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def describe(run: RunDir) -> dict[str, Any]:
    """One run as plain data (what --json prints)."""
    m = run.manifest
    out: dict[str, Any] = {"run": run.name, "line": run.line, "version": run.version, "path": str(run.path)}
    if m is None:
        out["error"] = run.error or "no manifest"
        return out
    out.update(
        batch=m.batch,
        samples=m.samples,
        created=m.created,
        published_batch=m.published_batch,
        checkpoints=checkpoint_batches(run),
        weights=str(run.newest_weights()) if run.newest_weights() else None,
        periods=[
            {
                "start_batch": p.start_batch,
                "stop_batch": p.stop_batch,
                "started": p.started,
                "stopped": p.stopped,
                "open": p.open,
                "host": p.host,
                "code_version": p.code_version,
            }
            for p in m.periods
        ],
    )
    return out


def period_line(run: str, p: dict[str, Any], last: bool) -> str:
    """The seed's phrasing: "Started training tiny_v1 from scratch - Stopped training tiny_v1 at batch 10800"."""
    start = "from scratch" if p["start_batch"] == 0 else f"from batch {p['start_batch']:,}"
    if p["open"] and last:
        stop = f"training now, at batch {p['stop_batch']:,}"
    elif p["open"]:
        stop = f"died after batch {p['stop_batch']:,} (last checkpoint)"
    else:
        stop = f"stopped at batch {p['stop_batch']:,}"
    span = f"{_when(p['started'])}, {_duration(p['stopped'] - p['started'])}"
    return f"started {start}, {stop}  ({span})"


def render(runs: list[dict[str, Any]], about: dict[str, str] | None = None, all_lines: bool = False) -> str:
    """A readable table: one block per line, one row per run, its periods underneath. ``about`` gives a
    line's one-sentence description; ``all_lines`` also lists the lines in ``about`` that have no runs."""
    lines: list[str] = []
    by_line: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        by_line.setdefault(r["line"], []).append(r)
    names = sorted(set(by_line) | (set(about or {}) if all_lines else set()))
    if not names:
        return "no runs yet (the trainer makes them under $CHARLES_RUN_DIR, default runs/)\n"
    width = max([len(r["run"]) for r in runs] + [24])
    for line in names:
        text = (about or {}).get(line)
        lines.append(f"{line}" + (f" — {text}" if text else ""))
        rows = by_line.get(line, [])
        if not rows:
            lines.append("  (no runs yet)")
        else:
            lines.append(f"  {'run':<{width}}  {'batch':>10}  {'samples':>12}  {'checkpoints':>11}  created")
        for r in rows:
            if "error" in r:
                lines.append(f"  {r['run']:<{width}}  {'?':>10}  {r['error']}")
                continue
            ck = r["checkpoints"]
            lines.append(
                f"  {r['run']:<{width}}  {r['batch']:>10,}  {r['samples']:>12,}  {len(ck):>11}  {_when(r['created'])}"
            )
            for i, p in enumerate(r["periods"]):
                lines.append(f"      {period_line(r['run'], p, i == len(r['periods']) - 1)}")
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles models",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument("--run-dir", help="where runs live (default: $CHARLES_RUN_DIR or runs/)")
    ap.add_argument("--line", help="only this model line")
    ap.add_argument("--presets", action="store_true", help="also list the lines (presets) without runs")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    args = ap.parse_args(argv)
    runs = [describe(r) for r in list_runs(args.run_dir, args.line)]
    if args.json:
        print(
            json.dumps(
                {"root": str(runs_root(args.run_dir)), "lines": list_lines(args.run_dir), "runs": runs}
            )
        )
        return 0
    from charles.model.presets import describe_preset, list_presets  # plain data, no torch

    about = {p: describe_preset(p) for p in list_presets() if not args.line or p == args.line}
    sys.stdout.write(render(runs, about, all_lines=args.presets))
    return 0


if __name__ == "__main__":
    sys.exit(main())
