"""The trainer's files survive kill -9 at any moment: 20 crashes mid-training, then every file still opens.

A broker runs in this process and a feeder thread publishes balanced sets at a steady rate, so every trainer
process trains, checkpoints (every batch), publishes, and writes its storage when it is killed. The trainer
processes are forks of a server that imported torch once (survive_support.ForkServer): the real entry point
``python -m charles.trainer``, twenty times, without twenty times the imports.

Each restart must resume at the newest checkpoint the killed process left, refill its buffers from the
storage, and refuse nothing; after the last kill every checkpoint loads and checks (weights and optimizer
against their SHA-256, the weights into the model), the manifest reads, the SQLite store passes
``PRAGMA integrity_check`` and refills without a corrupt record, and the run's lock is free.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import sqlite3
import threading
import time

import pytest

from charles.model.net import build_model
from charles.model.presets import get_config
from charles.model.weights import load_weights
from charles.trainer.buffers import BufferConfig, Buffers
from charles.trainer.checkpoint import list_checkpoints, read_checkpoint
from charles.trainer.runs import RunDir
from charles.trainer.storage import Storage, StorageConfig
from charles.trainer.synthetic import make_frames, make_sample, make_set

from conftest import free_ports
from survive_support import ForkServer, overrides, running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.system]

KILLS = int(os.environ.get("CHARLES_SURVIVE_KILLS", "20"))
H, W = 36, 64
SETTINGS = [
    "trainer.batch_size=4",
    "trainer.buffer.capacity=64",
    "trainer.buffer.start_fraction=0.1",
    "trainer.checkpoint_every=1",  # a checkpoint (and a prune) every batch: most kills land in one
    "trainer.keep_checkpoints=3",
    "trainer.publish_every=5",
    "trainer.decode_threads=1",
    "trainer.prefetch=1",
    "trainer.torch_threads=1",
    "trainer.log_every=1000",
    "service.shutdown_s=5",
]
START = re.compile(r"tiny_v1: tiny on \w+, batch (\d+), .* refilled (\d+) samples")
CHECKPOINT = re.compile(r"checkpoint batch_(\d+)")


def in_log(log, pattern: re.Pattern, start: int = 0):
    """A poll for wait_for: the first match of pattern in the log past ``start`` characters."""
    return lambda: log.exists() and pattern.search(log.read_text()[start:])


class Feeder:
    """Balanced v3 sets for both outputs at ~20 sets/s, numbered like the balancer's, until stopped."""

    def __init__(self, pub):
        self.pub = pub
        self.frames = make_frames(16, height=H, width=W)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self.stop.wait(0.05):
            for name in ("steering", "throttle_brake"):
                samples = [make_sample(i + k, self.frames[(i + k) % 16], collector="sim-1") for k in range(4)]
                s = make_set([name], samples, version=3, labels_kept=["steering", "throttle_brake"])
                s.seq = i // 4
                self.pub.send(f"set.{name}", s)
            i += 4

    def close(self) -> None:
        self.stop.set()
        self.thread.join(2)


def test_twenty_kill9s_mid_training_leave_every_file_good(broker, client_factory, tmp_path):
    _, data = broker
    runs = tmp_path / "runs"
    run_path = runs / "tiny" / "tiny_v1"
    (http_port,) = free_ports(1)
    env = {
        "CHARLES_RUN_DIR": str(runs),
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__MODEL__OVERRIDES": json.dumps({"width": W, "height": H}),
        "CUDA_VISIBLE_DEVICES": "",
    }
    argv = ["--preset", "tiny", "--id", "trainer-crash", *overrides(*SETTINGS)]
    seed = int(os.environ.get("CHARLES_SURVIVE_SEED", random.randrange(1 << 30)))
    rng = random.Random(seed)
    print(f"kill timings seed {seed} (CHARLES_SURVIVE_SEED to replay)")

    server = ForkServer("charles.trainer.__main__", ["charles.trainer.service", "charles.model.net", "timm"])
    feeder = Feeder(client_factory("balancer").publisher("set"))
    resumed: list[int] = []
    try:
        for k in range(KILLS + 1):
            log = tmp_path / f"trainer-{k}.log"
            on_disk = max((b for b, _ in list_checkpoints(run_path / "checkpoints")), default=0)
            pid = server.start(argv, env, log)
            m = wait_for(in_log(log, START), 60, f"start #{k} ({log})")
            batch, refilled = int(m.group(1)), int(m.group(2))
            text = log.read_text()
            assert "refusing checkpoint" not in text, f"a crash left a bad checkpoint:\n{text}"
            assert batch == on_disk, (
                f"start #{k} resumed at batch {batch}, the newest checkpoint is {on_disk}"
            )
            if k:
                assert refilled > 0, f"start #{k} refilled nothing from its storage"
            resumed.append(batch)
            # mid-training: after a batch past the resume point, at a random moment of the next ones
            wait_for(in_log(log, CHECKPOINT, len(text)), 60, f"trainer #{k} never trained")
            if k == KILLS:
                os.kill(pid, signal.SIGTERM)  # the last one stops cleanly: the run is usable after it all
                status = server.reap(pid)
                assert os.waitstatus_to_exitcode(status) == 0, log.read_text()[-3000:]
                break
            time.sleep(rng.uniform(0.0, 1.0))
            os.kill(pid, signal.SIGKILL)
            assert os.waitstatus_to_exitcode(server.reap(pid)) == -signal.SIGKILL
            assert not running(pid)
    finally:
        feeder.close()
        server.close()
    print(f"resumed at batches {resumed}")
    assert resumed == sorted(resumed) and resumed[-1] > resumed[1], (
        "the batch counter went backwards or stood still"
    )

    # every checkpoint on disk opens and checks, and loads into the model
    mcfg = get_config("tiny", width=W, height=H)
    model = build_model(mcfg)
    found = list_checkpoints(run_path / "checkpoints")
    assert len(found) == 3, [p.name for _, p in found]
    for b, path in found:
        ck = read_checkpoint(path, mcfg, model)
        assert ck.batch == b
        load_weights(path / "weights.safetensors", mcfg, into=model)
    leftovers = [
        p.name for p in (run_path / "checkpoints").iterdir() if not re.fullmatch(r"batch_\d{9}", p.name)
    ]
    assert not leftovers, f"refused or half-written checkpoints left behind: {leftovers}"
    run = RunDir(run_path)
    assert run.error is None and run.manifest.batch == found[-1][0]
    assert run.manifest.checkpoint == f"checkpoints/{found[-1][1].name}"
    run.lock()  # no crashed trainer holds it
    run.unlock()

    # the storage: SQLite's own check, then the trainer's refill finds every record good
    db = run_path / "storage" / "buffers.sqlite3"
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    store = Storage(StorageConfig(path=str(db)), capacity=64)
    try:
        report = store.refill(Buffers(["steering", "throttle_brake"], BufferConfig(capacity=64)))
    finally:
        store.close()
    assert report.corrupt == {} and report.total > 0, report
