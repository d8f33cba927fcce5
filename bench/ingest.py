"""Ingest capacity: how many collectors one box serves, and which stage gives out first.

    python bench/ingest.py [--quick] [--rates 1000,2000,...,12000] [--step-s 8] [--collectors 100]
                           [--frame sim|40k]

Real processes on loopback, as ``charles up`` runs them, with the CPU demo's configuration
(``deploy/demo.yaml``): the broker, the balancer (v3 on steering) and the trainer (the tiny line on the
CPU, its buffers so large and ``start_fraction`` 1.0 that it never trains: only its receiver, buffers and
storage work). Synthetic collectors publish ``sample.*`` of a 480x270
JPEG (the sim's hood frame, ~15 KB, or a textured ~40 KB one like a game's) with NPC-like labels; the
``--collectors`` identities (100 by default: the seed ran 3-5) are spread over two publisher processes
and paced together to each offered rate in turn, ``--step-s`` seconds per rate.

Per step (``steps``), from each service's ``/metrics`` (as an operator reads them) and ``/proc``:
- ``offered``: samples/s the publishers sent; ``broker_in``: samples/s the broker took in;
  ``balancer_in``: samples/s that reached the balancer; ``balanced_out``: samples/s it sent in sets;
  ``trainer_in``: samples/s of those that reached the trainer's buffers;
- drops counted on the way (the broker's queue overflows, the receivers' sequence gaps) and each
  process's CPU share (1.0 = one core).

``totals``: every count over the whole run, read once the last sets have landed (nothing lost means
``sent`` = ``broker_in`` = ``balancer_in`` and ``balanced_out`` = ``trainer_in``).

A stage *keeps up* at a step when it takes in at least 97 % of what the stage before it sent and nothing
on its way was counted lost. ``samples_per_s`` is the highest offered rate that every stage kept up with
(what the box sustains end to end); ``saturating_stage`` is the first stage that did not keep up at the
next rate (``none`` when all did at the highest). Goal on a 2-core box: >= 3,000 samples/s (100
collectors at 30 Hz). The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import report  # noqa: E402

GOAL = 3000
DEMO = ROOT / "deploy" / "demo.yaml"
"""The CPU demo's configuration (its balancing: nine steering bins, sets every ~0.1 s at the sim's rate)."""
KEEP_UP = 0.97
SETTLE_S = 2.0
"""Seconds each step runs before it is measured: queues reach their level for the new rate."""
PUBLISHERS = 2
DRAIN_S = 15.0
"""After the last step: how long the counts may take to settle (sets still on their way)."""
STAGES = ("broker_in", "balancer_in", "trainer_in")
"""Stages in the order data reaches them (``offered`` feeds the first; the balancer's sets feed the trainer)."""


# ---- a publisher process: many collector identities, paced together ---------------------------------------


def publish(port: int, ids: list[str], frame_kind: str, plan: list[tuple[float, float]]) -> None:
    """Send ``sample.<id>`` round-robin over ``ids`` at each (rate, seconds) of ``plan``: says ``ready`` on
    stdout once loaded and connected, starts at the wall time read from stdin, and prints the samples sent
    per step as one JSON line when done."""
    import numpy as np
    import zmq

    from charles.balancer.synthetic import synthetic_labels
    from charles.proto import Sample, encode

    frame = _frame(frame_kind)
    # shuffled: a hundred collectors interleave many drives, so every bin shows up at its long-run share
    # from the start (one drive's first minutes may lack a hard left turn, and the sets would wait for it)
    labels = (
        np.random.default_rng(os.getpid()).permutation(synthetic_labels(20_000, seed=os.getpid())).tolist()
    )
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 100_000)  # the broker's queues are under test, not this socket's
    pub.connect(f"tcp://127.0.0.1:{port}")
    seqs = dict.fromkeys(ids, 0)
    sent = []
    k = 0
    print("ready", flush=True)
    t0 = float(sys.stdin.readline())
    while time.time() < t0:
        time.sleep(0.005)
    start = time.monotonic()
    for rate, seconds in plan:
        n, end = 0, start + seconds
        while (now := time.monotonic()) < end:
            due = int((now - start) * rate) - n
            for _ in range(max(0, due)):
                cid = ids[k % len(ids)]
                s, tb = labels[k % len(labels)]
                prev = labels[(k - 1) % len(labels)]
                seq = seqs[cid]
                seqs[cid] = seq + 1
                sample = Sample(cid, seq, seq / 30.0, frame, s, tb, 12.0, (0.1, 150.0), previous=tuple(prev))
                pub.send_multipart(encode(f"sample.{cid}", sample, cid), copy=False)
                k += 1
                n += 1
            time.sleep(0.002)
        sent.append(n)
        start = end
    print(json.dumps({"sent": sent}), flush=True)
    pub.close(linger=2000)
    ctx.term()


def _frame(kind: str):
    import numpy as np

    from charles.proto import Frame

    if kind == "40k":
        rng = np.random.default_rng(0)
        noise = np.clip(rng.normal(110, 50, (27, 48, 3)), 0, 255).astype(np.uint8)
        return Frame.encode(np.ascontiguousarray(np.repeat(np.repeat(noise, 10, 0), 10, 1)), "jpeg", 85)
    from charles.sim.world import SimWorld

    world = SimWorld()
    for _ in range(60):
        world.step(0.0, 0.5)
    return Frame.encode(world.hood_frame(), "jpeg", 90)


