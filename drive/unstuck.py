"""Unstuck: notice a car that stopped making progress and put it back on a road, gracefully.

One implementation for the collectors, the player and the evaluation, for the sim and for a remote game.
It needs nothing but the game time and either a position (from telemetry) or, where there is none, the
speed (integrated into an odometer). It never touches the game itself: each :meth:`Unstuck.update` says
what to do now, and the caller does it (stop predicting, fade the picture, send the teleport command).

Phases: DRIVE -> FADE_OUT -> TELEPORT (one step: teleport now) -> SETTLE -> FADE_IN -> DRIVE.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field


@dataclass
class UnstuckConfig:
    """When a car counts as stuck and how the recovery (fade, teleport, settle, fade) is paced."""

    min_distance_m: float = field(
        default=5.0, metadata={"help": "The car must move at least this far (m) ..."}
    )
    window_s: float = field(
        default=10.0, metadata={"help": "... within this many seconds of game time, or it is stuck."}
    )
    fade_out_s: float = field(
        default=0.5,
        metadata={"help": "Fade to black before the teleport (s), so viewers see a cut, not a jump."},
    )
    settle_s: float = field(
        default=1.0,
        metadata={"help": "Wait after the teleport (s): a real game drops the car and streams the area in."},
    )
    fade_in_s: float = field(default=0.5, metadata={"help": "Fade back in after settling (s)."})
    grace_s: float = field(
        default=2.0,
        metadata={
            "help": "After resuming, the car gets this long (s) extra before the stuck clock can fire."
        },
    )

    def __post_init__(self) -> None:
        if self.min_distance_m <= 0 or self.window_s <= 0:
            raise ValueError("min_distance_m and window_s must be > 0")


class Phase(enum.StrEnum):
    DRIVE = "drive"
    """Normal driving: predict and apply actions."""
    FADE_OUT = "fade_out"
    """Stuck: stop predicting (brake), fade the picture to black."""
    TELEPORT = "teleport"
    """This step: move the car to a random road location."""
    SETTLE = "settle"
    """Wait, black, for the car to land and the world around it to load."""
    FADE_IN = "fade_in"
    """Picture comes back; still not driving."""


@dataclass(frozen=True, slots=True)
class UnstuckStep:
    phase: Phase
    fade: float
    """Picture brightness factor, 1 = untouched, 0 = black."""
    teleport: bool
    """True on exactly one step per unstuck: teleport the car now."""
    idle_s: float
    """How long (s) the car has gone without moving ``min_distance_m`` (0 outside DRIVE)."""

    @property
    def driving(self) -> bool:
        """Whether the policy should be asked for an action this step."""
        return self.phase is Phase.DRIVE


_SENDER_DRIVING = UnstuckStep(Phase.DRIVE, 1.0, False, 0.0)
_SENDER_RECOVERING = UnstuckStep(Phase.SETTLE, 1.0, False, 0.0)
"""What a sender's ``recovering`` says, as a step of this machine (the sender moves the car itself)."""


class Unstuck:
    """A state machine fed once per step: ``update(t, position=...)`` or ``update(t, speed=...)``."""

    def __init__(self, cfg: UnstuckConfig | None = None):
        self.cfg = cfg or UnstuckConfig()
        self.unstucks = 0
        """How many teleports it has asked for."""
        self.forced = 0
        """How many of them were asked for with :meth:`trigger` (water, for example)."""
        self.phase = Phase.DRIVE
        self._phase_t = None
        self._anchor_t: float | None = None
        self._anchor_pos: tuple[float, float] | None = None
        self._anchor_odo = 0.0
        self._odo = 0.0
        self._last_t: float | None = None
        self._grace = 0.0
        self._force = False

    def reset(self) -> None:
        """Start watching afresh (new episode, or after the caller moved the car itself)."""
        self.phase = Phase.DRIVE
        self._anchor_t = None
        self._last_t = None
        self._grace = 0.0

    def trigger(self) -> None:
        """Unstuck at the next update regardless of movement (e.g. the car is in water)."""
        if self.phase is Phase.DRIVE:
            self._force = True

    def follow(
        self,
        t: float,
        recovering: bool | None,
        position: tuple[float, ...] | None = None,
        speed: float | None = None,
    ) -> UnstuckStep:
        """A remote game's frame: the sender's word when it says whether its own Unstuck has the car
        (``recovering``; this watch then starts afresh, so there is never a second one), else this watch
        on its telemetry, the position or, lacking one, the speed."""
        if recovering is not None:
            self.reset()
            return _SENDER_RECOVERING if recovering else _SENDER_DRIVING
        return self.update(t, position=position, speed=None if position is not None else speed)

    def update(
        self, t: float, position: tuple[float, ...] | None = None, speed: float | None = None
    ) -> UnstuckStep:
        """Feed the game time (s) and the position (x, y[, z] m) or, lacking one, the speed (m/s)."""
        if position is None and speed is None:
            raise ValueError("Unstuck needs a position or a speed")
        dt = 0.0 if self._last_t is None else max(0.0, t - self._last_t)
        self._last_t = t
        if speed is not None:
            self._odo += abs(float(speed)) * dt
        cfg = self.cfg

        if self.phase is Phase.DRIVE:
            if self._anchor_t is None:
                self._set_anchor(t, position)
            moved = self._moved(position)
            if moved >= cfg.min_distance_m:
                self._set_anchor(t, position)
                self._grace = 0.0
            idle = t - self._anchor_t
            if self._force or idle >= cfg.window_s + self._grace:
                self.forced += int(self._force)
                self._force = False
                self._enter(Phase.FADE_OUT, t)
            else:
                return UnstuckStep(Phase.DRIVE, 1.0, False, idle)

        elapsed = t - self._phase_t
        if self.phase is Phase.FADE_OUT:
            if elapsed < cfg.fade_out_s:
                return UnstuckStep(Phase.FADE_OUT, 1.0 - elapsed / cfg.fade_out_s, False, 0.0)
            self.unstucks += 1
            self._enter(Phase.SETTLE, t)
            return UnstuckStep(Phase.TELEPORT, 0.0, True, 0.0)
        if self.phase is Phase.SETTLE:
            if elapsed < cfg.settle_s:
                return UnstuckStep(Phase.SETTLE, 0.0, False, 0.0)
            self._enter(Phase.FADE_IN, t)
            elapsed = 0.0
        if self.phase is Phase.FADE_IN:
            if elapsed < cfg.fade_in_s:
                return UnstuckStep(Phase.FADE_IN, elapsed / cfg.fade_in_s, False, 0.0)
            # Back to driving: a fresh stuck clock from here, plus grace to get rolling from standstill.
            self.phase = Phase.DRIVE
            self._set_anchor(t, position)
            self._grace = cfg.grace_s
        return UnstuckStep(Phase.DRIVE, 1.0, False, 0.0)

    def _enter(self, phase: Phase, t: float) -> None:
        self.phase = phase
        self._phase_t = t

    def _set_anchor(self, t: float, position: tuple[float, ...] | None) -> None:
        self._anchor_t = t
        self._anchor_pos = None if position is None else (float(position[0]), float(position[1]))
        self._anchor_odo = self._odo

    def _moved(self, position: tuple[float, ...] | None) -> float:
        if position is not None and self._anchor_pos is not None:
            return math.hypot(position[0] - self._anchor_pos[0], position[1] - self._anchor_pos[1])
        return self._odo - self._anchor_odo
