"""``charles eval``: drive with a policy and print its driving figures as one JSON line.

    charles eval --policy npc --seed 1 --minutes 5
    charles eval --policy weights:runs/tiny_v1/latest.safetensors --minutes 5
    charles eval --policy npc --env gym:Charles/Drive-v0 --expert charles.sim.gym_env:npc_expert
    charles eval --policy weights:PATH --env gym:CarRacing-v3 --config deploy/car_racing.yaml --episodes 3

The sim (default): ``minutes`` of game time with Unstuck active (charles.sim.evaluate.evaluate), giving
``km``, ``km_between_unstucks``, ``on_road_fraction``, ``collisions_per_km``, ``mean_speed_kmh`` and the
sim's extras (unstucks, collisions, water_entries, targets_reached, ticks, wall_s).

Policies: ``npc`` (the autopilot, no noise unless ``--noise``), ``random``, ``constant``, and
``weights:PATH``: a safetensors file driven through :class:`charles.drive.policy.ModelPolicy`, the
player's code path (the hood camera rendered at the model's resolution, through the collectors' codec,
speed, purpose, its own past actions as history, the frame stack).

``--env gym:ID`` drives a Gymnasium environment instead, episodes back to back for ``minutes`` of 30 Hz
steps (or ``--episodes``), adding ``episode_return`` (mean over finished episodes). Where the env's info
has ``distance_m``, ``on_road`` and ``collisions`` (Charles/Drive-v0 does) the driving figures come too;
there is no Unstuck in an env, so ``km_between_unstucks`` divides by the episodes that ended early
(``terminated``: water, a crash). ``--policy npc`` means the ``--expert`` there; ``constant`` is straight
ahead at half throttle, as in the sim. The env's action layout is ``collector.gym_action`` (and
``gym_action_table``), the collector's: a model drives through the same adapter that labels an expert.

``--config``/``--set`` take the ``sim``, ``npc`` and ``unstuck`` sections (and the collector's codec).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from typing import Any

import numpy as np

from charles.cli import help_text

SIM_KEYS = ("km", "km_between_unstucks", "on_road_fraction", "collisions_per_km", "mean_speed_kmh")
"""The figures every evaluation prints (the gym path prints null where an env cannot tell)."""
DEFAULT_EXPERT = "charles.sim.gym_env:npc_expert"


def model_policy(spec: str, cfg: Any, device: str = "cpu") -> Any:
    """``weights:PATH`` -> ModelPolicy with the collectors' codec (what the trainer saw)."""
    from charles.drive.policy import ModelPolicy

    path = spec.split(":", 1)[1]
    if not path:
        raise ValueError("weights:PATH needs a path to a safetensors file")
    return ModelPolicy.from_weights(
        path, codec=cfg.collector.codec, quality=cfg.collector.quality, device=device
    )


def evaluate_sim(
    policy: str, seed: int, minutes: float, cfg: Any, noise: bool = False, device: str = "cpu"
) -> dict:
    """The sim with Unstuck: charles.sim.evaluate.evaluate, with ``weights:PATH`` as the player drives."""
    from charles.sim.evaluate import evaluate

    npc = cfg.npc if noise else replace(cfg.npc, noise_rate_hz=0.0)
    sim = cfg.sim
    history_len = 60
    pol: Any = policy
    if policy.startswith("weights:"):
        pol = model_policy(policy, cfg, device)
        # Rendered at the model's resolution, as the sim collectors render it: no resize, no second blur.
        sim = replace(sim, hood_width=pol.cfg.width, hood_height=pol.cfg.height)
        history_len = pol.history_rows
    result = evaluate(
        pol, seed=seed, minutes=minutes, sim=sim, npc=npc, unstuck=cfg.unstuck, history_len=history_len
    )
    result["policy"] = policy
    return result


def _gym_actor(policy: str, env: Any, expert: str, seed: int, cfg: Any, device: str, actions: Any) -> Any:
    from charles.drive.gym import load_callable
    from charles.drive.policy import GymPolicy

    if policy == "npc":
        return load_callable(expert)(env)
    if policy == "random":
        space = env.action_space
        space.seed(seed)
        return lambda obs, info: space.sample()
    if policy == "constant":  # the sim's constant: straight ahead at half throttle, in the env's layout
        action = actions.to_env(0.0, 0.5)
        return lambda obs, info: action
    if policy.startswith("weights:"):
        mp = model_policy(policy, cfg, device)
        return GymPolicy(mp, mp.history_rows, actions)
    raise ValueError(f"unknown policy {policy!r}: npc, random, constant or weights:PATH")


