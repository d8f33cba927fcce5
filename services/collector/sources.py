"""Where a collector's driving comes from: the built-in sim, a remote game, any Gymnasium environment.

Each is a :class:`Source`: one :class:`~charles.drive.samples.Capture` per 30 Hz tick of game time, which
the collector's :class:`~charles.drive.samples.SampleBuilder` turns into samples.

- :class:`SimSource` drives a SimWorld with the NPC through a DriveSession (Unstuck built in). The label
  is the NPC's corrective action, the car executes the noisy one (noise injection: recovery data).
- :class:`GameSource` turns ``game.<source>`` GameFrames from a capture agent into captures; the label is
  what the game's autopilot wanted when the frame says (``expert``: someone else, a player's model, drove
  it), else the controls the game's driver applied (its NPC or a human's pad). The game keeps its own clock; ticks
  closer than one 30 Hz step of game time are skipped (a 60 FPS agent gives 30 samples/s, not 60).
  Unstuck: the agent's own (it moves the car) marks its recovery frames ``recovering``; a sender that
  does not say gets the same Unstuck run here on its telemetry (position, else speed). Either way a
  recovery's frames are not driving and each recovery counts one unstuck.
- :class:`GymSource` steps any Gymnasium env with image observations, driven by an expert
  (``module:callable`` factory, called with the env, returning ``act(obs, info)``); the env's action
  layout (charles.drive.gym.action_adapter: [steering, throttle_brake], [steer, gas, brake], a discrete
  table, or a factory) turns the expert's actions into labels.
- :class:`DatasetSource` replays a recorded dataset (charles.dataset, ``charles record``): its samples
  are already built and encoded, so ``next`` returns Samples and the collector only renumbers them. A
  truncated shard or a corrupt record is skipped and counted (``charles_rejects_total{reason}``).
"""

from __future__ import annotations

import math
import random
import zlib
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from charles.dataset import SkipCounter, samples
from charles.drive.gym import action_adapter, load_callable, observation_parts
from charles.drive.samples import TICK_HZ, Capture
from charles.drive.unstuck import Phase, Unstuck, UnstuckConfig
from charles.proto import GameFrame, Sample
from charles.runtime import SeqGaps
from charles.sim.config import WEATHERS, NpcConfig, SimConfig
from charles.sim.session import BRAKE

WEATHER_MIX = {"clear": 0.45, "overcast": 0.25, "rain": 0.18, "fog": 0.12}
"""How often each weather is drawn per replica (mostly fair weather, as in a game's own cycle)."""
HOURS = (5.5, 21.5)
"""Range of the hour drawn per replica: dawn to late evening (a few night frames, mostly daylight)."""
VARY_HOURS = (0.0, 24.0)
"""look: vary draws the hour from the whole day: a third of the episodes are at night (GTA V has nights)."""


class Source(Protocol):
    """Where driving comes from. ``next`` returns the next tick, or None when none came within timeout_s."""

    name: str
    """sim, game:<id>, gym:<env id> (heartbeat and console show it)."""
    paced: bool
    """True when ``next`` waits for the game's own clock (a remote game); False when the collector paces
    it (sim, gym: as fast as the CPU allows, or to the wall clock with collector.realtime)."""

    def next(self, timeout_s: float) -> Capture | None: ...

    def info(self) -> dict:
        """Small numbers and strings for the console (seed, weather, episodes...)."""
        ...

    def close(self) -> None: ...


def replica_seed(instance: str, base: int = 0) -> int:
    """A replica's sim seed when none is given: stable per id (compose: the container host name)."""
    return (base + zlib.crc32(instance.encode())) % 2**31


def seeded_look(seed: int) -> dict[str, Any]:
    """Weather, hour and car colour for a replica, drawn from its seed (domain variety across replicas)."""
    from charles.sim.world import CAR_COLORS

    rng = random.Random(seed * 7919 + 17)
    return {
        **draw_sky(rng, HOURS),
        "car_color": tuple(CAR_COLORS[rng.randrange(len(CAR_COLORS))]),
    }


