"""The Server/Trainer Console: a bounded loss plot, the state the viewer shows, and a live terminal view.

The same state dict goes three ways: to the viewer on ``console.<instance>`` (~2 Hz, last value at the
broker), reduced to scalars into the heartbeat's ``info`` (the launcher's console), and drawn in place on
the terminal with ``--console`` when stdout is a TTY (the seed's bottom-middle tile).
"""

from __future__ import annotations

import shutil
import sys
import time
from typing import Any, TextIO

from charles.thinned import Thinned


class LossHistory(Thinned[list[float]]):
    """[[batch, loss], ...] for the loss plot, bounded (charles.thinned: the whole run stays in view at a
    fixed size)."""

    def add(self, batch: int, loss: float) -> None:  # type: ignore[override]
        super().add([batch, round(float(loss), 6)])


def score_state(score: Any) -> dict[str, Any]:
    """The judge's newest score of this run as console state (``score``), or nothing before the first."""
    if score is None:
        return {}
    f, ref = score.figures, score.reference
    return {
        "score": {
            "batch": score.batch,
            "km_between_unstucks": round(f.km_between_unstucks, 4),
            "on_road_fraction": round(f.on_road_fraction, 4),
            "collisions_per_km": round(f.collisions_per_km, 3),
            "mean_speed_kmh": round(f.mean_speed_kmh, 2),
            "npc_km_between_unstucks": round(ref.km_between_unstucks, 4) if ref is not None else None,
            "towns": len(score.seeds),
            "minutes": score.minutes,
        }
    }


def heartbeat_info(state: dict[str, Any]) -> dict[str, Any]:
    """The scalars the launcher console shows: status, batch, loss, fill, sps, published."""
    buffers = state.get("buffers") or {}
    fills = [b["fill"] / b["capacity"] for b in buffers.values() if b.get("capacity")]
    loss = state.get("loss_total")
    return {
        "status": state.get("status", ""),
        "batch": int(state.get("batch", 0)),
        "loss": round(loss, 5) if isinstance(loss, float) else 0.0,
        "fill": round(min(fills), 3) if fills else 0.0,
        "sps": round(float(state.get("samples_per_s", 0.0)), 1),
        "published": int(state.get("published", 0)),
        # flow control: collectors read the demand from here (charles.flow; absent when flow_reuse is 0)
        **({"demand": flow["demand"]} if (flow := state.get("flow")) and "demand" in flow else {}),
    }


# ---- the terminal -------------------------------------------------------------------------------------


def _bar(frac: float, width: int) -> str:
    frac = min(1.0, max(0.0, frac))
    full = int(frac * width)
    return "█" * full + "·" * (width - full)


def _ago(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0.0, now - t)
    return f"{s:.0f}s ago" if s < 120 else f"{s / 60:.0f} min ago"


def render_lines(state: dict[str, Any], width: int = 80, now: float | None = None) -> list[str]:
    """The console as lines of at most ``width`` characters (pure, for tests and the terminal)."""
    now = time.time() if now is None else now
    w = max(40, width)
    bar_w = max(10, w - 40)
    out = [
        f"Charles trainer — {state.get('run', '?')} on {state.get('device', '?')}"[:w],
        f"status  {state.get('status', '?')}"[:w],
        (
            f"batch   {state.get('batch', 0):,}   {state.get('batches_per_s', 0.0):.2f} batches/s   "
            f"{state.get('samples_per_s', 0.0):.1f} samples/s   data wait {100 * state.get('data_wait', 0.0):.0f}%"
        )[:w],
        f"lr      {state.get('lr', 0.0):.2e}"[:w],
    ]
    flow = state.get("flow") or {}
    if "demand" in flow:
        want = "more" if flow["demand"] > 1.05 else "less" if flow["demand"] < 0.95 else "as much"
        out.append(
            (
                f"flow    {flow.get('insert_per_s', 0.0):.1f} in/s, {flow.get('draw_per_s', 0.0):.1f} drawn/s: "
                f"reuse {flow.get('reuse', 0.0):.2f} (aim {flow.get('target_reuse', 0.0):g}) -> asks for "
                f"{want} data (x{flow['demand']:.2f})"
            )[:w]
        )
    out.append("buffers")
    for name, b in (state.get("buffers") or {}).items():
        cap = b.get("capacity") or 1
        frac = b.get("fill", 0) / cap
        mark = " ready" if frac >= state.get("start_fraction", 0.9) else ""
        out.append(f"  {name[:14]:<14} {_bar(frac, bar_w)} {b.get('fill', 0):>6}/{cap:<6}{mark}"[:w])
    reused = state.get("reused") or {}
    if any(reused.values()):
        out.append(("reused  " + "   ".join(f"{k} {v:,}" for k, v in reused.items()))[:w])
    losses = state.get("loss") or {}
    if losses:
        parts = "  ".join(f"{k} {v:.4f}" for k, v in losses.items())
        total = state.get("loss_total")
        out.append(
            f"loss    {total:.4f}  ({parts})"[:w] if isinstance(total, float) else f"loss    {parts}"[:w]
        )
    collectors, players = state.get("collectors") or [], state.get("players") or []
    out.append(f"collectors {len(collectors)}: {', '.join(collectors)}"[:w])
    out.append(f"players    {len(players)}: {', '.join(players)}"[:w])
    last = state.get("last_publish_batch")
    out.append(
        (
            f"weights  {state.get('published', 0)} updates sent, last at batch "
            f"{'–' if last is None else f'{last:,}'} ({_ago(state.get('last_publish_time'), now)})"
        )[:w]
    )
    ck = state.get("checkpoint_batch")
    out.append(f"checkpoint  {'none yet' if ck is None else f'batch {ck:,}'}"[:w])
    sc = state.get("score")
    if isinstance(sc, dict):
        npc = sc.get("npc_km_between_unstucks")
        out.append(
            (
                f"driving  {sc.get('km_between_unstucks', 0.0):.3f} km between Unstucks, "
                f"{100 * sc.get('on_road_fraction', 0.0):.0f}% on the road at batch {sc.get('batch', 0):,}"
                + (f" (NPC {npc:.3f})" if isinstance(npc, float) else "")
            )[:w]
        )
    return out


class TerminalConsole:
    """Redraws the console in place on a terminal (cursor up over the previous drawing, clear, draw)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self._drawn = 0

    @staticmethod
    def available(stream: TextIO | None = None) -> bool:
        s = stream or sys.stdout
        return bool(getattr(s, "isatty", lambda: False)())

    def draw(self, state: dict[str, Any]) -> None:
        width = shutil.get_terminal_size((100, 24)).columns
        lines = render_lines(state, width - 1)
        up = f"\x1b[{self._drawn}F" if self._drawn else ""
        self.stream.write(up + "\x1b[J" + "\n".join(lines) + "\n")
        self.stream.flush()
        self._drawn = len(lines)
