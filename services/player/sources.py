"""The game the player drives, behind one interface: the built-in sim or a remote game on the bus.

Per frame the drive loop calls ``next()`` (a :class:`View`: the picture and what the model reads beside
it) and then ``act()`` with what it decided. What the model sees is made exactly as for training:

- **pictures**: the sim renders the hood camera straight at the model's input size, as the collectors
  do, and :class:`~charles.drive.policy.ModelPolicy` (used by the service) passes it
  through the collectors' codec and back: the pixels the trainer decoded. A capture agent in play mode
  already sends what it sends in collect mode (fitted to the model's size with INTER_AREA, through its
  codec), so a remote frame is only decoded (and fitted, should its size differ).
- **history**: one row per *past* frame of (steering, throttle_brake, speed, purpose angle, purpose
  distance), oldest first, never the current frame; the actions are the executed ones (the brake while
  Unstuck recovers). The sim's :class:`~charles.sim.session.DriveSession` keeps it (the collectors' own
  loop); the remote source keeps the same rows with :class:`~charles.drive.past.History`.
- **Unstuck**: the sim's session runs it (and teleports). The remote source runs the same state machine
  on the telemetry (position, else speed) to stop predicting and brake while the car is recovered; the
  teleport itself is the capture agent's (its own Unstuck moves the car through the mod).

``teleport_hooks`` run right after each Unstuck teleport (the service forgets the stacked frames there).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from charles.drive.controls import clean_purpose, clean_speed
from charles.drive.past import History
from charles.drive.unstuck import Unstuck, UnstuckConfig, UnstuckStep
from charles.model.config import ModelConfig
from charles.player.gamepad import BRAKE_PAD, Gamepad
from charles.proto import Action, Frame, GameFrame
from charles.proto.frames import FrameError
from charles.runtime import Publisher, RateLimitedLog, SeqGaps, Service, Subscriber
from charles.sections.player import PlayerConfig
from charles.sim.car import DT
from charles.sim.config import NpcConfig, SimConfig
from charles.sim.npc import Npc
from charles.sim.session import BRAKE, DriveSession
from charles.sim.world import SimWorld

log = logging.getLogger("charles.player")

LATE_RESET_FRAMES = 5
"""Paced sim: more than this many frames behind the wall clock, start the clock afresh (no catch-up burst)."""


@dataclass
class View:
    """One frame as the game gives it, and what the model reads beside it."""

    seq: int
    """Frame counter of this source, from 0, one per frame (a gap would be a dropped frame)."""
    frame: np.ndarray
    """RGB uint8 [H, W, 3] as rendered or captured (the sim renders at the model's input size)."""
    speed: float
    """m/s in the wire's range [0, 200], as collectors send it."""
    purpose: tuple[float, float]
    history: np.ndarray
    """float32 [T, 5], oldest first, the T frames before this one (T = 0 when the model reads none)."""
    previous: tuple[float, float]
    """(steering, throttle_brake) executed on the frame before."""
    unstuck: UnstuckStep
    game_time: float
    arrived: float
    """time.perf_counter() when the frame was ready (latency starts here)."""
    tick: int | None = None
    """The game's tick of the frame when the source tags it (a remote game's GameFrame.tick)."""
    wire: Frame | None = None
    """The frame as it came on the wire (a remote game): a DAgger sample carries these bytes when they are
    in the collectors' codec, not a second JPEG generation of them."""

    @property
    def driving(self) -> bool:
        return self.unstuck.driving


def _wire_history(h: np.ndarray) -> np.ndarray:
    """Speed in the wire's range, as the collectors' History records it (the sim's car can roll backwards)."""
    if len(h):
        np.clip(h[:, 2], 0.0, 200.0, out=h[:, 2])
    return h


# ---------------------------------------------------------------------------------------------- sim


def _cinematic_width(config: PlayerConfig) -> int:
    """The chase camera as wide as the widest picture made of it (the console's, the camera stream's)."""
    return max(config.console_width, config.camera_width if config.camera_hz > 0 else 0)


class SimSource:
    """The built-in sim: 30 Hz of game time, paced to the wall clock or as fast as it can go."""

    kind = "sim"

    def __init__(
        self,
        config: PlayerConfig,
        cfg: ModelConfig,
        sim: SimConfig | None = None,
        unstuck: UnstuckConfig | None = None,
        *,
        expert: bool = False,
        should_stop: Callable[[], bool] | None = None,
    ):
        sim = replace(
            sim or SimConfig(),
            seed=config.seed,
            hood_width=cfg.width,
            hood_height=cfg.height,
            cinematic_width=_cinematic_width(config),
            cinematic_height=_cinematic_width(config) * 9 // 16,
        )
        self.world = SimWorld(sim, should_stop=should_stop)  # the town: seconds, cancellable
        self.session = DriveSession(self.world, unstuck or UnstuckConfig(), cfg.history_rows)
        self.teleport_hooks: list[Callable[[], None]] = self.session.teleport_hooks
        self.npc = Npc(self.world, cfg=NpcConfig(noise_rate_hz=0.0)) if expert else None
        if self.npc is not None:
            self.teleport_hooks.append(self.npc.reset)
        if config.repaint:
            self.teleport_hooks.append(self.world.repaint)
        self.realtime = config.realtime
        self.name = f"sim-{config.seed}"
        self.seq = -1
        self.previous: tuple[float, float] = (0.0, 0.0)
        self.late = 0
        """Paced frames that started more than half a frame after their slot (the loop fell behind)."""
        self._next_t: float | None = None
        self._fade = 1.0
        self._expert: tuple[tuple[float, float], tuple[float, float]] | None = None

    @property
    def unstucks(self) -> int:
        return self.session.unstuck.unstucks

    def next(self, timeout_s: float = 0.1) -> View | None:
        if self.realtime:
            now = time.perf_counter()
            if self._next_t is None or now - self._next_t > LATE_RESET_FRAMES * DT:
                self._next_t = now
            wait = self._next_t - now
            if wait > timeout_s:
                return None
            if wait > 0:
                time.sleep(wait)
            elif wait < -DT / 2:
                self.late += 1
            self._next_t += DT
        obs = self.session.observe()
        self._fade = obs.unstuck.fade
        self._expert = None
        self.seq += 1
        return View(
            self.seq,
            obs.frame,
            clean_speed(obs.speed),
            clean_purpose(obs.purpose),
            _wire_history(obs.history),
            self.previous,
            obs.unstuck,
            obs.game_time,
            time.perf_counter(),
        )

    def expert(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """The NPC's (label, executed) for this frame (asked once per frame; None without an NPC)."""
        if self.npc is None:
            return None
        if self._expert is None:
            self._expert = self.npc.act()
        return self._expert

    def hold_unstuck(self) -> None:
        """Standing still on purpose (no weights yet) is not being stuck."""
        self.session.unstuck.reset()

    def act(self, steering: float, throttle_brake: float, pad: Gamepad) -> tuple[float, float]:
        """Apply this frame's action; returns what the car really got (the brake while Unstuck recovers)."""
        tick = self.session.step((steering, throttle_brake))
        self.previous = tick.action
        return tick.action

    def cinematic(self) -> np.ndarray | None:
        """The chase camera now, faded like the hood camera (at the console's rate only: ~1 ms)."""
        return self.world.cinematic_frame(fade=self._fade)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- remote


class RemoteSource:
    """``# 30 Hz <- game.<source>  -> action.<target>``: a capture agent's frames, a gamepad agent's pad."""

    kind = "remote"

    def __init__(
        self,
        svc: Service,
        config: PlayerConfig,
        cfg: ModelConfig,
        unstuck: UnstuckConfig | None = None,
        sub: Subscriber | None = None,
        pub: Publisher | None = None,
    ):
        self.svc = svc
        self.source_id = config.source_id
        self.target = config.target
        self.sub = sub or svc.subscriber(
            [f"game.{self.source_id}" if self.source_id else "game."], late_join=False
        )
        self.pub = pub or svc.publisher("action")
        self.unstuck = Unstuck(unstuck or UnstuckConfig())
        self.history = History(cfg.history_rows)  # what the model reads (collectors send at least 60)
        self.teleport_hooks: list[Callable[[], None]] = []
        self.name = f"remote-{self.source_id or '?'}"
        self.seq = -1
        self.actions = 0
        """Actions sent (their seq numbers run 0, 1, 2... so the gamepad agent can see gaps)."""
        self.previous: tuple[float, float] = (0.0, 0.0)
        self.late = 0
        self._last: View | None = None
        self._expert: tuple[float, float] | None = None
        """What the game's autopilot wanted on the newest frame (GameFrame.expert), when the game says."""
        self._cinematic: Frame | None = None
        """The cinematic picture that came with the newest frame (same tick), decoded only when shown."""
        self._last_game_seq: int | None = None
        """The capture agent's seq of the frame in ``_last``: the action says which frame it answers."""
        self.gaps = SeqGaps(drops=svc.metrics.drops)
        """Gaps in the capture agent's seq: frames lost on the way."""
        self._warn = RateLimitedLog(log, 60.0)

    @property
    def unstucks(self) -> int:
        return self.unstuck.unstucks

    def _newest(self, timeout_s: float) -> GameFrame | None:
        envs = self.sub.drain(64)
        if not envs:
            env = self.sub.recv(int(timeout_s * 1000))
            envs = [env] if env is not None else []
        mine = []
        for env in envs:
            gf: GameFrame = env.msg
            if not self.source_id:
                self.source_id = gf.source  # the first capture agent heard is the one we drive
                self.name = f"remote-{gf.source}"
                self.svc.log.info(f"driving the game of capture agent {gf.source!r}")
            if gf.source == self.source_id:
                if lost := self.gaps.see(gf.source, gf.seq):  # stale ones included: they did arrive
                    self.svc.metrics.drops.labels(cause="game_frame_lost").inc(lost)
                mine.append(gf)
        if len(mine) > 1:
            # acting on an old frame is worse than skipping it: the newest is what the car sees now
            self.svc.metrics.drops.labels(cause="stale_frame").inc(len(mine) - 1)
        return mine[-1] if mine else None

    def next(self, timeout_s: float = 0.1) -> View | None:
        gf = self._newest(timeout_s)
        if gf is None:
            return None
        arrived = time.perf_counter()
        try:
            frame = gf.frame.decode()
        except FrameError as e:
            self.svc.reject(e.reason, f"game frame {gf.source}#{gf.seq}: {e}")
            return None
        if frame.shape[2] != 3:
            self.svc.reject(
                "bad_shape",
                f"game frame {gf.source}#{gf.seq} has {frame.shape[2]} channel(s); the model takes RGB",
            )
            return None
        u = self.unstuck.follow(gf.game_time, gf.recovering, gf.position, gf.speed)
        if u.teleport:
            self._warn.warn(
                "teleport",
                "Unstuck: the car made no progress; braking while the capture agent's Unstuck moves it",
            )
            for hook in self.teleport_hooks:
                hook()
        purpose = clean_purpose(tuple(gf.purpose)) if gf.purpose is not None else (0.0, 0.0)
        self.seq += 1
        view = View(
            self.seq,
            frame,
            clean_speed(gf.speed),
            purpose,
            self.history.copy(),
            self.previous,
            u,
            float(gf.game_time),
            arrived,
            gf.tick,
            gf.frame,
        )
        self._expert = None if gf.expert is None else (float(gf.expert[0]), float(gf.expert[1]))
        self._cinematic = gf.cinematic
        self._last = view
        self._last_game_seq = gf.seq
        return view

    def expert(self) -> tuple[tuple[float, float], tuple[float, float]] | None:
        """(label, executed) of the game's autopilot for the newest frame: what it wanted (a capture agent
        with ``capture.dagger`` sends it while the player's actions drive over it), twice; None when the
        game does not say (a mod without Charles' extension)."""
        return None if self._expert is None else (self._expert, self._expert)

    def hold_unstuck(self) -> None:
        self.unstuck.reset()

    def act(self, steering: float, throttle_brake: float, pad: Gamepad) -> tuple[float, float]:
        """Send the pad values; the history records the action in the model's units."""
        view = self._last
        if view is None:
            return BRAKE
        if not view.driving:
            pad, (steering, throttle_brake) = BRAKE_PAD, BRAKE
        target = self.target or self.source_id
        action = Action(self.actions, pad.steering, pad.throttle, pad.brake, target, self._last_game_seq)
        self.pub.send(f"action.{target}", action)
        self.actions += 1
        self.previous = (steering, throttle_brake)
        self.history.push(self.previous, view.speed, view.purpose)
        return self.previous

    def cinematic(self) -> np.ndarray | None:
        """The third-person picture of the frame just driven, when the capture agent sends one (its mod
        alternates cameras); None otherwise (the stream's cinematic tile then stays empty)."""
        f = self._cinematic
        if f is None:
            return None
        try:
            img = f.decode()
        except FrameError as e:
            self.svc.reject(e.reason, f"cinematic picture of game frame #{self._last_game_seq}: {e}")
            self._cinematic = None
            return None
        return img if img.ndim == 3 and img.shape[2] == 3 else None

    def close(self) -> None:
        pass