def draw_sky(rng: random.Random, hours: tuple[float, float] = VARY_HOURS) -> dict[str, Any]:
    """A weather (WEATHER_MIX's odds) and an hour within ``hours``."""
    weathers = [w for w in WEATHERS if w in WEATHER_MIX]
    weather = rng.choices(weathers, [WEATHER_MIX[w] for w in weathers])[0]
    return {"weather": weather, "time_of_day": round(rng.uniform(*hours), 2)}


# ---------------------------------------------------------------------------------------------- sim


class SimSource:
    """The built-in sim with the NPC driving and Unstuck watching."""

    paced = False

    def __init__(
        self,
        seed: int,
        width: int,
        height: int,
        sim: SimConfig | None = None,
        npc: NpcConfig | None = None,
        unstuck: UnstuckConfig | None = None,
        look: str = "seed",
        render_idle: bool = False,
        history_len: int = 0,
        restart_s: float = 0.0,
        repaint: bool = False,
        restart_turn_deg: float = 0.0,
        restart_offset_m: float = 0.0,
        should_stop: Callable[[], bool] | None = None,
    ):
        from charles.sim.npc import Npc
        from charles.sim.session import DriveSession
        from charles.sim.world import SimWorld

        sim = sim or SimConfig()
        changes: dict[str, Any] = {"seed": seed, "hood_width": width, "hood_height": height}
        if look == "seed":
            changes.update(seeded_look(seed))
        self.sim_cfg = replace(sim, **changes)
        self.world = SimWorld(self.sim_cfg, should_stop=should_stop)  # the town: seconds, cancellable
        self.npc = Npc(self.world, cfg=npc or NpcConfig())
        # The history samples carry is the SampleBuilder's; history_len > 0 keeps the session's own record
        # of the same rows too (the tests compare the two).
        self.session = DriveSession(self.world, unstuck or UnstuckConfig(), history_len=history_len)
        self.session.teleport_hooks.append(self.npc.reset)
        if repaint:  # restarts run the teleport hooks too
            self.session.teleport_hooks.append(self.world.repaint)
        self.skies = 0
        if (
            look == "vary"
        ):  # a new sky at every restart and Unstuck: every replica sees every weather and hour
            self._sky_rng = random.Random(seed * 104729 + 3)
            self.session.teleport_hooks.append(self._new_sky)
        self.render_idle = render_idle
        """Render frames Unstuck fades too (a stacked model sees them in its past frames)."""
        self.name = "sim"
        self.seed = seed
        self.restart_s = restart_s
        """Every this many game seconds the car starts again at rest somewhere else (0 = never)."""
        self.restarts = 0
        self.restart_turn = math.radians(restart_turn_deg)
        """Restarts turn the car up to this (rad) off the lane, and shift it up to restart_offset_m."""
        self.restart_offset_m = restart_offset_m
        self._next_restart = restart_s

    @property
    def unstucks(self) -> int:
        return self.session.unstuck.unstucks

    def next(self, timeout_s: float = 0.0) -> Capture:
        if self.restart_s > 0 and self.world.time >= self._next_restart:
            self._next_restart = self.world.time + self.restart_s
            if self.session.unstuck.phase is Phase.DRIVE:  # not in the middle of an Unstuck recovery
                self.session.restart()
                if self.restart_turn > 0 or self.restart_offset_m > 0:
                    self.world.displace(self.restart_turn, self.restart_offset_m)
                self.restarts += 1
        obs = self.session.observe(frame=False)
        driving = obs.driving
        image = self.world.hood_frame(fade=obs.unstuck.fade) if driving or self.render_idle else None
        if driving:
            label, executed = self.npc.act()
        else:
            label = executed = (0.0, -1.0)  # the session brakes whatever it is given
        tick = self.session.step(executed)
        return Capture(
            game_time=obs.game_time,
            image=image,
            label=label,
            executed=tick.action,
            speed=obs.speed,
            purpose=obs.purpose,
            driving=driving,
            source="npc",
            distance_m=tick.info.distance_m if driving else 0.0,
            unstuck=tick.teleported,
        )

    def _new_sky(self) -> None:
        self.world.set_appearance(**draw_sky(self._sky_rng))
        self.skies += 1

    def info(self) -> dict:
        c = self.world.cfg  # the look now (look: vary changes it at restarts)
        info = {"seed": self.seed, "weather": c.weather, "hour": c.time_of_day, "unstucks": self.unstucks}
        if self.restart_s > 0:
            info["restarts"] = self.restarts
        return info

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- remote game


