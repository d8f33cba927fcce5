"""The trainer service on real loopback sockets: balancer-like sets in, training, weights a late player gets.

The in-process tests run ``TrainerService.run`` in a thread (``svc.stop`` is exactly what SIGTERM calls);
the subprocess test runs the real entry point. The model is the tiny preset at 64x36, batches of 4.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
import torch

from charles.model.net import torch_threads
from charles.model.weights import model_from_weights
from charles.proto import Heartbeat, Weights
from charles.trainer.buffers import BufferConfig, Buffers
from charles.trainer.models_list import main as models_main
from charles.trainer.runs import RunDir, open_run
from charles.trainer.service import TrainerService
from charles.trainer.storage import Storage, StorageConfig
from charles.trainer.synthetic import make_frames, make_sample, make_set

from conftest import free_ports
from tests_support import counter_value, wait_for

H, W = 36, 64
MODEL = {"preset": "tiny", "overrides": {"width": W, "height": H}}
BALANCER = {"version": 3, "outputs": ["steering", "throttle_brake"], "picture_s": 0}
TRAINER = {
    "batch_size": 4,
    "buffer": {"capacity": 32, "start_fraction": 0.25},  # 8 samples per buffer start training
    "checkpoint_every": 4,
    "publish_every": 2,
    "publish_half": False,
    "log_every": 2,
    "console_hz": 10,
    "decode_threads": 1,
    "prefetch": 1,
    "lr": 1e-3,
}
FRAMES = make_frames(8, height=H, width=W)


def sets(start: int, n: int) -> list:
    """n samples per output as Balancing v3 sets (every label kept), one set per output."""
    out = []
    for name in ("steering", "throttle_brake"):
        samples = [
            make_sample(i, FRAMES[i % len(FRAMES)], collector="sim-1") for i in range(start, start + n)
        ]
        out.append(make_set([name], samples, version=3, labels_kept=["steering", "throttle_brake"]))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture
def trainers(client_factory, tmp_path):
    """start(**trainer_overrides) -> (service, thread) training tiny_v1 under tmp_path/runs."""
    running = []

    def start(**overrides):
        tcfg = {**TRAINER, **overrides}
        svc = client_factory("trainer", trainer=tcfg, model=MODEL, balancer=BALANCER, run="test")
        mcfg = svc.cfg.model.resolve()
        run = open_run("tiny", tmp_path / "runs", model=mcfg.to_dict(), identity=mcfg.identity(), name="test")
        service = TrainerService(svc, svc.cfg, run)
        t = threading.Thread(target=service.run, daemon=True)
        t.start()
        running.append((svc, t))
        return service, t

    yield start
    for svc, t in running:
        svc.stop()
        t.join(10)


def connected_publisher(client_factory, service: TrainerService, client=None):
    """A set publisher the trainer already hears (the slow-joiner rule): a truncated probe it rejects."""
    pub = (client or client_factory("balancer")).publisher("set")
    reg = service.svc.metrics.registry

    def heard():
        pub.send_frames("set.probe", [b"set.probe"])
        return counter_value(reg, "charles_rejects_total", {"reason": "truncated"}) > 0

    wait_for(heard, 10, "the trainer never received from the bus")
    return pub


def stop(service: TrainerService, t: threading.Thread) -> None:
    service.svc.stop()
    t.join(10)
    assert not t.is_alive(), "the trainer did not stop"


def test_a_balancer_of_other_kinds_is_refused_out_loud_until_it_agrees(trainers, client_factory):
    service, t = trainers()
    balancer = client_factory("balancer")
    pub = connected_publisher(client_factory, service, balancer)
    reg = service.svc.metrics.registry
    ours = service.receiver.outputs
    assert ours == "steering:regression,throttle_brake:regression"  # the tiny line learns both as values

    def heartbeat(outputs: str) -> None:
        pub.send(
            f"heartbeat.{balancer.instance}",
            Heartbeat("balancer", balancer.instance, info={"outputs": outputs}),
        )

    heartbeat("steering:delta:0badc0de,throttle_brake:regression")
    wait_for(lambda: balancer.instance in service.receiver.refused_balancers, 5, "the heartbeat was not read")
    for s in sets(0, 3):
        pub.send(f"set.{s.outputs[0]}", s)
    wait_for(
        lambda: counter_value(reg, "charles_rejects_total", {"reason": "outputs_mismatch"}) == 2,
        5,
        "the mismatched sets were not refused",
    )
    assert service.buffers.sizes() == {"steering": 0, "throttle_brake": 0}
    wait_for(lambda: service.state.get("refused_balancers") == [balancer.instance], 5, "not shown")

    heartbeat(ours)  # restarted with the run's configuration
    wait_for(lambda: not service.receiver.refused_balancers, 5, "the agreeing heartbeat was not read")
    for s in sets(3, 3):
        pub.send(f"set.{s.outputs[0]}", s)
    wait_for(lambda: service.buffers.sizes() == {"steering": 3, "throttle_brake": 3}, 10, "sets not taken")
    stop(service, t)


def test_trains_at_the_threshold_publishes_to_late_players_and_resumes_from_disk(
    trainers, client_factory, tmp_path
):
    service, t = trainers()
    pub = connected_publisher(client_factory, service)
    player = client_factory("player", service={"heartbeat_s": 0.1})
    player.start_heartbeat()
    reg = service.svc.metrics.registry

    # below the threshold: every buffer needs 8, each has 7 -> waiting, nothing trained
    for s in sets(0, 7):
        assert pub.send(f"set.{s.outputs[0]}", s)
    wait_for(
        lambda: service.buffers.sizes() == {"steering": 7, "throttle_brake": 7}, 10, "sets never arrived"
    )
    time.sleep(0.3)
    assert service.trainer.batch == 0 and service.state["status"] == "waiting for buffers"
    assert service.svc.status == "waiting" and service.svc.info["fill"] == round(7 / 32, 3)

    # one more each: training starts; ten more each: (18 - 8) / 2 + 1 = 6 batches, then waiting at 6 < 8
    for s in sets(7, 1) + sets(8, 10):
        assert pub.send(f"set.{s.outputs[0]}", s)
    wait_for(lambda: service.trainer.batch == 6, 30, "six batches were not trained")
    time.sleep(0.3)
    assert service.trainer.batch == 6 and service.buffers.sizes() == {"steering": 6, "throttle_brake": 6}
    assert counter_value(reg, "charles_trainer_batches_total") == 6
    assert counter_value(reg, "charles_trainer_samples_trained_total") == 24
    assert counter_value(reg, "charles_trainer_buffer_fill_ratio", {"output": "steering"}) == 6 / 32
    assert counter_value(reg, "charles_trainer_loss", {"output": "steering"}) > 0
    # weights at start (batch 0) and every 2 batches; a checkpoint at batch 4
    wait_for(
        lambda: counter_value(reg, "charles_trainer_weights_published_total") == 4, 5, "weights not published"
    )
    assert counter_value(reg, "charles_trainer_publish_seconds_count") == 4
    assert [p.name for p in service.run_dir.checkpoints.iterdir()] == ["batch_000000004"]

    # a player that joins now gets the newest weights from the broker's last value, and they load
    late = client_factory("player-late").subscriber(["weights.tiny"])
    env = late.recv(3000)
    assert env is not None and isinstance(env.msg, Weights)
    w = env.msg
    assert (w.model, w.run, w.batch) == ("tiny", "tiny_v1", 6) and w.config == service.mcfg.to_dict()
    model, loaded = model_from_weights(bytes(w.payload), service.mcfg)
    assert loaded.metadata["charles.run"] == "tiny_v1"
    for (k, a), b in zip(
        model.state_dict().items(), service.trainer.module.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b.cpu()), k

    # the console the viewer shows, and the heartbeat's scalars
    console = client_factory("viewer").subscriber(["console."])
    wait_for(lambda: "player-" in str(service.state["players"]), 5, "the player's heartbeat was not seen")
    deadline, state = time.monotonic() + 5, {}
    while time.monotonic() < deadline and state.get("players") != service.state["players"]:
        env = console.recv(500)
        if env is not None and env.msg.service == "trainer":
            state = env.msg.state
    for key in (
        "status",
        "batch",
        "buffers",
        "samples_per_s",
        "batches_per_s",
        "loss",
        "loss_history",
        "lr",
        "collectors",
        "players",
        "published",
        "last_publish_batch",
    ):
        assert key in state, key
    assert state["batch"] == 6 and state["buffers"]["steering"] == {"fill": 6, "capacity": 32}
    assert state["collectors"] == ["sim-1"] and player.instance in state["players"]
    assert set(state["loss"]) == {"steering", "throttle_brake"} and state["loss_history"][-1][0] == 6
    assert state["published"] == 4 and state["last_publish_batch"] == 6
    assert set(service.svc.info) == {"status", "batch", "loss", "fill", "sps", "published", "demand"}
    # flow control aims at flow_reuse (4) but never past what the buffers allow (samples_per_insert 1)
    assert state["flow"]["target_reuse"] == 1.0 and service.svc.info["demand"] == state["flow"]["demand"]

    # SIGTERM's path: a final checkpoint at 6, storage flushed, the period closed
    stop(service, t)
    assert sorted(p.name for p in service.run_dir.checkpoints.iterdir()) == [
        "batch_000000004",
        "batch_000000006",
    ]
    manifest = RunDir(service.run_dir.path).manifest
    assert manifest.batch == 6 and manifest.samples == 24
    assert [(p.start_batch, p.stop_batch, p.open) for p in manifest.periods] == [(0, 6, False)]
    assert (service.run_dir.path / "tb").is_dir() and any((service.run_dir.path / "tb").iterdir())

    # restart: batch 6 resumes, the 6 samples per buffer come back from disk and train without new data
    again, t2 = trainers(buffer={"capacity": 32, "start_fraction": 0.15})  # 5 start training now
    assert again.refill.total == 12 and again.trainer.batch == 6
    wait_for(lambda: again.trainer.batch == 7, 20, "no training from the refilled buffers")
    stop(again, t2)
    manifest = RunDir(again.run_dir.path).manifest
    assert [(p.start_batch, p.stop_batch) for p in manifest.periods] == [(0, 6), (6, 7)]


def test_sets_of_another_balancing_are_rejected_and_counted(trainers, client_factory):
    service, t = trainers()
    pub = connected_publisher(client_factory, service)
    joint = make_set(["steering", "throttle_brake"], [make_sample(0, FRAMES[0])], version=1)
    pub.send("set.all", joint)
    reg = service.svc.metrics.registry
    wait_for(
        lambda: counter_value(reg, "charles_rejects_total", {"reason": "unknown_buffer"}) == 1,
        5,
        "not rejected",
    )
    assert service.buffers.sizes() == {"steering": 0, "throttle_brake": 0}
    stop(service, t)
    assert not list(service.run_dir.checkpoints.iterdir()), "nothing trained, nothing to checkpoint"


def test_samples_drawn_again_are_counted_per_output(trainers, client_factory):
    # each sample may serve two batches; 12 per buffer, training from 8: the buffers stop serving only once
    # samples were drawn twice (the ratio's credit is spent, or used-up samples left fewer than 8)
    service, t = trainers(buffer={"capacity": 32, "start_fraction": 0.25, "samples_per_insert": 2.0})
    pub = connected_publisher(client_factory, service)
    for s in sets(0, 12):
        assert pub.send(f"set.{s.outputs[0]}", s)
    reg = service.svc.metrics.registry
    outputs = ("steering", "throttle_brake")

    def exported() -> dict[str, float]:
        return {o: counter_value(reg, "charles_trainer_samples_reused_total", {"output": o}) for o in outputs}

    def settled() -> bool:
        counted = {o: b["reused"] for o, b in service.buffers.stats()["buffers"].items()}
        shown = service.state.get("reused")
        return service.trainer.batch > 0 and not service.buffers.ready(2) and exported() == counted == shown

    wait_for(settled, 30, "training from the 12 samples never settled (metric, console and buffers)")
    assert sum(exported().values()) > 0
    stop(service, t)


def test_a_frame_that_does_not_decode_is_counted_at_the_trainer_and_leaves_its_storage(
    trainers, client_factory
):
    """A JPEG header over garbage validates on the wire (the header is all a receiver checks before decoding):
    the trainer is the first to decode it. It is counted there as undecodable_frame, and the sample leaves
    the buffers and the storage, so no later batch draws it again."""
    from charles.proto import Frame

    # 9 samples a buffer and 9 drawn from each per batch: the first batch draws both forged ones
    service, t = trainers(
        batch_size=18, buffer={"capacity": 32, "start_fraction": 0.25, "samples_per_insert": 4.0}
    )
    pub = connected_publisher(client_factory, service)
    good = sets(0, 8)
    forged = make_sample(
        100, Frame("jpeg", FRAMES[0].shape, b"\xff\xd8\xff\xe0" + bytes(64)), collector="sim-1"
    )
    for s in good:
        s.samples.append(forged)
        assert pub.send(f"set.{s.outputs[0]}", s)
    reg = service.svc.metrics.registry

    def counted() -> float:
        return counter_value(reg, "charles_rejects_total", {"reason": "undecodable_frame"})

    wait_for(lambda: service.trainer.batch > 0, 120, "no batch was trained")
    # counted at the next console refresh (console_hz)
    wait_for(lambda: counted() >= 2, 5, f"undecodable frames counted: {counted()} (one per buffer expected)")
    assert counted() == 2
    discarded = {n: b["discarded"] for n, b in service.buffers.stats()["buffers"].items()}
    assert discarded == {"steering": 1, "throttle_brake": 1}
    stop(service, t)
    with sqlite3.connect(service.run_dir.path / "storage" / "buffers.sqlite3") as db:
        seqs = [row[0] for row in db.execute("SELECT record FROM samples")]
    assert seqs and not any(b"\xff\xd8\xff\xe0" + bytes(64) in bytes(r) for r in seqs)


def stored(path, start: int = 0, n: int = 40) -> None:
    """Storage left by an earlier session at ``path``: a trainer trains from it without any collector."""
    store = Storage(StorageConfig(path=str(path)), capacity=64)
    buffers = Buffers(["steering", "throttle_brake"], BufferConfig(capacity=64), observer=store)
    for s in sets(start, n):
        buffers.add_set(s)
    store.close()


def left_in_storage(path) -> int:
    store = Storage(StorageConfig(path=str(path), mirror_removals=False), capacity=64)
    try:
        return store.refill(Buffers(["steering", "throttle_brake"], BufferConfig(capacity=64))).total
    finally:
        store.close()


@contextlib.contextmanager
def trainer_process(broker, runs, **environ):
    """``python -m charles.trainer`` of the tiny line at 64x36 on the broker, training from runs/; yields
    (GET of its HTTP API, stop: SIGTERM, then its exit status and output), and kills it if still running.
    The output goes to a file beside runs/, so no pipe fills up and stalls it."""
    _, data = broker
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES_RUN_DIR": str(runs),
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__SERVICE__SHUTDOWN_S": "5",
        "CHARLES__MODEL__OVERRIDES": json.dumps(MODEL["overrides"]),
        "OMP_NUM_THREADS": "1",
        **environ,
    }
    cmd = [
        sys.executable, "-m", "charles.trainer", "--preset", "tiny", "--id", "trainer-smoke",
        "--set", "trainer.batch_size=4", "--set", "trainer.buffer.capacity=64",
        "--set", "trainer.buffer.start_fraction=0.1", "--set", "trainer.decode_threads=1",
    ]  # fmt: skip
    out = runs.parent / "trainer.log"
    with out.open("wb") as f:
        proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)

    def get(path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}{path}", timeout=1) as r:
            return json.load(r)

    def stop(timeout: float) -> tuple[int, str]:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=timeout)
        return rc, out.read_text()

    try:
        yield get, stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def batches_trained(get) -> int:
    try:
        return get("/state")["info"].get("batch", 0)
    except OSError:
        return 0


@pytest.mark.slow
def test_trainer_process_is_healthy_trains_from_storage_and_stops_on_sigterm(broker, tmp_path):
    runs = tmp_path / "runs"
    stored(runs / "tiny" / "tiny_v1" / "storage" / "buffers.sqlite3")
    with trainer_process(broker, runs) as (get, stop):
        wait_for(lambda: batches_trained(get) >= 2, 60, "the trainer never trained from its storage")
        health = get("/healthz")
        assert health["healthy"] and health["instance"] == "trainer-smoke"
        t0 = time.monotonic()
        rc, out = stop(15)
        assert rc == 0, out
        assert time.monotonic() - t0 < 6, "SIGTERM took longer than service.shutdown_s"
    run = RunDir(runs / "tiny" / "tiny_v1")
    m = run.manifest
    assert m.batch >= 2 and m.periods[-1].open is False and m.periods[-1].stop_batch == m.batch
    assert m.checkpoint == f"checkpoints/batch_{m.batch:09d}"
    assert (run.path / m.checkpoint / "weights.safetensors").is_file(), out
    assert run.newest_weights() == run.path / m.checkpoint / "weights.safetensors"
    assert models_main(["--run-dir", str(runs), "--line", "tiny"]) == 0


def test_trainer_procs_is_one_process_per_gpu(monkeypatch):
    from charles.trainer import launch

    monkeypatch.setattr(launch, "visible_gpus", lambda: 4)
    assert [launch.processes(n, "auto") for n in (0, 1, 2, 4)] == [4, 1, 2, 4]
    with pytest.raises(ValueError, match="trainer.procs is 8 but this machine shows 4 GPU"):
        launch.processes(8, "cuda")
    monkeypatch.setattr(launch, "visible_gpus", lambda: 0)
    assert [launch.processes(n, "auto") for n in (0, 1, 2)] == [1, 1, 2]  # gloo ranks on the CPU
    assert [launch.processes(n, "cpu") for n in (0, 1, 3)] == [1, 1, 3]
    with pytest.raises(ValueError, match="CUDA is not available"):
        launch.processes(2, "cuda")
    assert launch.is_worker({"LOCAL_RANK": "0"}) and not launch.is_worker({})


@pytest.mark.slow
def test_the_trainer_command_trains_two_ranks_under_torchrun_when_procs_is_two(broker, tmp_path):
    # the command compose and k8s run, with the one setting they pass (trainer.procs): it starts torchrun
    # itself (gloo on the CPU here); each rank trains from its own storage file, as on the bus each keeps
    # its own share of the sets
    runs = tmp_path / "runs"
    storage = runs / "tiny" / "tiny_v1" / "storage"
    files = [storage / "buffers.sqlite3", storage / "buffers.rank1.sqlite3"]
    for rank, path in enumerate(files):
        stored(path, start=1000 * rank)
        assert left_in_storage(path) == 80
    two_ranks = {"CHARLES__TRAINER__PROCS": "2", "CHARLES__TRAINER__DEVICE": "cpu"}
    with trainer_process(broker, runs, **two_ranks) as (get, stop):
        wait_for(lambda: batches_trained(get) >= 3, 120, "the two ranks never trained together")
        rc, out = stop(30)  # SIGTERM to the command: it stops the ranks, and torchrun exits 0
        assert rc == 0, out
    run = RunDir(runs / "tiny" / "tiny_v1")
    m = run.manifest
    state = json.loads((run.path / m.checkpoint / "state.json").read_text())
    assert m.batch >= 3 and state["world"] == 2, out
    assert m.samples == m.batch * 4 * 2, "a step trains batch_size samples on each rank"
    for path in files:  # every step took 2 samples from each of a rank's two buffers, on both ranks
        assert left_in_storage(path) <= 80 - 4 * m.batch, path.name
    assert "starting 2 training processes" in out and "torchrun exited" not in out, out


def test_each_set_belongs_to_exactly_one_rank():
    from charles.trainer.receiver import Receiver

    receivers = [Receiver(None, None, None, rank=r, world=3) for r in range(3)]  # type: ignore[arg-type]
    for start in range(0, 300, 3):
        s = sets(start, 3)[0]
        assert sum(r.mine(s) for r in receivers) == 1
    taken = [sum(r.mine(sets(k, 1)[0]) for k in range(300)) for r in receivers]
    assert min(taken) > 60, f"the split is roughly even: {taken}"


DDP_SCRIPT = """
import json, sys, torch
import torch.distributed as dist
from charles.model.net import torch_threads
from charles.model.presets import get_config
from charles.trainer.batches import BatchAssembler, BatchConfig
from charles.trainer.buffers import BufferConfig, Buffers
from charles.sections.trainer import TrainerConfig
from charles.trainer.synthetic import make_sample, make_set
from charles.trainer.training import Distributed, Trainer

