"""Does the judge starve training? The trainer's batches/s with and without a busy judge beside it.

    python bench/judge_load.py [--quick] [--seconds 90] [--rounds 2] [--trainer-threads 1] [--unniced]

A real broker (the CPU demo's configuration, deploy/demo.yaml), and in turn:

- ``alone``: a training process steps the demo's model (the tiny line with the demo's overrides, batch 32,
  ``--trainer-threads`` torch threads, the trainer's own ``Trainer`` on an assembled batch of synthetic
  road frames) for ``--seconds`` and publishes its weights every 20 batches, as the trainer does;
- ``judge``: the same, with ``python -m charles.judge`` running (``judge.nice`` 10, one torch thread) and
  judging back to back (``every_batches`` 1: every judging finds newer weights), its two towns at the demo's
  half game minute each. The ``--seconds`` are counted from the judge's first finished judging on, so the
  window has the judge driving all along (its start, torch and the model, is not measured);
- ``judge_unniced`` (``--unniced``): the judge at nice 0, to show what the nice buys.

Phases alternate for ``--rounds`` rounds (a shared box's load drifts); each figure is the mean over rounds.
Reported: ``batches_per_s`` per phase, ``ratio`` (judge / alone), the judge's CPU share over its window
(``judge_cpu``, of one core) and its judgings. On a busy 2-core box with other work, expect noise of a few
per cent between rounds (``per_round`` keeps them). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

DEMO = ROOT / "deploy" / "demo.yaml"
PUBLISH_EVERY = 20
"""Batches between two weights publications (the demo trainer's publish_every)."""
JUDGE_START_S = 900.0
"""How long the judge may take to start and finish its first judging: at nice 10 on a 2-core box at load 14
one took over 5 minutes (the nice doing its work); a phase that runs out is reported as failed."""


# ---- the training process ---------------------------------------------------------------------------------


def worker(bus_ports: dict[str, int], seconds: float, threads: int, version: int) -> None:
    """Train the demo's model on one assembled batch for ``seconds``; print each step's end (Unix time).

    Each phase's training publishes as a version of its own (``<line>_v<version>``): its batches count
    from 1 again, and the broker still holds the previous phase's newest weights, which a judge would keep
    as newer (older_batch) and never judge again."""
    import torch

    torch.set_num_threads(threads)
    from trainer import batch_config, filled_buffers  # bench/trainer.py: the trainer's data path

    from charles import config
    from charles.model.weights import save_weights
    from charles.proto import Weights
    from charles.runtime import Service
    from charles.trainer.batches import BatchAssembler
    from charles.trainer.synthetic import make_frames
    from charles.trainer.training import Trainer

    cfg = config.load(str(DEMO), environ={})
    mcfg = cfg.model.resolve()
    trainer = Trainer(mcfg, cfg.trainer, "cpu")
    frames = make_frames(8, height=mcfg.height, width=mcfg.width)
    batch = cfg.trainer.batch_size
    asm = BatchAssembler(
        filled_buffers(frames, batch, history_len=mcfg.history_length),
        batch_config(mcfg, batch, decode_threads=1),
    )
    b = asm.next_batch(timeout=5)
    asm.close()
    svc = Service(
        "trainer",
        config.load(data={"bus": {"host": "127.0.0.1", "ports": bus_ports}}, environ={}),
        instance="trainer-bench",
        http=False,
        signals=False,
    )
    pub = svc.publisher("weights")
    trainer.step(b)  # the first step allocates
    times: list[float] = []
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))  # the bench says when its window is over
    end = time.time() + seconds
    n = 0
    while time.time() < end and not stop:
        trainer.step(b)
        n += 1
        times.append(time.time())
        if n % PUBLISH_EVERY == 1:
            payload = save_weights(trainer.model, mcfg)
            w = Weights(mcfg.name, f"{mcfg.name}_v{version}", n, mcfg.to_dict(), payload, created=time.time())
            pub.send(f"weights.{mcfg.name}", w)
    svc.close()
    print(json.dumps({"times": times}), flush=True)


# ---- the phases -------------------------------------------------------------------------------------------


def _metric(port: int, name: str) -> float | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process (and its finished children), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def _rate(times: list[float], since: float) -> tuple[float, int]:
    inside = [t for t in times if t >= since]
    if len(inside) < 2:
        return 0.0, len(inside)
    return (len(inside) - 1) / (inside[-1] - inside[0]), len(inside)