class GameSource:
    """GameFrames with controls from a capture agent (``game.<source id>``) as captures.

    ``sub`` is a charles.runtime.Subscriber on ``game.<source id>``; ``reject(reason, detail)`` counts what
    is refused (a frame without controls cannot be labelled). ``unstuck`` configures the Unstuck that
    watches senders which do not say whether they are recovering.
    """

    paced = True

    def __init__(
        self,
        source_id: str,
        sub: Any,
        reject: Any = None,
        unstuck: UnstuckConfig | None = None,
        drop: Any = None,
    ):
        self.name = f"game:{source_id}"
        self.sub = sub
        self.reject = reject or (lambda reason, detail: None)
        self.drop = drop or (lambda cause, n: None)
        """``drop(cause, n)``: counts GameFrames that never arrived (``game_frame_lost``)."""
        self.gaps = SeqGaps()
        self.watch = Unstuck(unstuck or UnstuckConfig())
        """Runs only on frames whose sender does not say (``recovering`` absent): one verdict per frame."""
        self.t0: float | None = None
        self.last_tick: int | None = None
        self.skipped = 0
        """GameFrames dropped because they came closer than one 30 Hz step of game time."""
        self.frames = 0
        self.recovering = False
        self.unstucks = 0
        """Recoveries seen start (the agent's, or this source's own Unstuck's)."""
        self._unstuck_due = False
        """A recovery started on a frame that became no capture: the next capture carries it."""

    def next(self, timeout_s: float) -> Capture | None:
        env = self.sub.recv(int(timeout_s * 1000))
        if env is None:
            return None
        g: GameFrame = env.msg
        self.frames += 1
        if lost := self.gaps.see(g.source, g.seq):  # on the way: a full queue, the network
            self.drop("game_frame_lost", lost)
        if self.t0 is None or g.game_time < self.t0:
            self.t0, self.last_tick = g.game_time, None  # first frame, or the game restarted its clock
            self.watch.reset()
        t = g.game_time - self.t0
        recovering = not self.watch.follow(t, g.recovering, g.position, g.speed).driving
        if recovering and not self.recovering:
            self.unstucks += 1
            self._unstuck_due = True
        self.recovering = recovering
        if g.controls is None and not recovering:
            self.reject(
                "no_controls", f"GameFrame {g.source}#{g.seq} has no controls: nothing to label it with"
            )
            return None
        tick = math.floor(t * TICK_HZ + 0.5)
        if self.last_tick is not None and tick <= self.last_tick:
            self.skipped += 1
            return None
        steps = 1 if self.last_tick is None else tick - self.last_tick
        self.last_tick = tick
        unstuck, self._unstuck_due = self._unstuck_due, False
        speed = abs(float(g.speed))
        # while recovering the frame still enters the history and the stack (as the player sees it), braking
        controls = BRAKE if recovering else (float(g.controls[0]), float(g.controls[1]))
        # a frame someone else drove over the autopilot (capture.dagger) is labelled with the autopilot's
        # wish; its controls, the driver's, stay what the car got (the history)
        label = controls if recovering or g.expert is None else (float(g.expert[0]), float(g.expert[1]))
        return Capture(
            game_time=t,
            image=g.frame,
            label=label,
            executed=controls,
            speed=speed,
            purpose=tuple(g.purpose) if g.purpose is not None else (0.0, 0.0),
            driving=not recovering,
            source="npc",
            distance_m=0.0 if recovering else speed * steps / TICK_HZ,
            unstuck=unstuck,
        )

    def info(self) -> dict:
        return {
            "game_frames": self.frames,
            "lost": self.gaps.missing,
            "skipped": self.skipped,
            "unstucks": self.unstucks,
            "recovering": self.recovering,
        }

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------------- gym