# ---- the services -----------------------------------------------------------------------------------------


class Stack:
    """Broker, balancer and trainer as processes on free loopback ports, logs in a temporary folder."""

    def __init__(self, tmp: Path):
        from charles.proto import registry
        from charles.runtime import free_ports

        self.tmp = tmp
        names = list(registry().ports)  # every bus port, as charles up --random-ports gives them
        ports = free_ports(len(names) + 3)
        self.bus = dict(zip(names, ports, strict=False))
        self.http = dict(zip(["broker", "balancer", "trainer"], ports[len(names) :], strict=True))
        self.procs: dict[str, subprocess.Popen] = {}
        trainer = [
            "--preset", "tiny", "--id", "trainer-ingest",
            "--set", "trainer.device=cpu",
            "--set", "trainer.buffer.capacity=1000000",  # never full: it only receives and stores
            "--set", "trainer.buffer.start_fraction=1.0",
            "--set", "trainer.publish_on_start=false",
            "--set", f"trainer.storage.path={tmp / 'buffers.sqlite3'}",
        ]  # fmt: skip
        demo = ["--config", str(DEMO)]
        self._start("broker", [])
        self._start("balancer", [*demo, "--id", "balancer-ingest", "--set", "balancer.picture_s=0"])
        self._start("trainer", [*demo, *trainer])

    def _start(self, name: str, args: list[str]) -> None:
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "OMP_NUM_THREADS": "1",
            "CHARLES_RUN_DIR": str(self.tmp / "runs"),
            "CHARLES__BUS__HOST": "127.0.0.1",
            "CHARLES__BUS__PORTS": json.dumps(self.bus),
            "CHARLES__SERVICE__HTTP_PORT": str(self.http[name]),
            "CHARLES__SERVICE__LOG_LEVEL": "WARNING",
        }
        with open(self.tmp / f"{name}.log", "ab") as out:
            self.procs[name] = subprocess.Popen(
                [sys.executable, "-m", f"charles.{name}", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        for name in self.procs:
            while self.metrics(name) is None:
                if self.procs[name].poll() is not None or time.monotonic() > deadline:
                    log = (self.tmp / f"{name}.log").read_text()[-2000:]
                    raise SystemExit(f"ingest: the {name} did not come up:\n{log}")
                time.sleep(0.2)

    def metrics(self, name: str) -> dict[tuple[str, tuple], float] | None:
        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http[name]}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return None
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds each service has used (user + system, from /proc)."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for name, p in self.procs.items():
            try:
                fields = Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()
                out[name] = (int(fields[11]) + int(fields[12])) / tick
            except OSError:
                out[name] = float("nan")
        return out

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in self.procs.values():
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def total(m: dict, name: str, **labels: str) -> float:
    """Sum of a metric's samples whose labels include ``labels``."""
    want = set(labels.items())
    return sum(v for (n, lab), v in m.items() if n == name and want <= set(lab))


def counts(stack: Stack) -> dict[str, float]:
    """Cumulative counts along the path, read from the services' /metrics."""
    b, bal, tr = (stack.metrics(n) or {} for n in ("broker", "balancer", "trainer"))
    return {
        "broker_in": total(b, "charles_messages_total", direction="through", topic="sample"),
        "broker_drops": total(b, "charles_drops_total", cause="queue_overflow_sample"),
        "broker_set_drops": total(b, "charles_drops_total", cause="queue_overflow_set"),
        "balancer_in": total(
            bal, "charles_messages_total", direction="in", topic="sample"
        ),  # live; arrived is 1 Hz
        "balanced_out": total(bal, "charles_balancer_samples_emitted_total"),
        "balancer_gaps": total(bal, "charles_drops_total", cause="seq_gap"),
        "balancer_sets": total(bal, "charles_messages_total", direction="out", topic="set"),
        "trainer_sets": total(tr, "charles_messages_total", direction="in", topic="set"),
        "trainer_in": total(tr, "charles_trainer_samples_inserted_total"),
        "trainer_gaps": total(tr, "charles_drops_total", cause="seq_gap"),
    }


def settled(stack: Stack) -> dict[str, float]:
    """The counts once nothing moves any more (two reads 2 s apart agree), at most :data:`DRAIN_S`."""
    deadline = time.monotonic() + DRAIN_S
    last = counts(stack)
    while time.monotonic() < deadline:
        time.sleep(2.0)
        now = counts(stack)
        if now == last:
            break
        last = now
    return last


def step_figures(offered: float, a: dict, b: dict, cpu_a: dict, cpu_b: dict, dt: float) -> dict:
    rate = {k: (b[k] - a[k]) / dt for k in a}
    fig = {
        "offered": round(offered),
        **{k: round(rate[k]) for k in ("broker_in", "balancer_in", "balanced_out", "trainer_in")},
        "lost": {
            "broker_queue": round(rate["broker_drops"] * dt),
            "broker_set_queue": round(rate["broker_set_drops"] * dt),
            "balancer_seq_gaps": round(rate["balancer_gaps"] * dt),
            "trainer_seq_gaps": round(rate["trainer_gaps"] * dt),
        },
        "cpu": {k: round((cpu_b[k] - cpu_a[k]) / dt, 2) for k in cpu_a},
    }
    # the trainer is judged by sets, counted the moment they leave and arrive (the samples figures are
    # refreshed once or twice a second), with two sets of slack: one may be on its way at either end
    upstream = {"broker_in": offered, "balancer_in": rate["broker_in"], "trainer_in": rate["balancer_sets"]}
    took = {
        "broker_in": rate["broker_in"],
        "balancer_in": rate["balancer_in"],
        "trainer_in": rate["trainer_sets"],
    }
    slack = {"broker_in": 1.0, "balancer_in": 1.0, "trainer_in": 2.0 / dt}
    lost = {
        "broker_in": 0,
        "balancer_in": rate["broker_drops"] + rate["balancer_gaps"],
        "trainer_in": rate["broker_set_drops"] + rate["trainer_gaps"],
    }
    fig["kept_up"] = {s: bool(took[s] >= KEEP_UP * upstream[s] - slack[s] and lost[s] == 0) for s in STAGES}
    return fig


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="two short steps (well under a minute)")
    ap.add_argument(
        "--rates", default="1000,2000,3000,4000,6000,8000,10000,12000", help="offered samples/s, in order"
    )
    ap.add_argument("--step-s", type=float, default=8.0, help="seconds measured at each rate")
    ap.add_argument("--collectors", type=int, default=100, help="collector identities in all")
    ap.add_argument("--frame", choices=("sim", "40k"), default="sim", help="the frame every sample carries")
    ap.add_argument("--publish", help=argparse.SUPPRESS)  # internal: run as a publisher process
    args = ap.parse_args(argv)

    if args.publish:
        job = json.loads(args.publish)
        publish(job["port"], job["ids"], job["frame"], [tuple(x) for x in job["plan"]])
        return 0

    rates = [300.0, 1000.0] if args.quick else [float(r) for r in args.rates.split(",")]
    step_s = 4.0 if args.quick else args.step_s
    tmp = Path(tempfile.mkdtemp(prefix="charles-bench-ingest-"))
    stack = Stack(tmp)
    pubs: list[subprocess.Popen] = []
    try:
        stack.wait_ready()
        ids = [f"ingest-{i:03d}" for i in range(args.collectors)]
        plan = [(r / PUBLISHERS, SETTLE_S + step_s) for r in rates]
        for p in range(PUBLISHERS):
            job = {"port": stack.bus["publish"], "ids": ids[p::PUBLISHERS], "frame": args.frame, "plan": plan}
            pubs.append(
                subprocess.Popen(
                    [sys.executable, __file__, "--publish", json.dumps(job)],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )
        for p in pubs:
            if p.stdout.readline().strip() != "ready":
                raise SystemExit("ingest: a publisher did not start (its error is above)")
        t0 = time.time() + 1.0  # connected a second before the first step: no slow joiner loses samples
        for p in pubs:
            p.stdin.write(f"{t0}\n")
            p.stdin.flush()
        steps = []
        begin = t0
        for rate in rates:
            time.sleep(max(0.0, begin + SETTLE_S - time.time()))
            a, cpu_a, ta = counts(stack), stack.cpu_s(), time.monotonic()
            time.sleep(max(0.0, begin + SETTLE_S + step_s - time.time()))
            b, cpu_b, tb = counts(stack), stack.cpu_s(), time.monotonic()
            fig = step_figures(rate, a, b, cpu_a, cpu_b, tb - ta)
            steps.append(fig)
            print(
                f"offered {fig['offered']:>6}/s  broker {fig['broker_in']:>6}  balancer {fig['balancer_in']:>6}"
                f"  sets {fig['balanced_out']:>5}  trainer {fig['trainer_in']:>5}  lost {fig['lost']}"
                f"  cpu {fig['cpu']}",
                flush=True,
            )
            begin += SETTLE_S + step_s
        sent = [
            sum(x)
            for x in zip(*(json.loads(p.communicate(timeout=60)[0])["sent"] for p in pubs), strict=True)
        ]
        totals = settled(stack)
    finally:
        for p in pubs:
            if p.poll() is None:
                p.kill()
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)

    sustained, saturating = 0.0, "none"
    for fig in steps:
        failed = [s for s in STAGES if not fig["kept_up"][s]]
        if failed:
            saturating = failed[0]
            break
        sustained = fig["offered"]
    report(
        {
            "bench": "ingest",
            "samples_per_s": round(sustained),
            "saturating_stage": saturating,
            "goal_samples_per_s": GOAL,
            "meets_goal": sustained >= GOAL,
            "frame": args.frame,
            "collectors": args.collectors,
            "sent_per_step": sent,
            "totals": {"sent": sum(sent), **{k: round(v) for k, v in totals.items()}},
            "steps": steps,
            "cores": os.cpu_count(),
            "quick": args.quick,
        }
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