def phase(
    name: str, env: dict, seconds: float, threads: int, nice: int | None, tmp: Path, version: int
) -> dict:
    """One phase: the training process alone for ``seconds`` (after 5 s of warm-up), or with the judge
    (``nice``) for ``seconds`` from the judge's first finished judging on (its start is not measured)."""
    judge = None
    http = None
    if nice is not None:
        from charles.runtime import free_ports

        (http,) = free_ports(1)
        jenv = {
            **env,
            "CHARLES__SERVICE__HTTP_PORT": str(http),
            "CHARLES__JUDGE__NICE": str(nice),
            "CHARLES__JUDGE__EVERY_BATCHES": "1",
            "CHARLES__JUDGE__REFERENCE": "false",
        }
        log = open(tmp / f"judge-{name}.log", "ab")  # noqa: SIM115 - the child's; closed below
        judge = subprocess.Popen([sys.executable, "-m", "charles.judge"], env=jenv, stdout=log, stderr=log)
        log.close()
    started = time.time()
    train = subprocess.Popen(
        [sys.executable, __file__, "--worker", "--bus", env["CHARLES__BUS__PORTS"], "--seconds", "3600",
         "--trainer-threads", str(threads), "--version", str(version)],
        env=env, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    since = started + 5.0  # past the first steps' warm-up
    cpu0 = cpu1 = judgings = None
    try:
        if judge is not None:
            deadline = time.time() + JUDGE_START_S
            while (_metric(http, "charles_judge_judgings_total") or 0) < 1:
                if time.time() > deadline or judge.poll() is not None or train.poll() is not None:
                    print(
                        f"judge_load: {name}: no judging finished; see {tmp / f'judge-{name}.log'}",
                        flush=True,
                    )
                    return {"failed": "the judge finished no judging in time"}
                time.sleep(0.5)
            since = time.time()
            cpu0 = _cpu_s(judge.pid)
        time.sleep(max(0.0, since + seconds - time.time()))
        if judge is not None:
            cpu1 = _cpu_s(judge.pid)
            judgings = _metric(http, "charles_judge_judgings_total")
        train.send_signal(signal.SIGTERM)
        out, _ = train.communicate(timeout=120)
    finally:
        for p in (train, judge):
            if p is not None and p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    times = json.loads(out.strip().splitlines()[-1])["times"]
    rate, n = _rate(times, since)
    window = times[-1] - since if times else 0.0
    res = {"batches_per_s": round(rate, 3), "batches": n, "window_s": round(window, 1)}
    if judge is not None:
        res["judgings"] = int(judgings or 0)
        if window > 0:
            res["judge_cpu"] = round((cpu1 - cpu0) / window, 3)
    print(f"judge_load: {name}: {json.dumps(res)}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--quick", action="store_true", help="10 s per phase, one round, the judge's towns small (smoke)"
    )
    ap.add_argument("--seconds", type=float, default=None, help="measured training per phase (default 90)")
    ap.add_argument("--rounds", type=int, default=None, help="rounds of the phases (default 2; quick 1)")
    ap.add_argument("--trainer-threads", type=int, default=1, help="torch threads of the training (demo: 1)")
    ap.add_argument("--unniced", action="store_true", help="also a phase with the judge at nice 0")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--bus", help=argparse.SUPPRESS)
    ap.add_argument("--version", type=int, default=1, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(json.loads(args.bus), args.seconds, args.trainer_threads, args.version)
        return 0
    seconds = args.seconds if args.seconds is not None else (10.0 if args.quick else 90.0)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else 2)

    from charles.runtime import free_ports

    tmp = Path(tempfile.mkdtemp(prefix="charles-judge-load-"))
    from charles.proto import registry

    names = list(registry().ports)
    bus = dict(zip(names, free_ports(len(names)), strict=True))
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "CUDA_VISIBLE_DEVICES": "",
        "CHARLES_CONFIG": str(DEMO),
        "CHARLES__BUS__PORTS": json.dumps(bus),
        "CHARLES_HTTP_EPHEMERAL": "1",
        "CHARLES_RUN_DIR": str(tmp / "runs"),
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).resolve().parent), os.environ.get("PYTHONPATH", "")]
        ),
    }
    broker_log = open(tmp / "broker.log", "ab")  # noqa: SIM115 - the child's; closed below
    broker = subprocess.Popen(
        [sys.executable, "-m", "charles.broker"], env=env, stdout=broker_log, stderr=broker_log
    )
    broker_log.close()
    plan = [("alone", None), ("judge", 10)] + ([("judge_unniced", 0)] if args.unniced else [])
    per_round: dict[str, list[dict]] = {n: [] for n, _ in plan}
    try:
        time.sleep(2.0)
        print(
            f"judge_load: {rounds} round(s) of {[n for n, _ in plan]}, {seconds:g} s of training each; "
            f"logs in {tmp}",
            flush=True,
        )
        version = 0
        for _ in range(rounds):
            for name, nice in plan:
                version += 1
                per_round[name].append(phase(name, env, seconds, args.trainer_threads, nice, tmp, version))
    finally:
        broker.send_signal(signal.SIGTERM)
        broker.wait(30)
    out: dict = {"seconds": seconds, "rounds": rounds, "trainer_threads": args.trainer_threads}
    for name, all_results in per_round.items():
        results = [r for r in all_results if "failed" not in r] or [{"batches_per_s": 0.0}]
        out[name] = {
            "batches_per_s": round(statistics.fmean(r["batches_per_s"] for r in results), 3),
            **(
                {
                    "judgings": sum(r.get("judgings", 0) for r in results),
                    "judge_cpu": round(statistics.fmean(r.get("judge_cpu", 0.0) for r in results), 3),
                }
                if name != "alone"
                else {}
            ),
        }
    alone = out["alone"]["batches_per_s"]
    out["ratio"] = round(out["judge"]["batches_per_s"] / alone, 3) if alone else None
    if args.unniced:
        out["ratio_unniced"] = round(out["judge_unniced"]["batches_per_s"] / alone, 3) if alone else None
    out["per_round"] = per_round
    out["cpus"] = os.cpu_count()
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    report(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
