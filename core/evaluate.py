"""``charles eval``: drive with a policy and print its driving figures as one JSON line.

    charles eval --policy npc --seed 1 --minutes 5
    charles eval --policy weights:runs/tiny_v1/latest.safetensors --minutes 5
    charles eval --policy npc --env gym:Charles/Drive-v0 --expert charles.sim.gym_env:npc_expert
    charles eval --policy weights:PATH --env gym:CarRacing-v3 --config deploy/car_racing.yaml --episodes 3
    charles eval --compare runs/tiny/tiny_v1/checkpoints/batch_000000250 runs/tiny/tiny_v1/checkpoints/batch_000000500 npc --minutes 2

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

``--compare A B ...`` drives several checkpoints (weights files or checkpoint folders, and the builtin
policies) in turn on the same towns (``--seeds``, 9001-9003 by default: held out) for the same game time,
pooled as bench/e2e.py and the judge pool (:func:`pool`), and prints a table (km between Unstucks,
on-road fraction, collisions/km, speed, Unstucks, and km between Unstucks per town), writes a PNG
(``--png``: a bar per checkpoint with a dot per town) and ends with one JSON line. Every file is checked
before any drives; a missing or refused one is exit status 2.

``--config``/``--set`` take the ``sim``, ``npc`` and ``unstuck`` sections (and the collector's codec).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from dataclasses import replace
from pathlib import Path
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
    policy: Any,
    seed: int,
    minutes: float,
    cfg: Any,
    noise: bool = False,
    device: str = "cpu",
    should_stop: Any = None,
) -> dict:
    """The sim with Unstuck: charles.sim.evaluate.evaluate, with ``weights:PATH`` as the player drives.

    ``policy`` may also be a ModelPolicy already made (the judge and ``--compare`` load weights once and
    drive them in every town); it is reset first, so no frame of another town stays in its stack.
    ``should_stop`` (no arguments -> bool) ends the drive early, at a tick (the judge's SIGTERM)."""
    from charles.drive.policy import ModelPolicy
    from charles.sim.evaluate import evaluate

    npc = cfg.npc if noise else replace(cfg.npc, noise_rate_hz=0.0)
    sim = cfg.sim
    history_len = 60
    pol: Any = policy
    if isinstance(policy, str) and policy.startswith("weights:"):
        pol = model_policy(policy, cfg, device)
    if isinstance(pol, ModelPolicy):
        pol.reset()
        # Rendered at the model's resolution, as the sim collectors render it: no resize, no second blur.
        sim = replace(sim, hood_width=pol.cfg.width, hood_height=pol.cfg.height)
        history_len = pol.history_rows
    result = evaluate(
        pol,
        seed=seed,
        minutes=minutes,
        sim=sim,
        npc=npc,
        unstuck=cfg.unstuck,
        history_len=history_len,
        should_stop=should_stop,
    )
    result["policy"] = policy if isinstance(policy, str) else "weights"
    return result


def pool(results: list[dict]) -> dict:
    """One policy's figures over several towns of the same game time each: ``km``, ``unstucks`` and
    ``collisions`` summed, ``km_between_unstucks`` = km / max(1, unstucks) of the sums (a car stuck once in
    three towns scores a third of one stuck in each), ``on_road_fraction`` the mean over towns,
    ``mean_speed_kmh`` the pooled km over the pooled driving time. The judge, ``--compare`` and
    bench/e2e.py all pool this way, so their figures compare."""
    km = sum(r["km"] for r in results)
    unstucks = sum(r["unstucks"] for r in results)
    collisions = sum(r["collisions"] for r in results)
    hours = sum(r["km"] / r["mean_speed_kmh"] for r in results if r["mean_speed_kmh"] > 0)
    return {
        "km": round(km, 3),
        "km_between_unstucks": round(km / max(1, unstucks), 4),
        "on_road_fraction": round(sum(r["on_road_fraction"] for r in results) / max(1, len(results)), 4),
        "collisions_per_km": round(collisions / max(km, 0.1), 3),
        "mean_speed_kmh": round(km / hours, 2) if hours > 0 else 0.0,
        "unstucks": unstucks,
        "collisions": collisions,
        "targets_reached": sum(r.get("targets_reached", 0) for r in results),
        "per_seed_km_between_unstucks": [round(r["km_between_unstucks"], 3) for r in results],
        "per_seed_on_road_fraction": [round(r["on_road_fraction"], 4) for r in results],
    }


def drive_towns(
    policy: Any,
    seeds: list[int],
    minutes: float,
    cfg: Any,
    device: str = "cpu",
    should_stop: Any = None,
) -> dict:
    """One policy (a name, ``weights:PATH`` or a ModelPolicy) on each town in turn, pooled (:func:`pool`);
    ``per_seed`` keeps each town's figures. Weights are loaded once for all towns."""
    if isinstance(policy, str) and policy.startswith("weights:"):
        policy = model_policy(policy, cfg, device)
    per_seed = []
    for seed in seeds:
        per_seed.append(evaluate_sim(policy, seed, minutes, cfg, device=device, should_stop=should_stop))
        if should_stop is not None and should_stop():
            break
    return {**pool(per_seed), "per_seed": per_seed}


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


# ---------------------------------------------------------------------------------------------- compare

COMPARE_SEEDS = (9001, 9002, 9003)
"""``--compare``'s towns when ``--seeds`` is not given: the e2e bench's held-out ones."""
_BATCH_DIR = re.compile(r"^batch_(\d+)$")
_RUN_NAME = re.compile(r"_v\d+$")


def checkpoint_weights(spec: str) -> Path:
    """A checkpoint as ``--compare`` names it -> its weights file: a ``.safetensors`` file, or a checkpoint
    folder holding ``weights.safetensors`` (``runs/<line>/<run>/checkpoints/batch_000000392``)."""
    path = Path(spec)
    if path.is_dir():
        inside = path / "weights.safetensors"
        if not inside.is_file():
            raise ValueError(f"{spec}: a folder without weights.safetensors (not a checkpoint folder)")
        return inside
    if not path.is_file():
        raise ValueError(f"{spec}: no such file or checkpoint folder")
    return path


def checkpoint_label(path: Path) -> str:
    """``<run>@<batch>`` where the path says both (a checkpoint of a run), else the file's or folder's name."""
    folder = path.parent if path.name == "weights.safetensors" else None
    m = _BATCH_DIR.match(folder.name) if folder is not None else None
    if m is None:
        return path.stem if folder is None else folder.name
    run = next((p.name for p in folder.parents if _RUN_NAME.search(p.name)), None)
    return f"{run}@{int(m[1])}" if run else f"batch {int(m[1])}"


def compare(specs: list[str], seeds: list[int], minutes: float, cfg: Any, device: str = "cpu") -> list[dict]:
    """Each checkpoint (or ``npc``, ``random``, ``constant``) on the same towns and game time; a row per
    entry: its label, the pooled figures and each town's. Every weights file is checked before any drives,
    so a bad one costs no minutes of driving first."""
    entries: list[tuple[str, Any]] = []
    for spec in specs:
        if spec in ("npc", "random", "constant"):
            entries.append((spec, spec))
            continue
        path = checkpoint_weights(spec)
        entries.append((checkpoint_label(path), model_policy(f"weights:{path}", cfg, device)))
    labels = [label for label, _ in entries]
    seen: dict[str, int] = {}
    for i, label in enumerate(labels):  # the same name twice (two runs' batch_000000100) stays apart
        seen[label] = seen.get(label, 0) + 1
        if labels.count(label) > 1:
            labels[i] = f"{label} ({seen[label]})"
    rows = []
    for label, (spec, (_, policy)) in zip(labels, zip(specs, entries, strict=True), strict=True):
        result = drive_towns(policy, seeds, minutes, cfg, device)
        per_seed = [
            {k: _rounded(r)[k] for k in ("seed", *SIM_KEYS, "unstucks", "collisions")}
            for r in result["per_seed"]
        ]
        rows.append(
            {
                "label": label,
                "checkpoint": spec,
                **{k: result[k] for k in (*SIM_KEYS, "unstucks")},
                "per_seed": per_seed,
            }
        )
    return rows


def compare_table(rows: list[dict], seeds: list[int], minutes: float) -> str:
    """The rows for people: pooled figures, and km between Unstucks per town (the spread)."""
    width = max(10, *(len(r["label"]) for r in rows))
    head = (
        f"{'checkpoint':<{width}}  {'km/unstuck':>10}  {'on-road':>7}  {'coll/km':>7}  {'km/h':>5}  "
        f"{'unstucks':>8}  per town km/unstuck ({', '.join(map(str, seeds))})"
    )
    lines = [f"{len(seeds)} towns, {minutes:g} game minutes each, Unstuck active", head, "-" * len(head)]
    for r in rows:
        towns = ", ".join(f"{t['km_between_unstucks']:.3f}" for t in r["per_seed"])
        lines.append(
            f"{r['label']:<{width}}  {r['km_between_unstucks']:>10.3f}  {r['on_road_fraction']:>7.1%}  "
            f"{r['collisions_per_km']:>7.2f}  {r['mean_speed_kmh']:>5.1f}  {r['unstucks']:>8}  {towns}"
        )
    return "\n".join(lines)


def compare_png(rows: list[dict], path: str | Path, title: str = "") -> Path:
    """Two panels: km between Unstucks and on-road fraction per checkpoint, a bar for the pooled figure
    and a dot per town (the spread over seeds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [r["label"] for r in rows]
    x = np.arange(len(rows))
    fig, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.4 * len(rows) + 3), 4.2), dpi=100)
    for ax, key, name in (
        (axes[0], "km_between_unstucks", "km between Unstucks"),
        (axes[1], "on_road_fraction", "on-road fraction"),
    ):
        ax.bar(x, [r[key] for r in rows], color="#ff9f1c", alpha=0.55, label="pooled over towns")
        for i, r in enumerate(rows):
            ys = [t[key] for t in r["per_seed"]]
            jitter = np.linspace(-0.15, 0.15, len(ys)) if len(ys) > 1 else np.zeros(1)
            ax.scatter(i + jitter, ys, color="#1f3b57", s=18, zorder=3, label="one town" if i == 0 else None)
        ax.set_xticks(x, labels, rotation=20, ha="right", fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        if key == "on_road_fraction":
            ax.set_ylim(0, 1.02)
    axes[0].legend(fontsize=7, loc="upper left")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)
    plt.close(fig)
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
    ap.add_argument(
        "--compare",
        nargs="+",
        metavar="CHECKPOINT",
        help="drive several checkpoints (weights files or checkpoint folders; npc, random, constant too) on "
        "the same towns (--seeds) and print a table, a PNG (--png) and one JSON line",
    )
    ap.add_argument(
        "--seeds",
        help=f"--compare: towns, comma-separated (default {','.join(map(str, COMPARE_SEEDS))}: held out)",
    )
    ap.add_argument(
        "--png", default="compare.png", help="--compare: the picture's path (default compare.png)"
    )
    config_mod.add_arguments(ap, "configuration file for the sim, npc, unstuck and collector sections")
    args = ap.parse_args(argv)
    if args.minutes <= 0 and args.episodes is None:
        ap.error("--minutes must be > 0")
    try:
        cfg = config_mod.load(args.config, overrides=args.set)
    except ValueError as e:
        print(f"charles eval: configuration error: {e}", file=sys.stderr)
        return 2
    if args.compare:
        if args.env:
            ap.error("--compare drives the sim's towns; --env is not supported with it")
        try:
            seeds = (
                [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else list(COMPARE_SEEDS)
            )
        except ValueError:
            ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
        try:
            rows = compare(args.compare, seeds, args.minutes, cfg, args.device)
        except (ValueError, OSError) as e:  # a missing or refused checkpoint: named, nothing driven yet
            print(f"charles eval --compare: {e}", file=sys.stderr)
            return 2
        print(compare_table(rows, seeds, args.minutes))
        png = compare_png(rows, args.png, f"{len(seeds)} towns x {args.minutes:g} game min")
        print(f"picture: {png}")
        print(json.dumps({"seeds": seeds, "minutes": args.minutes, "png": str(png), "rows": rows}))
        return 0
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
