"""``charles models``: the model lines, their runs, batch counters and training periods (the seed's model list).

charles models                 every line with runs, newest information from each run's manifest
charles models --line tiny     one line
charles models --presets       also the lines (presets) that have no runs yet
charles models --json          the same as JSON (scripts, the e2e bench)
charles models --offline       do not ask the broker what the players drive now

Each version shows its training periods, streamed (``trainer.publish: live``) or off-stream (``off``), and
the times ``charles stream`` put one of its checkpoints on the bus. Under each line: what every player on the
broker drives now (its console's last value, asked with a short timeout; "no broker" when none answers).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from charles import config as config_mod
from charles.cli import help_text
from charles.trainer.runs import RunDir, checkpoint_batches, list_lines, list_runs, runs_root

PLAYERS_TIMEOUT_S = 0.5
"""How long `charles models` waits for the broker to say what the players drive (it is a listing: a missing
broker must not hold it up)."""


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
                "publish": p.publish,
            }
            for p in m.periods
        ],
        streams=run.streams(),
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
    how = "off-stream" if p.get("publish") == "off" else "streamed"
    return f"started {start}, {stop}, {how}  ({span})"


def stream_line(s: dict[str, Any]) -> str:
    """A ``charles stream`` of the run: "streamed batch 24,500 (charles stream)"."""
    return (
        f"streamed batch {s['batch']:,} by charles stream  ({_when(s.get('since', 0))}, {s.get('host', '')})"
    )


def players_now(cfg: Any, timeout_s: float = PLAYERS_TIMEOUT_S) -> list[dict[str, Any]] | None:
    """What each player on the broker drives now, from its console's last value (``console.player*``: the
    players' default ids); None when no broker answers within ``timeout_s``."""
    from charles.runtime import Service

    svc = Service("models", cfg, http=False, signals=False)
    try:
        try:
            envs = svc.snapshot(["console.player"], timeout_s=timeout_s, missing_ok=False)
        except TimeoutError:
            return None
        out = []
        for env in envs:
            if getattr(env.msg, "service", "") != "player" or not isinstance(env.msg.state, dict):
                continue
            st = env.msg.state
            out.append(
                {
                    "instance": env.topic.split(".", 1)[1],
                    "model": st.get("model"),
                    "line": st.get("model_line"),
                    "batch": st.get("model_batch"),
                    "follow": st.get("follow"),
                }
            )
        return out
    finally:
        svc.close()


def player_line(p: dict[str, Any]) -> str:
    batch = f" batch {p['batch']:,}" if isinstance(p.get("batch"), int) else ""
    follow = f" (follows {p['follow']})" if p.get("follow") else ""
    return f"  players now: {p['instance']} drives {p.get('model') or '?'}{batch}{follow}"


def render(
    runs: list[dict[str, Any]],
    about: dict[str, str] | None = None,
    all_lines: bool = False,
    players: list[dict[str, Any]] | None = None,
) -> str:
    """A readable table: one block per line, one row per run, its periods and streams underneath (oldest
    first). ``about`` gives a line's one-sentence description; ``all_lines`` also lists the lines in ``about``
    that have no runs; ``players`` (``players_now``) says under each line what its players drive now."""
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
            events = [
                (p["started"], period_line(r["run"], p, i == len(r["periods"]) - 1))
                for i, p in enumerate(r["periods"])
            ]
            events += [(st.get("since", 0), stream_line(st)) for st in r.get("streams", [])]
            for _, text in sorted(events, key=lambda e: e[0]):
                lines.append(f"      {text}")
        for p in players or []:
            if p.get("line") == line or (p.get("model") or "").startswith(f"{line}_v"):
                lines.append(player_line(p))
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
    ap.add_argument("--offline", action="store_true", help="do not ask the broker what the players drive")
    config_mod.add_arguments(
        ap, config_help="run configuration (where the broker is; default $CHARLES_CONFIG)"
    )
    args = ap.parse_args(argv)
    runs = [describe(r) for r in list_runs(args.run_dir, args.line)]
    players = None
    if not args.offline:
        try:
            cfg = config_mod.load(args.config, overrides=args.set)
        except ValueError as e:
            print(f"charles models: configuration error: {e}", file=sys.stderr)
            return 2
        players = players_now(cfg)
    if args.json:
        print(
            json.dumps(
                {
                    "root": str(runs_root(args.run_dir)),
                    "lines": list_lines(args.run_dir),
                    "runs": runs,
                    "players": players,
                }
            )
        )
        return 0
    from charles.model.presets import describe_preset, list_presets  # plain data, no torch

    about = {p: describe_preset(p) for p in list_presets() if not args.line or p == args.line}
    sys.stdout.write(render(runs, about, all_lines=args.presets, players=players))
    if players is None and not args.offline:
        sys.stdout.write("(what players drive now: no broker answered; --offline skips asking)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
