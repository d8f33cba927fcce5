"""``charles eval``: one JSON line of driving figures, for builtin policies, model weights and gym envs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from charles.cli import main as cli

KEYS = {"km", "km_between_unstucks", "on_road_fraction", "collisions_per_km", "mean_speed_kmh"}
SMALL = ["--set", "sim.blocks=3"]


def run_eval(capsys, *args: str) -> dict:
    assert cli(["eval", *args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1, lines
    return json.loads(lines[0])


def test_npc_and_random_print_the_figures_and_the_npc_drives_far_better(capsys):
    npc = run_eval(capsys, "--policy", "npc", "--seed", "1", "--minutes", "0.3", *SMALL)
    rnd = run_eval(capsys, "--policy", "random", "--seed", "1", "--minutes", "0.3", *SMALL)
    for r in (npc, rnd):
        assert set(r) >= KEYS and {"unstucks", "collisions", "ticks"} <= set(r)
        assert r["ticks"] == 540
    assert npc["policy"] == "npc" and rnd["policy"] == "random"
    assert npc["km"] > 5 * max(rnd["km"], 0.001)
    assert npc["km_between_unstucks"] > rnd["km_between_unstucks"]
    assert npc["mean_speed_kmh"] > 20


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    """The tiny preset, stacking 2 frames and reading a short history, saved as safetensors."""
    pytest.importorskip("timm")
    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights

    cfg = get_config("tiny_memory").replace(frames=2, frame_stride=2, history_length=8, use_previous=True)
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(build_model(cfg), cfg, path)
    return path, cfg


def test_weights_drive_through_the_players_code_path(capsys, tiny_weights):
    path, _ = tiny_weights
    r = run_eval(capsys, "--policy", f"weights:{path}", "--minutes", "0.05", *SMALL)
    assert set(r) >= KEYS and r["policy"] == f"weights:{path}" and r["ticks"] == 90


def test_model_policy_sees_what_the_trainer_sees(tiny_weights):
    from charles.drive.frames import as_trainer_sees
    from charles.drive.policy import ModelPolicy

    path, cfg = tiny_weights
    policy = ModelPolicy.from_weights(path, codec="jpeg", quality=90)
    seen = []
    real = policy.predictor.predict

    def spy(frame, **kw):
        seen.append((frame, kw))
        return real(frame, **kw)

    policy.predictor.predict = spy
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (270, 480, 3), dtype=np.uint8) for _ in range(4)]
    history = np.zeros((60, 5), np.float32)
    history[-1, :2] = (0.3, -0.2)
    for f in frames:
        st, tb = policy(f, 5.0, (0.5, 80.0), history)
        assert -1 <= st <= 1 and -1 <= tb <= 1
    frame, kw = seen[-1]
    np.testing.assert_array_equal(frame, as_trainer_sees(frames[-1], cfg.width, cfg.height, "jpeg", 90))
    assert kw["previous"] == (pytest.approx(0.3), pytest.approx(-0.2))
    assert kw["stack"].shape == (1, cfg.height, cfg.width, 3)
    # stride 2: the stacked frame of the 4th call is the 2nd call's picture
    np.testing.assert_array_equal(kw["stack"][0], seen[1][0])
    assert kw["history"].shape == (60, 5)
    policy.reset()
    policy(frames[0], 5.0, (0.5, 80.0), history)  # after a reset the frame itself stands in for the past
    np.testing.assert_array_equal(seen[-1][1]["stack"][0], seen[-1][0])


def test_gym_env_adds_the_episode_return(capsys):
    args = [
        "--env",
        "gym:Charles/Drive-v0",
        "--minutes",
        "0.1",
        "--set",
        "collector.gym_kwargs={max_steps: 100}",
    ]
    npc = run_eval(capsys, "--policy", "npc", "--expert", "charles.sim.gym_env:npc_expert", *args)
    rnd = run_eval(capsys, "--policy", "random", *args)
    for r in (npc, rnd):
        assert KEYS | {"episode_return", "episodes"} <= set(r) and r["ticks"] == 180 and r["episodes"] >= 1
    assert npc["episode_return"] > rnd["episode_return"]


def test_bad_policies_and_weights_are_clear_errors(capsys, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04not really a pickle")
    assert cli(["eval", "--policy", f"weights:{bad}", "--minutes", "0.01"]) == 2
    assert "pickle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["eval", "--policy", "fast", "--minutes", "0.01"])


def test_compare_drives_checkpoints_on_the_same_towns_and_writes_a_table_and_a_png(capsys, tmp_path):
    """Real files: a weights file, a checkpoint folder of a run, and the NPC, on two towns."""
    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights

    cfg = get_config("tiny")
    plain = tmp_path / "plain.safetensors"
    save_weights(build_model(cfg), cfg, plain)
    ckpt = tmp_path / "runs" / "tiny" / "tiny_v3" / "checkpoints" / "batch_000000250"
    ckpt.mkdir(parents=True)
    save_weights(build_model(cfg), cfg, ckpt / "weights.safetensors")
    png = tmp_path / "out" / "compare.png"
    args = ["eval", "--compare", str(plain), str(ckpt), "npc", "--seeds", "9001,9002", "--minutes", "0.05"]
    assert cli([*args, "--png", str(png), *SMALL]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    report = json.loads(out[-1])
    assert report["seeds"] == [9001, 9002] and report["png"] == str(png)
    rows = {r["label"]: r for r in report["rows"]}
    assert set(rows) == {"plain", "tiny_v3@250", "npc"}
    for r in rows.values():
        assert set(r) >= KEYS and [t["seed"] for t in r["per_seed"]] == [9001, 9002]
    assert rows["npc"]["km"] > 0.01 and rows["npc"]["km_between_unstucks"] > 0
    table = "\n".join(out[:-2])
    assert "km/unstuck" in table and "tiny_v3@250" in table and "9001, 9002" in table
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_refuses_a_missing_or_foreign_file_before_driving_anything(capsys, tmp_path):
    bad = tmp_path / "model.pt"
    bad.write_bytes(b"\x80\x04not safetensors at all")
    assert cli(["eval", "--compare", "npc", str(bad), "--minutes", "0.05", *SMALL]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "pickle" in err and "safetensors" in err
    assert cli(["eval", "--compare", str(tmp_path / "nowhere"), "--minutes", "0.05"]) == 2
    assert "no such file or checkpoint folder" in capsys.readouterr().err
    assert not (tmp_path / "compare.png").exists()
