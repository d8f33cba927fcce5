"""The seed's streaming timeline as commands, on real processes: versions on the wire, off-stream training,
``charles stream`` of a saved checkpoint, ``charles trainer --resume <version>@<batch>``, players pinned to a
version or following the newest, and bad references refused with exit 2 and nothing published.

Trainers train the tiny line at 64x36 from a storage an earlier session left (no collector, no balancer);
the broker runs in this process, so the tests read its last-value cache directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from charles.trainer.checkpoint import list_checkpoints
from charles.trainer.models_list import main as models_main
from charles.trainer.runs import RunDir

from conftest import free_ports
from tests_support import wait_for

H, W = 36, 64
TRAINER = [
    "--set", "trainer.batch_size=4", "--set", "trainer.buffer.capacity=64",
    "--set", "trainer.buffer.start_fraction=0.1", "--set", "trainer.decode_threads=1",
    "--set", "trainer.checkpoint_every=2", "--set", "trainer.keep_checkpoints=20",
    "--set", "trainer.publish_every=2", "--set", "trainer.publish_half=false",
    "--set", "trainer.torch_threads=1", "--set", "trainer.console_hz=1",
]  # fmt: skip
PLAYER = [
    "--set", "player.threads=1", "--set", "player.camera_hz=0", "--set", "player.console_hz=1",
    "--set", "player.terminal=false", "--set", "player.swap=immediate",
]  # fmt: skip


def stored(runs: Path, version: int, n: int = 40) -> None:
    """The storage an earlier session of tiny_v<version> left: its trainer trains from it at once."""
    from test_trainer_service import stored as store

    store(runs / "tiny" / f"tiny_v{version}" / "storage" / "buffers.sqlite3", n=n)


class Procs:
    """Entry points of Charles as processes on the test broker; each one's output in its own file."""

    def __init__(self, broker, tmp: Path):
        _, data = broker
        self.tmp = tmp
        self.runs = tmp / "runs"
        self.env = {
            **os.environ,
            "CHARLES_RUN_DIR": str(self.runs),
            "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
            "CHARLES__SERVICE__SHUTDOWN_S": "5",
            "CHARLES__MODEL__OVERRIDES": json.dumps({"width": W, "height": H}),
            "OMP_NUM_THREADS": "1",
        }
        self.running: list[tuple[subprocess.Popen, Path, int]] = []

    def start(self, name: str, module: str, *argv: str) -> tuple[subprocess.Popen, Path, int]:
        (port,) = free_ports(1)
        out = self.tmp / f"{name}.log"
        with out.open("wb") as f:
            cmd = [sys.executable, "-m", module, *argv]
            env = {**self.env, "CHARLES__SERVICE__HTTP_PORT": str(port)}
            proc = subprocess.Popen(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
        self.running.append((proc, out, port))
        return proc, out, port

    def run(self, module: str, *argv: str, timeout: float = 120) -> tuple[int, str]:
        """A command to its end: (exit status, output)."""
        (port,) = free_ports(1)
        env = {**self.env, "CHARLES__SERVICE__HTTP_PORT": str(port)}
        done = subprocess.run(
            [sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True, timeout=timeout
        )
        return done.returncode, done.stdout + done.stderr

    @staticmethod
    def info(port: int) -> dict:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/state", timeout=1) as r:
                return json.load(r).get("info", {})
        except OSError:
            return {}

    @staticmethod
    def metric(port: int, line_start: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(line_start):
                    return float(line.rsplit(" ", 1)[1])
        return 0.0

    @staticmethod
    def stop(proc: subprocess.Popen, out: Path, timeout: float = 30) -> str:
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=timeout)
        text = out.read_text()
        assert rc == 0, text
        return text

    def close(self) -> None:
        for proc, _, _ in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@pytest.fixture
def procs(broker, tmp_path):
    p = Procs(broker, tmp_path)
    yield p
    p.close()


def held(broker, topic: str):
    """The broker's last value of a topic, decoded (None when it holds none)."""
    from charles.proto import decode

    b, _ = broker
    frames = b.lvc.items.get(topic)
    return decode([bytes(f) for f in frames]).msg if frames else None


def alive(proc: subprocess.Popen, out: Path) -> None:
    if proc.poll() is not None:
        raise AssertionError(f"exited with {proc.returncode}: {out.read_text()[-3000:]}")


@pytest.mark.slow
def test_off_stream_training_then_stream_a_batch_then_continue_from_it(broker, procs, capsys):
    """The seed's moves, one command each: train model v1 off-stream; "started streaming v1 from batch 4
    (pre-trained off-stream)" with no trainer running; "continuing training v1 from batch 4" as a new,
    streamed period. `charles models` tells the story."""
    runs = procs.runs
    stored(runs, 1)

    # 1. off-stream: checkpoints, nothing on the bus
    proc, out, port = procs.start("offstream", "charles.trainer", "--preset", "tiny", "--version", "1", *TRAINER,
                                  "--set", "trainer.publish=off")  # fmt: skip
    wait_for(
        lambda: alive(proc, out) or procs.info(port).get("batch", 0) >= 6, 90, "the trainer never trained"
    )
    procs.stop(proc, out)
    run = RunDir(runs / "tiny" / "tiny_v1")
    assert [p.publish for p in run.manifest.periods] == ["off"]
    assert held(broker, "weights.tiny.v1") is None and held(broker, "weights.tiny") is None
    batches = [b for b, _ in list_checkpoints(run.checkpoints)]
    assert 4 in batches and max(batches) >= 6, batches

    # 2. stream a saved checkpoint, no trainer running: the broker keeps it for players that join later
    rc, text = procs.run("charles.trainer.stream", "tiny_v1@4")
    assert rc == 0, text
    w = held(broker, "weights.tiny.v1")
    assert (w.run, w.batch) == ("tiny_v1", 4) and w.since > run.manifest.periods[0].stopped
    streamed = w.since
    assert [s["batch"] for s in RunDir(run.path).streams()] == [4]

    # 3. continue v1 from batch 4 as a new, streamed period; the newer checkpoints move aside, kept
    proc, out, port = procs.start(
        "resume", "charles.trainer", "--preset", "tiny", "--resume", "v1@4", *TRAINER
    )
    wait_for(
        lambda: alive(proc, out) or procs.info(port).get("batch", 0) >= 6,
        90,
        "the resumed trainer never trained",
    )
    procs.stop(proc, out)
    w = held(broker, "weights.tiny.v1")
    assert w.run == "tiny_v1" and w.since > streamed and w.batch >= 6  # a newer stream of v1
    run = RunDir(runs / "tiny" / "tiny_v1")
    periods = run.manifest.periods
    assert [(p.publish, p.start_batch) for p in periods] == [("off", 0), ("live", 4)]
    aside = [p for p in run.checkpoints.iterdir() if p.name.startswith("superseded-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir())[0] == "batch_000000006"

    assert models_main(["--run-dir", str(runs), "--line", "tiny", "--offline"]) == 0
    text = capsys.readouterr().out
    assert "from scratch, stopped at batch" in text and "off-stream" in text, text
    assert "streamed batch 4 by charles stream" in text and "from batch 4, stopped at batch" in text, text
    order = [text.index(s) for s in ("off-stream", "by charles stream", "from batch 4,")]
    assert order == sorted(order), f"not in the order they happened:\n{text}"


@pytest.mark.system  # four processes, two of them training without pause: 140 s at load average 13 on 2 cores
def test_two_versions_of_one_line_a_pinned_player_and_a_newest_one(broker, procs):
    """Two trainers of tiny (v1, then v2) on one broker: the player pinned to v1 never loads v2's weights,
    the one following newest moves to v2 when v2 starts streaming and stays there while v1 goes on."""
    runs = procs.runs
    stored(runs, 1)
    stored(runs, 2)
    many = ["--set", "trainer.buffer.samples_per_insert=100000", "--set", "trainer.publish_every=20"]
    t1 = procs.start(
        "trainer-v1", "charles.trainer", "--preset", "tiny", "--version", "1", "--id", "t1", *TRAINER, *many
    )
    wait_for(lambda: alive(*t1[:2]) or held(broker, "weights.tiny.v1") is not None, 90, "v1 never streamed")
    pin = procs.start(
        "pinned", "charles.player", "--id", "player-pinned", *PLAYER, "--set", "player.follow=v1"
    )
    new = procs.start("newest", "charles.player", "--id", "player-newest", *PLAYER)

    def drives(p, run: str) -> bool:
        alive(*p[:2])
        return procs.info(p[2]).get("model") == run

    wait_for(lambda: drives(pin, "tiny_v1") and drives(new, "tiny_v1"), 120, "the players never drove v1")
    t2 = procs.start(
        "trainer-v2", "charles.trainer", "--preset", "tiny", "--version", "2", "--id", "t2", *TRAINER, *many
    )
    wait_for(lambda: drives(new, "tiny_v2"), 90, "the newest player never moved to v2")
    v1 = held(broker, "weights.tiny.v1").batch
    wait_for(
        lambda: alive(*t1[:2]) or held(broker, "weights.tiny.v1").batch > v1, 60, "v1 stopped publishing"
    )
    wait_for(
        lambda: procs.metric(new[2], 'charles_drops_total{cause="not_followed"') >= 1, 20, "v1 not passed by"
    )
    assert drives(new, "tiny_v2") and drives(pin, "tiny_v1")
    assert procs.metric(pin[2], 'charles_drops_total{cause="not_followed"') >= 1  # v2's, passed by unloaded
    for p in (pin, new, t1, t2):
        procs.stop(*p[:2])
    assert "weights tiny_v2" not in pin[1].read_text(), "the pinned player loaded the other version"
    newest_log = new[1].read_text()
    assert "weights tiny_v1" not in newest_log.split("weights tiny_v2", 1)[1], "newest went back to v1"


@pytest.mark.slow
def test_bad_references_exit_2_say_what_exists_and_publish_nothing(broker, procs, tmp_path, capsys):
    """A version or batch that does not exist, a file that is not safetensors, a checkpoint of another
    line: each refused before anything is loaded or sent, naming what was asked and what there is."""
    import torch

    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.trainer import stream
    from charles.trainer.__main__ import main as trainer_main
    from charles.trainer.checkpoint import save_checkpoint

    runs = procs.runs
    cfg = get_config("tiny", width=W, height=H)
    run = RunDir(runs / "tiny" / "tiny_v1")
    run.create(cfg.to_dict())
    model = build_model(cfg)
    save_checkpoint(run.checkpoints, model, cfg, torch.optim.AdamW(model.parameters()), 2)
    env = {k: procs.env[k] for k in ("CHARLES_RUN_DIR", "CHARLES__MODEL__OVERRIDES", "CHARLES__BUS__PORTS")}
    with _environ(env):
        for ref, says in [
            ("v9", "tiny has no version v9 under " + str(runs) + " (its versions: v1"),
            ("v1@3", "tiny_v1 has no checkpoint at batch 3 (its checkpoints: 2)"),
            ("other_v1@2", "'other_v1@2' is a version of line 'other', not of 'tiny'"),
        ]:
            assert stream.main([ref, "--preset", "tiny"]) == 2, ref
            assert says in capsys.readouterr().err, ref
            assert trainer_main(["--preset", "tiny", "--resume", ref]) == 2, ref
            assert says in capsys.readouterr().err, ref
        RunDir(runs / "tiny" / "tiny_v2").create(cfg.to_dict())  # a version never checkpointed
        assert stream.main(["v2", "--preset", "tiny"]) == 2
        assert "tiny_v2 has no checkpoint to stream" in capsys.readouterr().err
        assert trainer_main(["--preset", "tiny", "--resume", "v2"]) == 2
        assert "tiny_v2 has no checkpoint to continue from" in capsys.readouterr().err
    b, _ = broker
    assert not [t for t in b.lvc.items if t.startswith("weights")], "something was published"
    assert (run.checkpoints / "batch_000000002").is_dir() and run.manifest.periods == []

    # the player: a file that is not safetensors, another line's checkpoint
    from charles.model.weights import save_weights

    pickled = tmp_path / "w.safetensors"
    pickled.write_bytes(b"\x80\x04\x95" + b"\x00" * 64)
    other = tmp_path / "other" / "batch_000000002"
    other.mkdir(parents=True)
    save_weights(
        build_model(cfg.replace(name="other")), cfg.replace(name="other"), other / "weights.safetensors"
    )
    cases = [
        (str(pickled), "pickle"),
        (str(other), "holds weights of model line 'other'; this player drives 'tiny'"),
    ]
    started = [
        procs.start(f"player-{i}", "charles.player", *PLAYER, "--set", f"player.follow={follow}")
        for i, (follow, _) in enumerate(cases)
    ]  # side by side: each is a torch import and a broker's configuration
    for (follow, says), (proc, out, _) in zip(cases, started, strict=True):
        rc = proc.wait(timeout=120)
        text = out.read_text()
        assert rc == 2 and says in text, (follow, text[-2000:])
    # the same checks, without a process each: a path with nothing there, another line's version
    from charles.model.weights import WeightsError
    from charles.player.swap import local_weights
    from charles.proto.versions import Follow

    with pytest.raises(WeightsError, match="no checkpoint folder or weights file at"):
        local_weights(str(tmp_path / "nothing"), cfg)
    with pytest.raises(WeightsError, match="a folder without weights.safetensors"):
        local_weights(str(tmp_path), cfg)
    with pytest.raises(ValueError, match="'other_v1' is a version of line 'other', not of 'tiny'"):
        Follow.parse("other_v1", "tiny")


@contextlib.contextmanager
def _environ(env: dict[str, str]):
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def test_models_says_what_each_player_drives_now_or_that_no_broker_answered(
    broker, procs, client_factory, capsys
):
    """`charles models` asks the broker for the players' consoles: which run and batch each drives."""
    from charles.proto import Console

    b, data = broker
    run = RunDir(procs.runs / "tiny" / "tiny_v2")
    run.create({})
    pub = client_factory("player").publisher("console")
    state = {
        "model": "tiny_v2",
        "model_line": "tiny",
        "model_version": 2,
        "model_batch": 1200,
        "follow": "tiny_v2",
    }
    wait_for(
        lambda: pub.send("console.player-1", Console("player", state)) and "console.player-1" in b.lvc.items,
        10,
        "the broker never held the player's console",
        interval=0.2,
    )
    env = {"CHARLES__BUS__PORTS": procs.env["CHARLES__BUS__PORTS"]}
    with _environ(env):
        assert models_main(["--run-dir", str(procs.runs), "--line", "tiny"]) == 0
    out = capsys.readouterr().out
    assert "players now: player-1 drives tiny_v2 batch 1,200 (follows tiny_v2)" in out, out
    with _environ(env):
        assert models_main(["--run-dir", str(procs.runs), "--json"]) == 0
    players = json.loads(capsys.readouterr().out)["players"]
    assert players == [
        {"instance": "player-1", "model": "tiny_v2", "line": "tiny", "batch": 1200, "follow": "tiny_v2"}
    ]
    # nobody on those ports: said so, after half a second
    (port,) = free_ports(1)
    nobody = json.dumps({**data["bus"]["ports"], "control": port})
    with _environ({"CHARLES__BUS__PORTS": nobody}):
        assert models_main(["--run-dir", str(procs.runs), "--line", "tiny"]) == 0
    assert "no broker answered" in capsys.readouterr().out
