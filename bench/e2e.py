"""The learning proof: the whole pipeline trains live, then the newest weights drive unseen towns.

    python bench/e2e.py [--quick] [--minutes 20] [--collectors 2] [--[no-]dagger] [--eval-minutes 5]
    make bench-e2e                       # the same, 20 minutes

1. ``charles up`` (the launcher) with ``--random-ports``, a fresh temporary run directory and the CPU demo
   configuration (``deploy/demo.yaml``; ``--set section.field=value`` and ``--[no-]dagger`` go on top, into a
   copy in the temporary directory): a broker, K sim collectors (seeds 1..K), the balancer, the trainer,
   the player (seed 1000) and the judge (the live driving score, niced). No viewer: nobody watches, and its
   core share goes to training.
2. While it trains, the bench listens on the bus like any other subscriber (heartbeats, the trainer's
   console, the judge's scores) and prints a progress line every ~30 s: batches, loss, buffer fill, samples
   in and out, the newest driving score. ``first_weights_s`` is the time from the launcher's start to the
   first heartbeat in which the player drives *trained* weights (``model_batch`` > 0). ``score_curve`` is
   every score the judge published for the trainer's run while it trained: ``batch``, ``minutes`` (since
   the launcher started), ``km_between_unstucks`` and ``on_road_fraction`` on the judge's towns
   (``judge.seeds``, ``judge.minutes`` each; ``judge_reference`` the NPC's there); ``--no-judge`` runs
   without it.
3. After ``--minutes`` (longer, up to 4x, while the trainer has trained fewer than ``--until-batches``, the
   player drives no trained weights yet or the judge has published no score: smoke runs on a busy box) the launcher is stopped (SIGINT: the trainer writes its final checkpoint) and the
   newest checkpoint's weights (``charles.trainer.runs.newest_weights``) are evaluated with ``charles eval``
   on held-out towns (``--eval-seeds``, 9001-9003 by default: towns no collector and no player drove),
   ``--eval-minutes`` of game time per seed, against the NPC (noise off) and the random policy on the
   same seeds, with the same sim, NPC and Unstuck settings.

Pooling: per policy, ``km`` and ``unstucks`` are summed over the seeds and ``km_between_unstucks`` is
``km / max(1, unstucks)`` of the sums; ``collisions_per_km`` likewise; ``on_road_fraction`` is the mean
over seeds (same game time each); ``mean_speed_kmh`` is the pooled km over the pooled driving time. The NPC
is rarely ever stuck, so its figure is close to all the km it drives in the budget (about 0.67 km per
minute): the player reaches half of it only by driving about as far with at most one Unstuck per
15 minutes of game time. The ratios are in ``player_vs_npc`` and ``player_vs_random``.

``--quick``: 1 minute of training, 0.25 minutes per eval seed (about 2 minutes in all; a smoke run, not a
proof). The last stdout line is one JSON object.

Honest figures: before anything it measures the box's own torch step (bench/trainer.py's, the tiny line at
160x90; ``box.torch_step_img_s``) and says so when the box is under ``FLOOR_IMG_S``, the slowest box the
figures are stated for. ``--runs N`` (``make bench-e2e RUNS=3``) runs N independent pipelines one after the
other and reports each headline figure's median and spread (min, max), every run's own figures under
``each``; batches and samples always stand beside the minutes. ``collector_flow_mean`` is the collectors'
mean pace scale under flow control (``--set collector.flow=false`` to compare without it).

Variety: ``--eval-looks config,rain@19,clear@23`` drives the i-th held-out town under the i-th look (noon as
configured, rainy dusk, night), and each policy gets ``per_look`` figures beside the pooled ones. Training
under varied skies is ``--set collector.look=vary`` (a new weather and hour at every restart and Unstuck).

A Gymnasium env instead of the sim: a configuration whose ``collector.source`` is ``gym:ID`` (e.g.
``deploy/car_racing.yaml``). The collectors' expert drives the env; no player runs while it trains (the
player drives the sim); the newest weights then drive one episode of the env per eval seed through
``charles eval --env`` (the player's code path and the collectors' action adapter), beside the expert
(``npc``) and random, and each policy's figure is ``episode_return`` (mean and std over the seeds);
``player_vs_npc`` and ``player_vs_random`` are ratios of those means.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from charles.evaluate import pool  # noqa: E402

from _common import report  # noqa: E402

DEMO = ROOT / "deploy" / "demo.yaml"
EVAL_SEEDS = (9001, 9002, 9003)
"""Towns nobody drove while training: collectors use seed 1..K, the player 1000 (launcher --seed 0)."""
PROGRESS_S = 30.0
STOP_TIMEOUT_S = 120.0
FLOOR_IMG_S = 70.0
"""The slowest box the figures are stated for: the tiny line's torch step in img/s (bench/trainer.py). The
slowest 2-core box seen so far ran 74.5; the README's figures come from one at 234."""
KEYS = ("km", "km_between_unstucks", "on_road_fraction", "collisions_per_km", "mean_speed_kmh")


