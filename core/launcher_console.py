"""The combined console of ``charles up``: one line per process, state at a glance.

Reads heartbeats (and the consoles' state, which carry the interesting numbers) off the bus, like any
other subscriber. On a terminal it redraws in place once a second; otherwise (CI, a log file) it prints
a compact line every ten seconds.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

from charles import config
from charles.runtime import Service

# state keys worth showing, per service, in order (services put them in heartbeats' info)
SHOW = {
    "broker": ["through_msgs"],
    "collector": ["samples", "sps", "pace", "unstucks", "km", "drops"],
    "balancer": ["accepted", "sets", "acceptance", "held"],
    "trainer": ["status", "batch", "loss", "fill", "sps", "demand", "published"],
    "player": ["model_batch", "pps", "fps", "swaps", "unstucks"],
    "viewer": ["clients"],
    "judge": ["status", "batch", "km_between_unstucks", "on_road_fraction", "judgings"],
}
_COLOURS = {
    "ok": "\033[32m",
    "starting": "\033[33m",
    "waiting": "\033[33m",
    "stopping": "\033[35m",
    "dead": "\033[31m",
}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


class Console:
    def __init__(self, launcher: Any, bus_ports: dict[str, int]):
        self.launcher = launcher
        cfg = config.load(data={"bus": {"host": "127.0.0.1", "ports": bus_ports}}, environ={})
        self.svc = Service("launcher", cfg, instance="launcher", http=False, signals=False)
        self.sub = self.svc.subscriber(["heartbeat"], late_join=False)
        self.beats: dict[str, tuple[float, Any]] = {}
        self.tty = sys.stdout.isatty() and not getattr(launcher.args, "plain", False)
        self.started = time.monotonic()
        self.last_draw = 0.0
        self.lines_drawn = 0

    def tick(self) -> None:
        end = time.monotonic() + 0.25
        while time.monotonic() < end:
            env = self.sub.recv(50)
            if env is not None:
                self.beats[env.msg.instance] = (time.monotonic(), env.msg)
        now = time.monotonic()
        period = 1.0 if self.tty else 10.0
        if now - self.last_draw >= period:
            self.last_draw = now
            self.draw(now)

    def rows(self, now: float) -> list[tuple[str, str, str]]:
        out = []
        by_service: dict[str, list] = {}
        for t, hb in self.beats.values():
            by_service.setdefault(hb.service, []).append((t, hb))
        for p in self.launcher.procs:
            running = p.popen is not None and p.popen.poll() is None
            beats = sorted(by_service.get(p.service, []), key=lambda x: x[1].instance)
            # collectors: match the replica by its id; the rest: there is one
            match = [b for b in beats if b[1].instance == p.name] or (
                beats if p.service != "collector" else []
            )
            if not running:
                state, detail = "dead", f"restarts {p.restarts}"
            elif not match:
                state, detail = "starting", ""
            else:
                t, hb = match[-1]
                state = hb.state if now - t < 5 else "silent"
                keys = SHOW.get(p.service, [])
                detail = "  ".join(f"{k} {_fmt(hb.info[k])}" for k in keys if k in hb.info)
                if p.restarts:
                    detail += f"  restarts {p.restarts}"
            out.append((p.name, state, detail))
        return out

    def draw(self, now: float) -> None:
        rows = self.rows(now)
        elapsed = now - self.started
        url = self.launcher.watch_url() if hasattr(self.launcher, "watch_url") else None
        watch = f" — watch: {url}" if url else ""
        head = (
            f"Charles — {len(rows)} processes — {int(elapsed // 60)}m{int(elapsed % 60):02d}s{watch} — "
            "Ctrl-C stops"
        )
        if self.tty:
            width = os.get_terminal_size().columns if sys.stdout.isatty() else 120
            lines = [head, "-" * min(width, 100)]
            for name, state, detail in rows:
                c = _COLOURS.get(state, "")
                lines.append(f"{name:<14} {c}{state:<9}\033[0m {detail}"[: width + 9])
            if self.lines_drawn:
                sys.stdout.write(f"\033[{self.lines_drawn}F\033[J")
            sys.stdout.write("\n".join(lines) + "\n")
            sys.stdout.flush()
            self.lines_drawn = len(lines)
        else:
            summary = "; ".join(f"{n}:{s}{(' ' + d) if d else ''}" for n, s, d in rows)
            print(f"[{int(elapsed)}s] {summary}", flush=True)

    def close(self) -> None:
        self.svc.close()