torch.set_num_threads(1)
d = Distributed.from_env("cpu")
mcfg = get_config("tiny", width=64, height=36)
torch.manual_seed(d.rank)  # a different init on each rank: DDP starts every rank from rank 0's weights
t = Trainer(mcfg, TrainerConfig(lr=1e-3), "cpu", d)
b = Buffers(["steering", "throttle_brake"], BufferConfig(capacity=32, start_fraction=0.01, seed=d.rank))
for name in ("steering", "throttle_brake"):
    b.add_set(make_set([name], [make_sample(i + 100 * d.rank, height=36, width=64) for i in range(12)]))
asm = BatchAssembler(b, BatchConfig(batch_size=8, image_size=(36, 64), decode_threads=1))
losses = [t.step(asm.next_batch(1)).loss for _ in range(3)]
total = torch.tensor([float(sum(p.detach().double().sum() for p in t.module.parameters()))], dtype=torch.float64)
sums = [torch.zeros(1, dtype=torch.float64) for _ in range(d.world)]
dist.all_gather(sums, total)
out = {
    "sums": [s.item() for s in sums], "losses": losses, "batch": t.batch, "samples": t.samples,
    "agree_one_missing": d.agree(d.rank == 0, False), "agree_one_stopping": d.agree(True, d.rank == 1),
    "version": d.broadcast_int(7 if d.rank == 0 else 0),
}
json.dump(out, open(sys.argv[1] + f"/rank{d.rank}.json", "w"))
asm.close()
t.close()  # as the service does: DDP let go of before the group is destroyed (or the exit may abort)
d.close()
"""


@pytest.mark.slow
def test_torchrun_ranks_step_together_on_their_own_data(tmp_path):
    from charles.trainer.launch import torchrun_command, torchrun_env

    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT)
    # torchrun as `charles trainer` starts it (everything on loopback)
    cmd = torchrun_command(2, [str(script), str(tmp_path)])
    env = torchrun_env({**os.environ, "OMP_NUM_THREADS": "1"})
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, "torchrun failed:\n" + (done.stdout + done.stderr)[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["sums"][0] == r0["sums"][1] == r1["sums"][0], (
        "every rank holds the same weights after each step"
    )
    assert r0["losses"] != r1["losses"], "ranks trained on different samples"
    assert r0["batch"] == r1["batch"] == 3 and r0["samples"] == 3 * 8 * 2
    assert r0["agree_one_missing"] == [False, False] and r1["agree_one_stopping"] == [True, True]
    assert r1["version"] == 7


def test_a_trained_run_without_a_loadable_checkpoint_refuses_to_start_from_scratch(client_factory, tmp_path):
    from charles.trainer.checkpoint import CheckpointError

    svc = client_factory("trainer", trainer=TRAINER, model=MODEL, balancer=BALANCER)
    mcfg = svc.cfg.model.resolve()
    run = open_run("tiny", tmp_path / "runs", model=mcfg.to_dict(), identity=mcfg.identity())
    bad = run.checkpoints / "batch_000000250"
    bad.mkdir()
    (bad / "state.json").write_text("{")
    run.progress(250, 16_000, bad)
    with pytest.raises(CheckpointError, match="no_good_checkpoint.*--new-version"):
        TrainerService(svc, svc.cfg, run)
    assert (run.checkpoints / "batch_000000250.refused-corrupt").is_dir()
    with pytest.raises(CheckpointError, match="trained to batch 250"):  # and on every restart after
        TrainerService(svc, svc.cfg, RunDir(run.path))


def test_the_judges_score_of_this_run_reaches_the_trainers_console(trainers, client_factory):
    from charles.proto import Score, ScoreFigures
    from charles.trainer.console import render_lines

    service, t = trainers()
    pub = connected_publisher(client_factory, service, client_factory("judge"))
    run = service.run_dir.name

    def score(run: str, batch: int, kmbu: float) -> Score:
        f = ScoreFigures(km=2 * kmbu, km_between_unstucks=kmbu, on_road_fraction=0.85, collisions_per_km=0.5,
                         mean_speed_kmh=30.0, unstucks=1)  # fmt: skip
        npc = ScoreFigures(km=1.3, km_between_unstucks=1.3, on_road_fraction=1.0, collisions_per_km=0.0,
                           mean_speed_kmh=40.0, unstucks=0)  # fmt: skip
        return Score(model="tiny", run=run, batch=batch, created=0.0, seeds=[9001, 9002], minutes=1.0,
                     figures=f, reference=npc, wall_s=5.0)  # fmt: skip

    pub.send("score.other_v9", score("other_v9", 500, 9.0))  # another version's: not this console's
    pub.send(f"score.{run}", score(run, 40, 0.25))
    wait_for(
        lambda: service.state.get("score", {}).get("batch") == 40, 10, "the score never reached the console"
    )
    pub.send(f"score.{run}", score(run, 20, 0.1))  # an older one (a replayed last value) does not go back
    time.sleep(0.5)
    s = service.state["score"]
    assert (s["km_between_unstucks"], s["on_road_fraction"], s["npc_km_between_unstucks"]) == (
        0.25,
        0.85,
        1.3,
    )
    text = "\n".join(render_lines(service.state, 100))
    assert "driving  0.250 km between Unstucks, 85% on the road at batch 40 (NPC 1.300)" in text
    stop(service, t)