# ---- configuration ----------------------------------------------------------------------------------------


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def run_config(base: Path, overrides: list[str], dagger: bool | None) -> dict:
    """The demo configuration with the bench's overrides on top (values parsed as YAML, as --set does)."""
    data = yaml.safe_load(base.read_text()) if base.is_file() else {}
    data = data or {}
    for item in overrides:
        if "=" not in item:
            raise SystemExit(f"e2e: --set {item!r} must look like section.field=value")
        k, v = item.split("=", 1)
        _set_path(data, k.strip(), yaml.safe_load(v) if v else "")
    if dagger is not None:  # else what the configuration says (the demo: on)
        _set_path(data, "player.dagger", bool(dagger))
    # no viewer, so no camera stream: its pictures (a render and two JPEGs per frame) would take the
    # cores' time from training (unless --set player.camera_hz=... asks for it)
    data.setdefault("player", {}).setdefault("camera_hz", 0)
    return data


# ---- watching the run -------------------------------------------------------------------------------------


class Watcher:
    """Heartbeats and the trainer's console off the bus: what the progress lines and the JSON report."""

    def __init__(self, bus_ports: dict[str, int], t0: float):
        from charles import config
        from charles.runtime import Service

        cfg = config.load(data={"bus": {"host": "127.0.0.1", "ports": bus_ports}}, environ={})
        self.svc = Service("e2e", cfg, instance="e2e-bench", http=False, signals=False)
        # the trainer's console carries samples trained and per-output losses (its heartbeat only scalars);
        # the judge's scores (score.<run>) are the driving-score curve
        self.sub = self.svc.subscriber(["heartbeat.", "console.trainer", "score."], late_join=False)
        self.t0 = t0
        self.wall0 = time.time() - (time.monotonic() - t0)
        """The launcher's start as Unix time: a score point's ``minutes`` count from it."""
        self.scores: dict[str, dict[int, dict[str, Any]]] = {}
        """run -> batch -> score point, every one heard (a score carries its version's curve so far)."""
        self.reference: dict[str, Any] | None = None
        self.beats: dict[str, Any] = {}
        self.trainer: dict[str, Any] = {}
        self.first_weights_s: float | None = None
        self.first_batch: int | None = None
        self.flow_sum, self.flow_n = 0.0, 0
        """Collectors' flow scales heard (flow control): their mean over the run."""

    def poll(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            env = self.sub.recv(max(1, int(min(left, 0.2) * 1000)))
            if env is None:
                continue
            msg = env.msg
            if env.topic.startswith("heartbeat."):
                self.beats[msg.instance] = msg
                flow = msg.info.get("flow") if msg.service == "collector" else None
                if isinstance(flow, int | float):
                    self.flow_sum, self.flow_n = self.flow_sum + flow, self.flow_n + 1
                if msg.service == "player" and self.first_weights_s is None:
                    batch = msg.info.get("model_batch", -1)
                    if isinstance(batch, int) and batch > 0:
                        self.first_weights_s = time.monotonic() - self.t0
                        self.first_batch = batch
            elif env.topic.startswith("score."):
                self.on_score(msg)
            elif getattr(msg, "service", "") == "trainer":
                self.trainer = dict(msg.state)

    def on_score(self, s: Any) -> None:
        points = self.scores.setdefault(s.run, {})
        for batch, judged, kmbu, on_road in s.curve:  # the curve so far: a score missed on the way is in it
            points[int(batch)] = {
                "batch": int(batch),
                "minutes": round((judged - self.wall0) / 60, 2),
                "km_between_unstucks": round(kmbu, 4),
                "on_road_fraction": round(on_road, 4),
            }
        if s.reference is not None:
            ref = s.reference
            self.reference = {
                "km_between_unstucks": round(ref.km_between_unstucks, 4),
                "on_road_fraction": round(ref.on_road_fraction, 4),
                "collisions_per_km": round(ref.collisions_per_km, 3),
                "mean_speed_kmh": round(ref.mean_speed_kmh, 2),
                "seeds": list(s.seeds),
                "minutes_per_seed": s.minutes,
            }

    def score_curve(self, run: str | None = None) -> list[dict[str, Any]]:
        """The trainer's run's points, oldest first (the run with most points when it is not known)."""
        if run is None or run not in self.scores:
            run = max(self.scores, key=lambda r: len(self.scores[r]), default=None)
        return [p for _, p in sorted(self.scores.get(run, {}).items())] if run else []

    def of(self, service: str) -> list[dict]:
        return [hb.info for hb in self.beats.values() if hb.service == service]

    def counts(self) -> dict[str, Any]:
        collectors = self.of("collector")
        balancer = (self.of("balancer") or [{}])[0]
        player = (self.of("player") or [{}])[0]
        tr = self.trainer
        return {
            "samples_collected": sum(int(c.get("samples", 0)) for c in collectors),
            "collector_km": round(sum(float(c.get("km", 0.0)) for c in collectors), 2),
            "samples_arrived": int(balancer.get("arrived", 0)),
            "samples_balanced": int(balancer.get("emitted", 0)),
            "samples_dagger": int(player.get("dagger_samples", 0)),
            "samples_dagger_balanced": int(balancer.get("emitted_dagger", 0)),
            "batches": int(tr.get("batch", 0)),
            "samples_trained": int(tr.get("samples", 0)),
            "player_batch": player.get("model_batch", -1),
            "player_unstucks": player.get("unstucks", 0),
            "collector_flow_mean": round(self.flow_sum / self.flow_n, 3) if self.flow_n else None,
            "collector_flow_now": [c["flow"] for c in collectors if "flow" in c],
            "trainer_demand": (self.of("trainer") or [{}])[0].get("demand"),
        }

    def line(self) -> str:
        tr = self.trainer
        c = self.counts()
        fills = " ".join(
            f"{name.split('_')[0][:5]} {b['fill'] / max(1, b['capacity']):.2f}"
            for name, b in (tr.get("buffers") or {}).items()
        )
        loss = tr.get("loss") or {}
        losses = " ".join(f"{k[:5]} {v:.4f}" for k, v in loss.items())
        first = f"{self.first_weights_s:.0f}s" if self.first_weights_s is not None else "not yet"
        curve = self.score_curve(tr.get("run"))
        score = (
            f"  score {curve[-1]['km_between_unstucks']:.3f} km/unstuck, {curve[-1]['on_road_fraction']:.0%} on road"
            f" (batch {curve[-1]['batch']})"
            if curve
            else ""
        )
        return (
            f"[{time.monotonic() - self.t0:5.0f}s] {tr.get('status', 'starting')}: batch {c['batches']}"
            f" ({tr.get('batches_per_s', 0):.2f}/s, data wait {tr.get('data_wait', 0):.0%})  loss {losses or '-'}"
            f"  fill {fills or '-'}"
            f"  collected {c['samples_collected']}  balanced {c['samples_balanced']}"
            f"  trained {c['samples_trained']}"
            + (f"  dagger {c['samples_dagger']}" if c["samples_dagger"] else "")
            + (
                f"  pace x{min(c['collector_flow_now']):.2f}..{max(c['collector_flow_now']):.2f}"
                f" (demand {c['trainer_demand']})"
                if c["collector_flow_now"]
                else ""
            )
            + f"  player batch {c['player_batch']} (first trained weights: {first})"
            + score
        )

    def close(self) -> None:
        self.svc.close()


# ---- evaluation -------------------------------------------------------------------------------------------


def parse_look(look: str) -> list[str]:
    """``config`` (the run's sim.weather and sim.time_of_day) or ``WEATHER@HOUR`` -> charles eval's --set."""
    from charles.sim.config import WEATHERS

    if look == "config":
        return []
    weather, sep, hour = look.partition("@")
    try:
        h = float(hour)
    except ValueError:
        h = -1.0
    if not sep or weather not in WEATHERS or not 0 <= h <= 24:
        raise SystemExit(
            f"e2e: a look is config or WEATHER@HOUR with a weather of {', '.join(WEATHERS)} and an hour "
            f"in 0..24 (rain@19.5), not {look!r}"
        )
    return ["--set", f"sim.weather={weather}", "--set", f"sim.time_of_day={h}"]


def eval_one(
    policy: str, seed: int, minutes: float, config: Path, env_id: str | None = None, look: str = "config"
) -> dict:
    cmd = [sys.executable, "-m", "charles.cli", "eval", "--policy", policy, "--seed", str(seed)]
    cmd += ["--env", f"gym:{env_id}", "--episodes", "1"] if env_id else ["--minutes", str(minutes)]
    cmd += ["--config", str(config), *([] if env_id else parse_look(look))]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": os.environ.get("CUDA_VISIBLE_DEVICES", ""),
    }
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=3600)
    if out.returncode != 0:
        raise RuntimeError(
            f"charles eval {policy} seed {seed} failed ({out.returncode}): {out.stderr[-2000:]}"
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def pooled_returns(results: list[dict]) -> dict:
    """One policy's episode returns over the seeds (one episode each) of a Gymnasium env."""
    returns = [r["episode_return"] for r in results]
    return {
        "episode_return": round(statistics.fmean(returns), 2),
        "episode_return_std": round(statistics.pstdev(returns), 2),
        "episode_length": round(statistics.fmean(r["episode_length"] for r in results), 1),
        "per_seed_return": [round(x, 2) for x in returns],
    }


def evaluate(
    weights: Path | None,
    seeds: list[int],
    minutes: float,
    config: Path,
    jobs: int,
    env_id: str | None = None,
    looks: list[str] | None = None,
) -> dict:
    """Every policy on every seed, the i-th seed under the i-th look (the looks repeat when fewer); with
    more than one look each policy also gets ``per_look`` figures."""
    looks = looks or ["config"]
    look_of = {s: looks[i % len(looks)] for i, s in enumerate(seeds)}
    policies = {"npc": "npc", "random": "random"}
    if weights is not None:
        policies["player"] = f"weights:{weights}"
    work = [(name, pol, s) for name, pol in policies.items() for s in seeds]
    with ThreadPoolExecutor(max_workers=jobs) as executor:
        done = list(
            executor.map(
                lambda w: (w[0], w[2], eval_one(w[1], w[2], minutes, config, env_id, look_of[w[2]])), work
            )
        )
    out: dict[str, Any] = {"player": None}
    pool_of = pooled_returns if env_id else pool
    for name in policies:
        out[name] = pool_of([r for n, _, r in done if n == name])
        if len(set(look_of.values())) > 1 and not env_id:
            out[name]["per_look"] = {
                look: pool_of([r for n, s, r in done if n == name and look_of[s] == look])
                for look in dict.fromkeys(look_of.values())
            }
    return out


def ratio(player: dict | None, other: dict, key: str, digits: int) -> float | None:
    return round(player[key] / max(abs(other[key]), 1e-9), digits) if player else None


# ---- the run ----------------------------------------------------------------------------------------------


def stop(launcher: subprocess.Popen) -> str:
    if launcher.poll() is None:
        launcher.send_signal(signal.SIGINT)
    try:
        out, _ = launcher.communicate(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        launcher.kill()
        out, _ = launcher.communicate()
    return out or ""


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="1 minute of training, 0.25 min per eval seed (smoke)"
    )
    ap.add_argument("--minutes", type=float, default=None, help="live training time (default 20; quick 1)")
    ap.add_argument("--collectors", type=int, default=2, help="sim collectors (default 2)")
    ap.add_argument(
        "--dagger",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="player.dagger: the player's frames, labelled by the NPC, train too (default: the config's)",
    )
    ap.add_argument(
        "--eval-minutes",
        type=float,
        default=None,
        help="game minutes per policy and seed (default 5; quick 0.25)",
    )
    ap.add_argument(
        "--eval-seeds", default=",".join(map(str, EVAL_SEEDS)), help="held-out towns, comma-separated"
    )
    ap.add_argument(
        "--eval-jobs", type=int, default=2, help="evaluations run side by side (default 2: the cores)"
    )
    ap.add_argument(
        "--until-batches",
        type=int,
        default=0,
        help="train past --minutes until the trainer has trained this many batches and the player drives "
        "trained weights, at most 4x --minutes (smoke runs on a slow or busy box: the trainer's and the "
        "player's start alone may take most of a short run)",
    )
    ap.add_argument(
        "--judge",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="run the judge (the live driving score: score_curve); default: on for the sim, off for a gym env",
    )
    ap.add_argument("--config", default=str(DEMO), help="base run configuration (default deploy/demo.yaml)")
    ap.add_argument(
        "--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="override a setting"
    )
    ap.add_argument(
        "--eval-looks",
        default="config",
        help="the sky of each held-out town in turn: config (the run's sim section) or WEATHER@HOUR, "
        "comma-separated (e.g. config,rain@19,clear@23: noon, rainy dusk, night); more than one adds "
        "per-look figures",
    )
    ap.add_argument(
        "--runs",
        type=int,
        default=1,
        help="independent runs, one after the other; above 1 the report is each figure's median and spread",
    )
    ap.add_argument(
        "--keep",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="keep the temporary run directory (logs, checkpoints); default: kept for runs over 3 minutes",
    )
    args = ap.parse_args()
    if args.runs < 1:
        raise SystemExit("e2e: --runs must be at least 1")
    minutes = args.minutes if args.minutes is not None else (1.0 if args.quick else 20.0)
    eval_minutes = args.eval_minutes if args.eval_minutes is not None else (0.25 if args.quick else 5.0)
    seeds = [int(s) for s in args.eval_seeds.split(",") if s.strip()]
    for look in args.eval_looks.split(","):  # a typo fails now, not after the training
        parse_look(look.strip())
    box = box_speed()
    print(
        f"e2e: this box trains the tiny line at {box['torch_step_img_s']:.1f} img/s (160x90, batch 32, one "
        f"thread); the figures are stated for boxes of at least {FLOOR_IMG_S:g}"
        + ("" if box["above_floor"] else " -- THIS BOX IS SLOWER: expect less learning per minute"),
        flush=True,
    )
    runs = []
    for i in range(args.runs):
        if args.runs > 1:
            print(f"e2e: run {i + 1} of {args.runs}", flush=True)
        runs.append(one_run(args, minutes, eval_minutes, seeds))
    figures = dict(runs[0]) if len(runs) == 1 else summarise(runs)
    figures["box"] = box
    report(figures)
    return 0


def box_speed() -> dict:
    """The box's own torch step speed (bench/trainer.py's step of the tiny line): a learning figure per
    minute means little without it (the same run trained 769 batches on one 2-core box, 6,000 on another)."""
    from trainer import step_rate

    img_s = step_rate("tiny", (90, 160), 32, steps=3, repeats=2)
    return {
        "torch_step_img_s": round(img_s, 1),
        "floor_img_s": FLOOR_IMG_S,
        "above_floor": img_s >= FLOOR_IMG_S,
    }


SUMMARISED = {
    "player_vs_npc": ("player_vs_npc",),
    "player_vs_random": ("player_vs_random",),
    "player_km_between_unstucks": ("player", "km_between_unstucks"),
    "player_on_road_fraction": ("player", "on_road_fraction"),
    "npc_km_between_unstucks": ("npc", "km_between_unstucks"),
    "first_weights_s": ("first_weights_s",),
    "batches": ("batches",),
    "samples_collected": ("samples_collected",),
    "samples_trained": ("samples_trained",),
    "minutes_trained": ("minutes_trained",),
}
"""The figures --runs N reports as median, min and max over the runs."""


def summarise(runs: list[dict]) -> dict:
    """Median and spread (min, max) of the headline figures over independent runs, and every run's own."""

    def get(run: dict, path: tuple[str, ...]) -> float | None:
        v: Any = run
        for k in path:
            v = v.get(k) if isinstance(v, dict) else None
        return v if isinstance(v, int | float) else None

    median, spread = {}, {}
    for name, path in SUMMARISED.items():
        values = [v for r in runs if (v := get(r, path)) is not None]
        if values:
            median[name] = round(statistics.median(values), 4)
            spread[name] = [round(min(values), 4), round(max(values), 4)]
    return {"runs": len(runs), "median": median, "spread": spread, "each": runs}


def one_run(args: argparse.Namespace, minutes: float, eval_minutes: float, seeds: list[int]) -> dict:
    """One independent run: a fresh pipeline in a fresh directory, trained, stopped, evaluated."""
    tmp = Path(tempfile.mkdtemp(prefix="charles-e2e-"))
    cfg_path = tmp / "run.yaml"
    run_data = run_config(Path(args.config), args.set, args.dagger)
    source = str(run_data.get("collector", {}).get("source", "sim"))
    env_id = source.partition(":")[2] if source.startswith("gym:") else None
    dagger = bool(run_data.get("player", {}).get("dagger", False)) and env_id is None
    judge = (env_id is None) if args.judge is None else args.judge  # the judge drives the sim's towns
    cfg_path.write_text(yaml.safe_dump(run_data, sort_keys=False))
    runs, logs = tmp / "runs", tmp / "logs"
    print(
        f"e2e: {minutes:g} min of live training, {args.collectors} collectors, dagger {dagger}; "
        f"config {args.config} (+ {args.set or 'no overrides'}); run dir {tmp}",
        flush=True,
    )

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("CHARLES_CONFIG", None)
    t0 = time.monotonic()
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charles.launcher",
            "--collectors",
            str(args.collectors),
            "--config",
            str(cfg_path),
            "--run-dir",
            str(runs),
            "--logs",
            str(logs),
            "--random-ports",
            "--plain",
            "--no-viewer",
            *(["--no-player"] if env_id else []),  # the player drives the sim, not the env
            *([] if judge else ["--no-judge"]),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=str(tmp),
    )
    watcher = None
    launcher_out = ""
    try:
        ports_file = logs / "ports.json"
        while not ports_file.is_file():
            if launcher.poll() is not None or time.monotonic() - t0 > 30:
                raise RuntimeError(f"the launcher did not start: {stop(launcher)[-3000:]}")
            time.sleep(0.1)
        watcher = Watcher(json.loads(ports_file.read_text())["bus"], t0)
        deadline, cap = t0 + minutes * 60, t0 + 4 * minutes * 60
        next_line = t0 + PROGRESS_S

        def short() -> bool:
            """Not yet what --until-batches asks: that many batches and, where a player runs, trained
            weights driven by it (a player's start takes a minute on a busy box)."""
            if not args.until_batches:
                return False
            return (
                watcher.counts()["batches"] < args.until_batches
                or (env_id is None and watcher.first_weights_s is None)
                or (judge and not watcher.score_curve())
            )

        while (now := time.monotonic()) < deadline or (now < cap and short()):
            if launcher.poll() is not None:
                raise RuntimeError(f"the launcher stopped early: {stop(launcher)[-3000:]}")
            watcher.poll(max(0.05, min(1.0, deadline - now)))
            if time.monotonic() >= next_line:
                next_line += PROGRESS_S
                print(watcher.line(), flush=True)
        trained_s = time.monotonic() - t0
        watcher.poll(0.5)
        counts = watcher.counts()
        print(watcher.line(), flush=True)
        print("e2e: stopping the pipeline (the trainer writes its final checkpoint)", flush=True)
        launcher_out = stop(launcher)
    finally:
        if launcher.poll() is None:
            stop(launcher)
        if watcher is not None:
            watcher.close()

    from charles.trainer.runs import list_runs

    run = (list_runs(runs) or [None])[-1]
    weights = run.newest_weights() if run is not None else None
    manifest = run.manifest if run is not None else None
    if manifest is not None:  # the final checkpoint's counters: exact, after the last heartbeat
        counts["batches"] = max(counts["batches"], int(manifest.batch))
        counts["samples_trained"] = max(counts["samples_trained"], int(manifest.samples))
    print(
        f"e2e: evaluating {weights.parent.name if weights else 'no weights'} against npc and random on seeds {seeds}, "
        + (f"one episode of {env_id} each" if env_id else f"{eval_minutes:g} game minutes each"),
        flush=True,
    )
    t_eval = time.monotonic()
    looks = [x.strip() for x in args.eval_looks.split(",") if x.strip()]
    ev = evaluate(weights, seeds, eval_minutes, cfg_path, max(1, args.eval_jobs), env_id, looks)
    player, npc, rnd = ev["player"], ev["npc"], ev["random"]
    key = "episode_return" if env_id else "km_between_unstucks"
    figures = {
        "minutes_trained": round(trained_s / 60, 2),
        "batches": counts["batches"],
        "samples_collected": counts["samples_collected"],
        "samples_balanced": counts["samples_balanced"],
        "samples_trained": counts["samples_trained"],
        "samples_dagger": counts["samples_dagger"],
        "samples_dagger_balanced": counts["samples_dagger_balanced"],
        "first_weights_s": round(watcher.first_weights_s, 1) if watcher.first_weights_s is not None else None,
        "dagger": dagger,
        "collectors": args.collectors,
        "collector_km": counts["collector_km"],
        "collector_flow_mean": counts["collector_flow_mean"],
        "weights": str(weights.parent.name) if weights else None,
        "eval": {
            "seeds": seeds,
            "minutes_per_seed": None if env_id else eval_minutes,
            "looks": None if env_id else {s: looks[i % len(looks)] for i, s in enumerate(seeds)},
            "wall_s": round(time.monotonic() - t_eval, 1),
        },
        "player": player,
        "npc": npc,
        "random": rnd,
        "player_vs_npc": ratio(player, npc, key, 3),
        "player_vs_random": ratio(player, rnd, key, 1),
        "score_curve": watcher.score_curve(run.name if run is not None else None) if judge else None,
        "judge_reference": watcher.reference if judge else None,
        "env": env_id,
        "quick": args.quick,
        "config": str(args.config),
        "overrides": args.set,
    }
    keep = args.keep if args.keep is not None else minutes > 3
    if not keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        figures["run_dir"] = str(tmp)
    if "all stopped" not in launcher_out:
        print(f"e2e: the launcher did not report a clean stop:\n{launcher_out[-2000:]}", file=sys.stderr)
    return figures


if __name__ == "__main__":
    sys.exit(main())
