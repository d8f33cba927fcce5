"""Evaluation core: how well does a policy drive? Plain functions the ``charles eval`` CLI wraps.

:func:`evaluate` drives the sim for M minutes of game time with Unstuck active and returns

- ``km``: distance driven while driving (not while Unstuck recovers; teleports do not count);
- ``unstucks``: Unstuck teleports (stuck for the window, or in water);
- ``km_between_unstucks``: ``km / max(1, unstucks)``: a run with no unstuck scores its whole distance;
- ``on_road_fraction``: share of driving ticks with the car's centre on asphalt;
- ``collisions`` and ``collisions_per_km``: contacts with buildings, obstacles or cars, per km with the km
  floored at 0.1 so a policy that barely moves gets a large, finite number;
- ``mean_speed_kmh``: ``km`` over the driving time;
- ``water_entries``, ``targets_reached``, ``minutes``, ``ticks``.

A policy is ``"npc"``, ``"random"``, ``"constant"`` or any callable
``policy(frame, speed, purpose, history) -> (steering, throttle_brake)`` (see :class:`Policy`). A callable
may set ``needs_frame = False`` to skip rendering, and may have ``bind(world)`` (called once) and
``reset()`` (called after every Unstuck teleport).

:func:`evaluate_gym` runs episodes of any Gymnasium environment instead and reports ``episode_return``.

Run: ``python -m charles.sim.evaluate --policy npc --minutes 20`` (prints one JSON line).
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Protocol

import numpy as np

from charles.drive.gym import load_callable
from charles.drive.unstuck import UnstuckConfig
from charles.sim.config import NpcConfig, SimConfig
from charles.sim.npc import Npc
from charles.sim.session import DriveSession
from charles.sim.world import SimWorld


class Policy(Protocol):
    """What a driver looks like to the evaluation (and to the player loop)."""

    def __call__(
        self, frame: np.ndarray | None, speed: float, purpose: tuple[float, float], history: np.ndarray
    ) -> tuple[float, float]:
        """frame: hood camera RGB uint8 (None if needs_frame is False); speed m/s; purpose (angle rad, m);
        history float32 [T, 5] of HISTORY_FIELDS, oldest first. Returns (steering, throttle_brake)."""
        ...


class NpcPolicy:
    """The NPC autopilot as a policy; it reads the world, not the frame."""

    needs_frame = False

    def __init__(self, cfg: NpcConfig | None = None):
        self.cfg = cfg or NpcConfig(noise_rate_hz=0.0)
        self.npc: Npc | None = None

    def bind(self, world: SimWorld) -> None:
        self.npc = Npc(world, cfg=self.cfg)

    def reset(self) -> None:
        if self.npc is not None:
            self.npc.reset()

    def __call__(
        self, frame: np.ndarray | None, speed: float, purpose: tuple[float, float], history: np.ndarray
    ) -> tuple[float, float]:
        if self.npc is None:
            raise RuntimeError("NpcPolicy needs bind(world) before use")
        _, executed = self.npc.act()
        return executed


class RandomPolicy:
    """Uniform random controls every tick: the floor any learned driver must beat by far."""

    needs_frame = False

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng([seed, 7])

    def __call__(
        self, frame: np.ndarray | None, speed: float, purpose: tuple[float, float], history: np.ndarray
    ) -> tuple[float, float]:
        st, tb = self.rng.uniform(-1.0, 1.0, 2)
        return float(st), float(tb)


class ConstantPolicy:
    """The same controls forever (default: straight ahead at half throttle)."""

    needs_frame = False

    def __init__(self, steering: float = 0.0, throttle_brake: float = 0.5):
        self.action = (float(steering), float(throttle_brake))

    def __call__(
        self, frame: np.ndarray | None, speed: float, purpose: tuple[float, float], history: np.ndarray
    ) -> tuple[float, float]:
        return self.action


BUILTIN = {"npc": NpcPolicy, "random": RandomPolicy, "constant": ConstantPolicy}


def make_policy(policy: str | Callable, seed: int = 0, npc: NpcConfig | None = None) -> Callable:
    """A policy object from a builtin name, a ``module:callable`` spec or a callable."""
    if callable(policy):
        return policy
    if policy == "npc":
        return NpcPolicy(npc)
    if policy == "random":
        return RandomPolicy(seed)
    if policy == "constant":
        return ConstantPolicy()
    if ":" in policy:
        return load_callable(policy)
    raise ValueError(f"unknown policy {policy!r}; use one of {sorted(BUILTIN)} or 'module:callable'")


def evaluate(
    policy: str | Callable,
    seed: int = 0,
    minutes: float = 10.0,
    sim: SimConfig | None = None,
    npc: NpcConfig | None = None,
    unstuck: UnstuckConfig | None = None,
    history_len: int = 60,
    should_stop: Callable[[], bool] | None = None,
) -> dict:
    """Drive ``minutes`` of game time with ``policy`` and Unstuck; the metrics of the module docstring.

    ``should_stop`` is asked once a game second (and while the town is built): True ends the drive there,
    and the result says ``stopped`` (its figures cover the ticks driven)."""
    sim = sim or SimConfig()
    world = SimWorld(replace(sim, seed=seed), should_stop=should_stop)
    pol = make_policy(policy, seed, npc)
    if hasattr(pol, "bind"):
        pol.bind(world)
    session = DriveSession(world, unstuck or UnstuckConfig(), history_len)
    if hasattr(pol, "reset"):
        session.teleport_hooks.append(pol.reset)
    needs_frame = bool(getattr(pol, "needs_frame", True))
    ticks = int(round(minutes * 60 * 30))
    driving = on_road = collisions = 0
    metres = 0.0
    t0 = time.perf_counter()
    stopped = False
    for tick_no in range(ticks):
        if should_stop is not None and tick_no % 30 == 0 and should_stop():
            stopped = True
            break
        obs = session.observe(frame=needs_frame)
        action = pol(obs.frame, obs.speed, obs.purpose, obs.history) if obs.driving else (0.0, -1.0)
        tick = session.step(action)
        if tick.unstuck.driving:
            driving += 1
            on_road += int(tick.info.on_road)
            collisions += int(tick.info.new_collision)
            metres += tick.info.distance_m
    km = metres / 1000.0
    hours = driving / 30.0 / 3600.0
    unstucks = session.unstuck.unstucks
    return {
        "policy": policy if isinstance(policy, str) else getattr(policy, "__name__", type(policy).__name__),
        "seed": seed,
        "minutes": minutes,
        "ticks": ticks,
        "km": km,
        "unstucks": unstucks,
        "km_between_unstucks": km / max(1, unstucks),
        "on_road_fraction": on_road / max(1, driving),
        "collisions": collisions,
        "collisions_per_km": collisions / max(km, 0.1),
        "mean_speed_kmh": km / hours if hours > 0 else 0.0,
        "water_entries": world.water_entries,
        "targets_reached": world.targets_reached,
        "wall_s": time.perf_counter() - t0,
        **({"stopped": True} if stopped else {}),
    }


# --- any Gymnasium environment ----------------------------------------------------------------------------
def _gym_actor(spec: str | Callable | None, env) -> Callable | None:
    """An ``act(obs, info) -> action`` from a builtin name, a callable, or a ``module:callable`` factory.

    A ``module:callable`` expert is a *factory*: called with the environment, it returns the actor (so an
    expert can hold state or read the environment, as the sim's NPC expert does).
    """
    if spec is None:
        return None
    if spec == "random":
        space = env.action_space
        return lambda obs, info: space.sample()
    if spec == "constant":
        space = env.action_space
        mid = (space.low + space.high) / 2 if hasattr(space, "low") else space.sample()
        return lambda obs, info: mid
    if isinstance(spec, str):
        return load_callable(spec)(env)
    if len(inspect.signature(spec).parameters) == 1:
        return spec(env)
    return spec


def evaluate_gym(
    env_id: str,
    policy: str | Callable = "expert",
    expert: str | Callable | None = None,
    episodes: int = 3,
    seed: int = 0,
    max_steps: int | None = None,
    env_kwargs: dict[str, Any] | None = None,
) -> dict:
    """Run ``episodes`` of a Gymnasium environment; mean ``episode_return`` and, with an expert, agreement.

    ``policy``: ``"expert"`` (drive with the expert), ``"random"``, ``"constant"``, a ``module:callable``
    factory, or ``act(obs, info) -> action``. ``expert``: a ``module:callable`` factory (called with the
    env, returns ``act(obs, info)``). With both a non-expert policy and an expert, ``expert_mae`` is the
    mean absolute difference between their actions on the policy's own states (what DAgger labels).
    """
    import gymnasium as gym

    from charles.sim import gym_env

    gym_env.register()
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        expert_act = _gym_actor(expert, env)
        if policy == "expert":
            if expert_act is None:
                raise ValueError("policy='expert' needs an expert")
            act, compare = expert_act, None
        else:
            act, compare = _gym_actor(policy, env), expert_act
        env.action_space.seed(seed)
        returns, lengths, diffs = [], [], []
        for ep in range(episodes):
            obs, info = env.reset(seed=seed + ep)
            total, steps, done = 0.0, 0, False
            while not done:
                action = np.asarray(act(obs, info), dtype=np.float32)
                if compare is not None:
                    diffs.append(np.abs(action - np.asarray(compare(obs, info), np.float32)).mean())
                obs, reward, terminated, truncated, info = env.step(action)
                total += float(reward)
                steps += 1
                done = terminated or truncated or (max_steps is not None and steps >= max_steps)
            returns.append(total)
            lengths.append(steps)
    finally:
        env.close()
    out = {
        "env_id": env_id,
        "episodes": episodes,
        "episode_return": float(np.mean(returns)),
        "episode_return_std": float(np.std(returns)),
        "episode_length": float(np.mean(lengths)),
    }
    if diffs:
        out["expert_mae"] = float(np.mean(diffs))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m charles.sim.evaluate``: one JSON line of metrics on stdout."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--policy", default="npc", help="npc | random | constant | module:callable")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--minutes", type=float, default=10.0, help="game time to drive, minutes")
    ap.add_argument("--noise", action="store_true", help="npc: keep the collectors' noise injection on")
    ap.add_argument("--traffic", type=int, default=None, help="other cars (default: SimConfig's)")
    ap.add_argument("--weather", default=None)
    ap.add_argument("--blocks", type=int, default=None, help="town size in blocks (default: SimConfig's)")
    args = ap.parse_args(argv)
    sim = SimConfig(seed=args.seed)
    if args.traffic is not None:
        sim.traffic = args.traffic
    if args.weather:
        sim.weather = args.weather
    if args.blocks:
        sim.blocks = args.blocks
    npc = NpcConfig() if args.noise else NpcConfig(noise_rate_hz=0.0)
    result = evaluate(args.policy, seed=args.seed, minutes=args.minutes, sim=sim, npc=npc)
    print(
        json.dumps(
            {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}
        )
    )


if __name__ == "__main__":
    main()