def evaluate_env(
    env_id: str,
    policy: str,
    seed: int = 0,
    minutes: float = 1.0,
    episodes: int | None = None,
    expert: str = DEFAULT_EXPERT,
    cfg: Any = None,
    env_kwargs: dict | None = None,
    device: str = "cpu",
) -> dict:
    """Episodes of a Gymnasium env back to back for ``minutes`` of 30 Hz steps (or ``episodes``)."""
    import gymnasium as gym

    from charles import config as config_mod
    from charles.drive.gym import action_adapter
    from charles.sim import gym_env

    cfg = cfg or config_mod.load(environ={})
    gym_env.register()
    env = gym.make(env_id, **(env_kwargs or {}))
    try:
        actions = action_adapter(env.action_space, cfg.collector.gym_action, cfg.collector.gym_action_table)
    except ValueError as e:
        env.close()
        raise ValueError(f"{env_id}: {e}") from None
    steps_budget = int(round(minutes * 60 * 30))
    returns: list[float] = []
    lengths: list[int] = []
    terminations = steps = on_road = collisions = 0
    metres = 0.0
    has_driving = True
    t0 = time.perf_counter()
    try:
        act = _gym_actor(policy, env, expert, seed, cfg, device, actions)
        ep = 0
        while (episodes is None and steps < steps_budget) or (episodes is not None and ep < episodes):
            obs, info = env.reset(seed=seed + ep)
            if hasattr(act, "reset"):
                act.reset()
            odo0 = info.get("distance_m")
            coll0 = info.get("collisions")
            total, n, done, terminated = 0.0, 0, False, False
            while not done:
                obs, reward, terminated, truncated, info = env.step(act(obs, info))
                total += float(reward)
                n += 1
                steps += 1
                if "on_road" in info:
                    on_road += int(bool(info["on_road"]))
                else:
                    has_driving = False
                done = terminated or truncated or (episodes is None and steps >= steps_budget)
            ep += 1
            if odo0 is not None and "distance_m" in info:
                metres += float(info["distance_m"]) - float(odo0)
            if coll0 is not None and "collisions" in info:
                collisions += int(info["collisions"]) - int(coll0)
            if terminated or truncated or not returns:
                returns.append(total)  # finished episodes; the cut-off last one only if none finished
                lengths.append(n)
            terminations += int(terminated)
    finally:
        env.close()
    km = metres / 1000.0
    hours = steps / 30.0 / 3600.0
    out: dict[str, Any] = {
        "policy": policy,
        "env_id": env_id,
        "seed": seed,
        "minutes": minutes,
        "ticks": steps,
        "episodes": len(returns),
        "episode_return": float(np.mean(returns)) if returns else 0.0,
        "episode_return_std": float(np.std(returns)) if returns else 0.0,
        "episode_length": float(np.mean(lengths)) if lengths else 0.0,
        "terminations": terminations,
    }
    if has_driving and steps:
        out.update(
            km=km,
            km_between_unstucks=km / max(1, terminations),
            on_road_fraction=on_road / steps,
            collisions=collisions,
            collisions_per_km=collisions / max(km, 0.1),
            mean_speed_kmh=km / hours if hours > 0 else 0.0,
        )
    else:
        out.update(dict.fromkeys(SIM_KEYS))
    out["wall_s"] = time.perf_counter() - t0
    return out


def _rounded(result: dict) -> dict:
    return {k: (round(v, 4) if isinstance(v, float) and math.isfinite(v) else v) for k, v in result.items()}


def main(argv: list[str] | None = None) -> int:
    from charles import config as config_mod

    ap = argparse.ArgumentParser(prog="charles eval", description=help_text(__doc__.split("\n\n")[0]))
    ap.add_argument("--policy", default="npc", help="npc | random | constant | weights:PATH (default npc)")
    ap.add_argument(
        "--seed", type=int, default=0, help="sim seed (town, spawn, targets) or first episode seed"
    )
    ap.add_argument("--minutes", type=float, default=10.0, help="game time to drive, minutes (default 10)")
    ap.add_argument("--env", help="gym:ID to drive a Gymnasium environment instead of the sim")
    ap.add_argument(
        "--expert", help="gym: module:callable expert factory for --policy npc (default: collector.expert)"
    )
    ap.add_argument("--episodes", type=int, help="gym: run exactly this many episodes instead of --minutes")
    ap.add_argument("--noise", action="store_true", help="npc: keep the collectors' noise injection on")
    ap.add_argument("--device", default="cpu", help="weights: torch device (cpu, cuda)")
    config_mod.add_arguments(ap, "configuration file for the sim, npc, unstuck and collector sections")
    args = ap.parse_args(argv)
    if args.minutes <= 0 and args.episodes is None:
        ap.error("--minutes must be > 0")
    try:
        cfg = config_mod.load(args.config, overrides=args.set)
    except ValueError as e:
        print(f"charles eval: configuration error: {e}", file=sys.stderr)
        return 2
    try:
        if args.env:
            kind, _, env_id = args.env.partition(":")
            if kind != "gym" or not env_id:
                ap.error(f"--env must look like gym:ID, got {args.env!r}")
            result = evaluate_env(
                env_id,
                args.policy,
                args.seed,
                args.minutes,
                args.episodes,
                args.expert or cfg.collector.expert,
                cfg,
                cfg.collector.gym_kwargs,
                args.device,
            )
        else:
            if args.policy not in ("npc", "random", "constant") and not args.policy.startswith("weights:"):
                ap.error(f"unknown policy {args.policy!r}: npc, random, constant or weights:PATH")
            result = evaluate_sim(args.policy, args.seed, args.minutes, cfg, args.noise, args.device)
    except (ValueError, OSError) as e:  # a refused weights file (WeightsError is a ValueError), a bad env id
        print(f"charles eval: {e}", file=sys.stderr)
        return 2
    print(json.dumps(_rounded(result)))
    return 0


if __name__ == "__main__":
    from charles.runtime import run_main

    run_main(main)