class GymSource:
    """A Gymnasium env driven by an expert; one capture per env step, episodes back to back."""

    paced = False

    def __init__(
        self,
        env_id: str,
        expert: str,
        seed: int = 0,
        env_kwargs: dict | None = None,
        action: str = "auto",
        action_table: list | None = None,
    ):
        import gymnasium as gym

        from charles.sim import gym_env

        gym_env.register()
        self.name = f"gym:{env_id}"
        self.env = gym.make(env_id, **(env_kwargs or {}))
        try:
            self.actions = action_adapter(self.env.action_space, action, action_table or ())
        except ValueError as e:
            self.env.close()
            raise ValueError(f"{env_id}: {e}") from None
        self.act = load_callable(expert)(self.env)
        self.seed = seed
        self.episodes = 0
        self.steps = 0
        self.episode_return = 0.0
        self.returns: list[float] = []
        self._reset_next = True
        self._obs: Any = None
        self._info: dict = {}
        self._odometer = 0.0

    def next(self, timeout_s: float = 0.0) -> Capture:
        reset = self._reset_next
        if reset:
            self._obs, self._info = self.env.reset(seed=self.seed + self.episodes)
            self.episodes += 1
            self.episode_return = 0.0
            self._odometer = float(self._info.get("distance_m", 0.0))
            self._reset_next = False
        obs, info = self._obs, self._info
        image, speed, purpose = observation_parts(obs, info)
        action = self.act(obs, info)
        pair = self.actions.from_env(action)
        self._obs, reward, terminated, truncated, self._info = self.env.step(action)
        self.episode_return += float(reward)
        odo = float(self._info.get("distance_m", self._odometer))
        dist, self._odometer = max(0.0, odo - self._odometer), odo
        if terminated or truncated:
            self.returns = [*self.returns[-99:], self.episode_return]
            self._reset_next = True
        game_time = self.steps / TICK_HZ
        self.steps += 1
        return Capture(game_time, image, pair, pair, speed, purpose, True, "npc", dist, reset=reset)

    def info(self) -> dict:
        out = {"episodes": self.episodes, "steps": self.steps}
        if self.returns:
            out["episode_return"] = round(float(np.mean(self.returns)), 2)
        return out

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------------------------- dataset


class DatasetSource:
    """A recorded dataset as a source: its samples in recorded order, once or in a loop.

    ``reject(reason, detail)`` counts each record skipped (``truncated_shard``, ``corrupt_record``,
    ``unreadable_shard``); a dataset with no readable sample at all ends the replay rather than spin.
    """

    paced = False

    def __init__(self, path: str, loop: bool = True, reject: Any = None):
        from pathlib import Path

        from charles.dataset import shards

        if not shards(path):
            raise ValueError(
                f"collector.source dataset:{path}: no shard-*.tar there (charles record makes them)"
            )
        self.name = f"dataset:{Path(path).name}"
        self.path = path
        self.loop = loop
        self.skipped = SkipCounter(reject)
        self.passes = 0
        self.replayed = 0
        self.finished = False
        """The end was reached and loop is off (or a pass held no sample): the collector stops."""
        self._it = self._start()
        self._this_pass = 0

    def _start(self):
        self.passes += 1
        self._this_pass = 0
        return samples(self.path, self.skipped)

    def next(self, timeout_s: float = 0.0) -> Sample | None:
        if self.finished:
            return None
        for _ in range(2):
            s = next(self._it, None)
            if s is not None:
                self._this_pass += 1
                self.replayed += 1
                return s
            if not self.loop or self._this_pass == 0:
                break
            self._it = self._start()
        self.finished = True
        return None

    def info(self) -> dict:
        return {
            "replayed": self.replayed,
            "passes": self.passes,
            "skipped": sum(self.skipped.counts.values()),
        }

    def close(self) -> None:
        pass
