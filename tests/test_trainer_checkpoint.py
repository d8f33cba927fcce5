"""Checkpoints, runs and the published weights, without sockets: what a restart and a player rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from charles import config
from charles.model.net import torch_threads
from charles.sections.trainer import TrainerConfig
from charles.trainer import checkpoint as ck
from charles.trainer.batches import BatchAssembler, BatchConfig
from charles.trainer.buffers import BufferConfig, Buffers
from charles.trainer.console import LossHistory, heartbeat_info, render_lines
from charles.trainer.models_list import main as models_main
from charles.trainer.runs import RunError, find_run, newest_weights, open_run, versions
from charles.trainer.synthetic import make_sample, make_set
from charles.trainer.training import Trainer, lr_factor

H, W = 36, 64
OUTPUTS = ("steering", "throttle_brake")


@pytest.fixture(scope="module")
def mcfg():
    from charles.model.presets import get_config

    return get_config("tiny", width=W, height=H)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    with torch_threads(1):
        yield


def batches(n: int, batch: int = 4, seed: int = 0) -> list[dict]:
    """n real batches from the real assembler (synthetic JPEG road frames at the model's size)."""
    buffers = Buffers(list(OUTPUTS), BufferConfig(capacity=batch * n, start_fraction=0.01, seed=seed))
    for name in OUTPUTS:
        buffers.add_set(make_set([name], [make_sample(i, height=H, width=W) for i in range(batch // 2 * n)]))
    asm = BatchAssembler(buffers, BatchConfig(batch_size=batch, image_size=(H, W), decode_threads=1))
    out = [asm.next_batch(timeout=1) for _ in range(n)]
    asm.close()
    return out


def trained(mcfg, n: int = 3, **tcfg) -> Trainer:
    torch.manual_seed(0)
    t = Trainer(mcfg, TrainerConfig(lr=1e-3, **tcfg))
    for b in batches(n):
        res = t.step(b)
        assert not res.skipped and np.isfinite(res.loss)
    return t


# ---- checkpoints --------------------------------------------------------------------------------------


def test_a_restart_resumes_the_batch_counter_optimizer_state_and_weights(mcfg, tmp_path):
    t = trained(mcfg, 3)
    path = t.save(tmp_path, extra={"run_config": {"run": "x"}})
    assert path.name == "batch_000000003"
    assert sorted(p.name for p in path.iterdir()) == [
        "optimizer.safetensors",
        "state.json",
        "weights.safetensors",
    ]
    state = json.loads((path / "state.json").read_text())
    assert state["batch"] == 3 and state["samples"] == 12 and state["run_config"] == {"run": "x"}
    assert state["code_version"] and state["optimizer"]["class"] == "AdamW"

    fresh = Trainer(mcfg, TrainerConfig(lr=1e-3))
    loaded, refused = ck.load_latest(tmp_path, mcfg, fresh.module)
    assert refused == [] and loaded is not None and loaded.batch == 3
    fresh.restore(loaded)
    assert fresh.batch == 3 and fresh.samples == 12
    for a, b in zip(t.module.state_dict().values(), fresh.module.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    sa, sb = t.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid, entries in sa["state"].items():
        for key, v in entries.items():
            assert torch.equal(v, sb["state"][pid][key]), (pid, key)
    # the next step is the same step on both: same batch, same weights, same optimizer moments
    nxt = batches(1, seed=5)[0]
    ra, rb = t.step(nxt), fresh.step(nxt)
    assert ra.loss == rb.loss and t.batch == fresh.batch == 4


def test_sgd_state_round_trips_without_pickle(mcfg, tmp_path):
    t = trained(mcfg, 2, optimizer="sgd", momentum=0.9)
    t.save(tmp_path)
    fresh = Trainer(mcfg, TrainerConfig(optimizer="sgd", momentum=0.9))
    loaded, _ = ck.load_latest(tmp_path, mcfg, fresh.module)
    fresh.restore(loaded)
    for pid, entries in t.optimizer.state_dict()["state"].items():
        assert torch.equal(
            entries["momentum_buffer"], fresh.optimizer.state_dict()["state"][pid]["momentum_buffer"]
        )
    adam = Trainer(mcfg, TrainerConfig(optimizer="adamw"))
    with pytest.raises(ck.CheckpointError, match="optimizer_mismatch"):
        adam.restore(loaded)


def test_leftover_temp_dirs_are_ignored_and_only_the_newest_k_are_kept(mcfg, tmp_path):
    t = trained(mcfg, 1)
    for _ in range(4):
        t.save(tmp_path)
        t.batch += 1
    # a crash mid-write leaves a hidden temp dir, newer than anything complete: never read, removed at start
    crashed = tmp_path / ".tmp-batch_000000099-123"
    crashed.mkdir()
    (crashed / "weights.safetensors").write_bytes(b"half a file")
    (tmp_path / "batch_000000077").mkdir()  # a directory without state.json: incomplete, refused
    assert [b for b, _ in ck.list_checkpoints(tmp_path)] == [1, 2, 3, 4, 77]
    assert ck.newest_weights(tmp_path) == tmp_path / "batch_000000004" / "weights.safetensors"
    loaded, refused = ck.load_latest(tmp_path, mcfg, t.module)
    assert loaded.batch == 4 and [e.reason for _, e in refused] == ["missing"]
    assert ck.prune(tmp_path, 2) == [tmp_path / "batch_000000001", tmp_path / "batch_000000002"]
    assert [b for b, _ in ck.list_checkpoints(tmp_path)] == [3, 4]
    # a crash between the two renames that replace a checkpoint: the old one is put back, not deleted
    os.rename(tmp_path / "batch_000000004", tmp_path / ".old-batch_000000004-123")
    assert ck.clean_temp(tmp_path) == [crashed] and not crashed.exists()
    assert (tmp_path / "batch_000000004" / "state.json").is_file()
    t.batch = 4  # the final checkpoint at a batch that already has one replaces it whole
    t.save(tmp_path, extra={"again": True})
    assert json.loads((tmp_path / "batch_000000004" / "state.json").read_text())["again"] is True
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        ("truncate", "corrupt"),
        ("flip", "checksum"),
        ("pickle", "pickle"),
        ("state_pickle", "pickle"),
        ("state_garbage", "corrupt"),
    ],
)
def test_a_damaged_checkpoint_is_refused_clearly_and_the_previous_good_one_is_used(
    mcfg, tmp_path, damage, reason, caplog
):
    t = trained(mcfg, 1)
    good = t.save(tmp_path)
    t.batch = 2
    bad = t.save(tmp_path)
    w = bad / "weights.safetensors"
    if damage == "truncate":
        w.write_bytes(w.read_bytes()[:-100])
    elif damage == "flip":
        data = bytearray(w.read_bytes())
        data[-5] ^= 0xFF
        w.write_bytes(bytes(data))
    elif damage == "pickle":
        torch.save(t.module.state_dict(), w)  # what a careless user might drop in: a zip of pickles
    elif damage == "state_pickle":
        import pickle

        (bad / "state.json").write_bytes(pickle.dumps({"batch": 2}))
    else:
        (bad / "state.json").write_text("{not json")
    fresh = Trainer(mcfg, TrainerConfig())
    loaded, refused = ck.load_latest(tmp_path, mcfg, fresh.module)
    assert loaded is not None and loaded.path == good and loaded.batch == 1
    assert [e.reason for _, e in refused] == [reason]
    assert refused[0][0].name == f"batch_000000002.refused-{reason}"  # moved aside: never retried, never kept
    assert f"refusing checkpoint {bad}" in caplog.text and "falling back" in caplog.text
    with pytest.raises(ck.CheckpointError, match=reason):
        ck.read_checkpoint(refused[0][0], mcfg)


def test_weights_of_another_model_are_refused(mcfg, tmp_path):
    trained(mcfg, 1).save(tmp_path)
    other = mcfg.replace(width=W * 2)
    with pytest.raises(ck.CheckpointError, match="config_mismatch"):
        ck.read_checkpoint(tmp_path / "batch_000000001", other)


def test_atomic_write_leaves_the_old_file_or_the_new_one(tmp_path):
    p = tmp_path / "manifest.json"
    ck.atomic_write(p, b"old")
    ck.atomic_write(p, b"new")
    assert p.read_bytes() == b"new" and [x.name for x in tmp_path.iterdir()] == ["manifest.json"]


# ---- the schedule -------------------------------------------------------------------------------------


def test_schedules_warm_up_then_follow_their_shape():
    cos = TrainerConfig(schedule="cosine", warmup_batches=10, schedule_batches=100, min_lr_ratio=0.1)
    assert lr_factor(0, cos) == pytest.approx(0.1) and lr_factor(9, cos) == pytest.approx(1.0)
    assert lr_factor(10, cos) == pytest.approx(1.0)
    assert lr_factor(60, cos) == pytest.approx(0.55)
    assert lr_factor(110, cos) == pytest.approx(0.1) and lr_factor(10_000, cos) == pytest.approx(0.1)
    step = TrainerConfig(schedule="step", step_batches=5, step_gamma=0.5)
    assert [lr_factor(b, step) for b in (0, 4, 5, 10)] == [1.0, 1.0, 0.5, 0.25]
    assert lr_factor(123, TrainerConfig()) == 1.0


def test_trainer_section_loads_from_the_run_configuration():
    cfg = config.load(
        environ={"CHARLES__TRAINER__BUFFER__CAPACITY": "500"},
        overrides=["trainer.optimizer=sgd", "trainer.storage.synchronous=full"],
    )
    assert cfg.trainer.optimizer == "sgd" and cfg.trainer.buffer.capacity == 500
    assert cfg.trainer.storage.synchronous == "FULL" and cfg.to_dict()["trainer"]["buffer"]["capacity"] == 500
    with pytest.raises(config.ConfigError, match="optimizer"):
        config.load(environ={}, overrides=["trainer.optimizer=lion"])
    assert TrainerConfig(batch_size=64).batch_for(2) == (64, 32)
    assert TrainerConfig(per_buffer=3).batch_for(2) == (6, 3)
    with pytest.raises(ValueError, match="split equally"):
        TrainerConfig(batch_size=5).batch_for(2)


# ---- runs and `charles models` ------------------------------------------------------------------------


def test_runs_are_versions_of_a_line_with_periods_and_a_listing(mcfg, tmp_path, capsys):
    ident = mcfg.identity()
    r1 = open_run("tiny", tmp_path, model=mcfg.to_dict(), identity=ident, name="demo")
    assert r1.name == "tiny_v1" and r1.path == tmp_path / "tiny" / "tiny_v1"
    assert {p.name for p in r1.path.iterdir()} == {"manifest.json", "checkpoints", "storage", "tb"}
    r1.start_period(0, "git:test")
    t = trained(mcfg, 2)
    path = t.save(r1.checkpoints)
    r1.progress(t.batch, t.samples, path)
    r1.stop_period(t.batch, t.samples, path, published=2)
    r1.start_period(2)  # a second session that dies: its period stays open, ending at the last checkpoint
    r1.progress(7, 28)
    assert open_run("tiny", tmp_path, identity=ident).name == "tiny_v1"  # the newest by default
    r2 = open_run("tiny", tmp_path, new=True, model=mcfg.to_dict(), identity=ident)
    assert r2.name == "tiny_v2" and versions("tiny", tmp_path) == [1, 2]
    assert open_run("tiny", tmp_path, version=5, identity=ident).name == "tiny_v5"
    with pytest.raises(RunError, match="different model"):
        open_run("tiny", tmp_path, version=1, identity=mcfg.replace(width=96).identity())
    r1.lock()
    with pytest.raises(RunError, match="another trainer"):
        open_run("tiny", tmp_path, version=1, identity=ident).lock()
    r1.unlock()

    assert find_run("tiny_v1", tmp_path).path == r1.path and find_run("tiny", tmp_path).name == "tiny_v5"
    assert newest_weights("tiny_v1", tmp_path) == path / "weights.safetensors"
    assert newest_weights("tiny", tmp_path) is None and newest_weights("nothing", tmp_path) is None

    assert models_main(["--run-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny — A RegNetX-200MF" in out and "tiny_v1" in out and "tiny_v2" in out
    assert "started from scratch, stopped at batch 2" in out
    assert "started from batch 2, training now, at batch 7" in out
    assert models_main(["--run-dir", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    v1 = next(r for r in listed["runs"] if r["run"] == "tiny_v1")
    assert v1["batch"] == 7 and v1["checkpoints"] == [2] and len(v1["periods"]) == 2
    assert v1["periods"][0]["open"] is False and v1["periods"][1]["open"] is True
    assert models_main(["--run-dir", str(tmp_path / "empty"), "--presets"]) == 0
    assert "model_0004_inceptionresnetv2 —" in capsys.readouterr().out


def test_cli_lists_models():
    from charles.cli import COMMANDS

    assert COMMANDS["models"][0] == "charles.trainer.models_list"


# ---- the console --------------------------------------------------------------------------------------


def test_loss_history_stays_bounded_and_spans_the_whole_run():
    h = LossHistory(max_points=10)
    for b in range(1, 1001):
        h.add(b, 1.0 / b)
    pts = h.snapshot()
    assert len(pts) <= 11 and pts[0][0] == 1 and pts[-1][0] == 1000
    assert all(a[0] < b[0] for a, b in zip(pts, pts[1:], strict=False))


def test_console_lines_and_heartbeat_info():
    state = {
        "status": "training",
        "run": "tiny_v1",
        "device": "cpu",
        "batch": 1250,
        "buffers": {
            "steering": {"fill": 90, "capacity": 100},
            "throttle_brake": {"fill": 45, "capacity": 100},
        },
        "reused": {"steering": 1200, "throttle_brake": 0},
        "samples_per_s": 12.5,
        "batches_per_s": 0.4,
        "loss": {"steering": 0.1, "throttle_brake": 0.2},
        "loss_total": 0.3,
        "lr": 1e-4,
        "collectors": ["c1", "c2"],
        "players": ["p1"],
        "published": 3,
        "last_publish_batch": 1250,
        "last_publish_time": time.time() - 5,
    }
    text = "\n".join(render_lines(state, 80))
    assert (
        "batch   1,250" in text and "steering" in text and "ready" in text and "collectors 2: c1, c2" in text
    )
    assert "3 updates sent, last at batch 1,250 (5s ago)" in text
    assert "reused  steering 1,200   throttle_brake 0" in text
    assert all(len(line) <= 80 for line in render_lines(state, 80))
    info = heartbeat_info(state)
    assert info == {
        "status": "training",
        "batch": 1250,
        "loss": 0.3,
        "fill": 0.45,
        "sps": 12.5,
        "published": 3,
    }
    state["flow"] = {
        "demand": 0.25,
        "reuse": 0.5,
        "target_reuse": 2.0,
        "insert_per_s": 25.0,
        "draw_per_s": 12.5,
    }
    assert heartbeat_info(state)["demand"] == 0.25, "collectors read the demand from the heartbeat"
    lines = render_lines(state, 120)
    assert "flow    25.0 in/s, 12.5 drawn/s: reuse 0.50 (aim 2) -> asks for less data (x0.25)" in lines


# ---- published weights in a fresh process -------------------------------------------------------------


@pytest.mark.slow
def test_published_weights_give_identical_predictions_in_a_fresh_process(mcfg, tmp_path):
    t = trained(mcfg, 2)
    t.module.eval()
    payload = t.weights_payload(half=False)
    (tmp_path / "w.safetensors").write_bytes(payload)
    frame = np.random.default_rng(0).integers(0, 255, (2, H, W, 3), dtype=np.uint8)
    np.save(tmp_path / "frame.npy", frame)
    from charles.model.inputs import prepare_batch

    with torch.no_grad():
        ours = {k: v.numpy() for k, v in t.module(**prepare_batch({"frame": frame}, mcfg)).items()}
    script = textwrap.dedent(
        f"""
        import numpy as np, torch
        from charles.model.inputs import prepare_batch
        from charles.model.weights import model_from_weights
        model, w = model_from_weights({str(tmp_path / "w.safetensors")!r})
        model.eval()
        frame = np.load({str(tmp_path / "frame.npy")!r})
        with torch.no_grad():
            out = model(**prepare_batch({{"frame": frame}}, w.config))
        np.savez({str(tmp_path / "out.npz")!r}, **{{k: v.numpy() for k, v in out.items()}})
        """
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", script], check=True, env=env, timeout=60)
    theirs = np.load(tmp_path / "out.npz")
    assert set(theirs.files) == set(ours)
    for k in ours:
        np.testing.assert_array_equal(theirs[k], ours[k])
    # the half-precision payload players usually get is half the bytes and close
    half = t.weights_payload(half=True)
    assert len(half) < 0.6 * len(payload)
    Path(tmp_path / "h.safetensors").write_bytes(half)
    from charles.model.weights import model_from_weights

    m2, _ = model_from_weights(tmp_path / "h.safetensors", mcfg)
    m2.eval()
    with torch.no_grad():
        out2 = m2(**prepare_batch({"frame": frame}, mcfg))
    for k in ours:
        np.testing.assert_allclose(out2[k].numpy(), ours[k], atol=2e-2)
