"""Game time for frames the mod did not take: telemetry matched to each picture's capture time.

With ``frames: dxcam`` the picture is taken on the game PC's clock and the mod's telemetry arrives on its
own (30 or 60 times a second): each picture gets the telemetry *at its capture time*, linearly
interpolated between the two data messages around it (never extrapolated: after the newest one, the newest
one). The distance from the capture time to the nearest data message is the frame-to-telemetry *skew*:
what interpolation had to bridge, exported as a histogram and as p50/p99 gauges.

When the mod says its own clock (``gameTime``, Charles' protocol extension), the frame's game time is that
clock at the capture time; otherwise it is the PC's monotonic clock since the first frame.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from charles.agents.deepgtav import GameMessage, Telemetry


@dataclass(slots=True)
class Matched:
    """Telemetry at a capture time."""

    telemetry: Telemetry
    skew_s: float
    """Capture time to the nearest data message (s, >= 0)."""
    game_ms: float | None
    """The mod's clock at the capture time (ms), when it sends one."""


def _lerp(a: float | None, b: float | None, w: float) -> float | None:
    if a is None or b is None:
        return a if w < 0.5 else b
    return a + (b - a) * w


def match(t: float, recent: Sequence[GameMessage]) -> Matched | None:
    """The telemetry at monotonic time ``t`` from ``recent`` pairs (oldest first); None without any."""
    if not recent:
        return None
    after = next((m for m in recent if m.received >= t), None)
    before = next((m for m in reversed(recent) if m.received <= t), None)
    if before is None or after is None or after is before:
        m = after or before
        assert m is not None
        return Matched(m.telemetry, abs(t - m.received), m.telemetry.game_ms)
    span = after.received - before.received
    w = 0.0 if span <= 0 else (t - before.received) / span
    a, b = before.telemetry, after.telemetry
    loc = None
    if a.location is not None and b.location is not None:
        loc = tuple(float(x) for x in np.add(a.location, np.multiply(np.subtract(b.location, a.location), w)))
    near = a if w < 0.5 else b
    tele = Telemetry(
        throttle=_lerp(a.throttle, b.throttle, w),
        brake=_lerp(a.brake, b.brake, w),
        steering=_lerp(a.steering, b.steering, w),
        speed=_lerp(a.speed, b.speed, w),
        yaw_rate=_lerp(a.yaw_rate, b.yaw_rate, w),
        location=loc if loc is not None else near.location,  # type: ignore[arg-type]
        hour=near.hour,
        game_ms=_lerp(a.game_ms, b.game_ms, w),
        tick=near.tick,
        camera=near.camera,
        autopilot=near.autopilot,
    )
    return Matched(tele, min(t - before.received, after.received - t), tele.game_ms)


class SkewStats:
    """p50/p99 of the last ``window`` skews (what the dashboard and the console show)."""

    def __init__(self, window: int = 1000):
        self.values: deque[float] = deque(maxlen=window)

    def add(self, skew_s: float) -> None:
        self.values.append(skew_s)

    def quantiles(self) -> tuple[float, float]:
        if not self.values:
            return 0.0, 0.0
        p50, p99 = np.quantile(np.fromiter(self.values, float), [0.5, 0.99])
        return float(p50), float(p99)


class GameClock:
    """A frame's game time: the mod's clock since the first frame when it has one, else the PC's.

    ``advance`` says whether time moved since the last frame: a paused game (menu, loading screen) stops
    its clock, and a frame of a stopped clock is no new tick of game time.
    """

    def __init__(self) -> None:
        self.t0_pc: float | None = None
        self.t0_game: float | None = None
        self.last: float | None = None

    def at(self, pc_t: float, game_ms: float | None) -> float:
        if game_ms is not None:
            if self.t0_game is None:
                self.t0_game = game_ms
            elif self.last is not None and game_ms < self.t0_game + self.last * 1000.0 - 1000.0:
                self.t0_game = game_ms - self.last * 1000.0  # the game restarted: its clock goes on from ours
            return max(0.0, (game_ms - self.t0_game) / 1000.0)
        if self.t0_pc is None:
            self.t0_pc = pc_t
        return max(0.0, pc_t - self.t0_pc)

    def advance(self, game_time: float) -> bool:
        moved = self.last is None or game_time > self.last
        if moved:
            self.last = game_time
        return moved
