"""The 30 Hz driving loop shared by collectors, the player and the evaluation: world + Unstuck + history.

Per tick: :meth:`DriveSession.observe` (runs Unstuck, teleports when told, renders the faded hood frame),
then the caller decides an action (NPC, model, anything) and calls :meth:`DriveSession.step`. While
Unstuck is recovering, ``observe`` says ``driving=False`` and ``step`` holds the brake whatever it is given,
which is "stop predicting" for the player.

The history the model line reads is kept here: one row per past tick of
``HISTORY_FIELDS = (steering, throttle_brake, speed, purpose_angle, purpose_distance)``, oldest first,
never including the current tick (charles.drive.past.History, the collectors' and the player's ring). The actions in it are the *executed* ones: what the car really did,
which is what a model sees of its own past when it drives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from charles.drive.past import History
from charles.drive.unstuck import Unstuck, UnstuckConfig, UnstuckStep
from charles.sim.world import SimWorld, StepInfo

BRAKE = (0.0, -1.0)
"""What the car gets while Unstuck recovers: wheels straight, full brake."""


@dataclass
class Observation:
    frame: np.ndarray | None
    """Hood camera, RGB uint8, already faded by Unstuck; None when not asked for."""
    speed: float
    purpose: tuple[float, float]
    history: np.ndarray
    """float32 [history_len, 5], oldest first; zeros before the first ticks."""
    game_time: float
    unstuck: UnstuckStep

    @property
    def driving(self) -> bool:
        return self.unstuck.driving


@dataclass
class Tick:
    info: StepInfo
    unstuck: UnstuckStep
    action: tuple[float, float]
    """What the car got this tick (the brake while not driving)."""
    teleported: bool


class DriveSession:
    """One car driven tick by tick with Unstuck watching it."""

    def __init__(
        self,
        world: SimWorld,
        unstuck: UnstuckConfig | Unstuck | None = None,
        history_len: int = 60,
        unstuck_on_water: bool = True,
    ):
        self.world = world
        self.unstuck = unstuck if isinstance(unstuck, Unstuck) else Unstuck(unstuck)
        self.history = History(history_len)
        self.unstuck_on_water = unstuck_on_water
        """A car in water never drives out: do not wait the whole stuck window for it."""
        self.teleport_hooks: list = []
        """Callables run right after each Unstuck teleport (an NPC re-plans, a player swaps weights)."""
        self._pending: UnstuckStep | None = None
        self._teleported = False

    def restart(self) -> None:
        """Put the car at rest on a random road now: a new start, not a recovery (no fade, and Unstuck's
        count stays). Call between two ticks (before ``observe``)."""
        if self._pending is not None:
            raise RuntimeError("restart() between ticks: after step(), before observe()")
        self.world.teleport()
        for hook in self.teleport_hooks:
            hook()
        self.unstuck.reset()

    def observe(self, frame: bool = True, marker: bool | None = None) -> Observation:
        """This tick's view; runs Unstuck (and its teleport) once per tick."""
        w = self.world
        if self._pending is None:
            p = w.player
            self._pending = self.unstuck.update(w.time, position=(p.x, p.y))
            self._teleported = self._pending.teleport
            if self._pending.teleport:
                w.teleport()
                for hook in self.teleport_hooks:
                    hook()
        u = self._pending
        img = w.hood_frame(marker=marker, fade=u.fade) if frame else None
        return Observation(img, w.speed, w.purpose(), self.history.copy(), w.time, u)

    def step(self, action: tuple[float, float]) -> Tick:
        """Apply the action (ignored while Unstuck recovers) for one 1/30 s tick."""
        if self._pending is None:
            self.observe(frame=False)
        u = self._pending
        act = (float(action[0]), float(action[1])) if u.driving else BRAKE
        w = self.world
        speed, (angle, dist) = w.speed, w.purpose()
        info = w.step(*act)
        self.history.push(act, speed, (angle, dist))  # this tick is past now
        if info.in_water and self.unstuck_on_water:
            self.unstuck.trigger()
        tick = Tick(info, u, act, self._teleported)
        self._pending = None
        return tick
