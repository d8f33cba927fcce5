"""Evaluation core: the metrics, the builtin policies, a callable policy, the CLI entry point."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from charles.drive.unstuck import UnstuckConfig
from charles.sim.config import NpcConfig, SimConfig, help_lines
from charles.sim.evaluate import evaluate
from charles.sim.session import DriveSession
from charles.sim.world import SimWorld

SMALL = SimConfig(blocks=3, traffic=1, hood_width=64, hood_height=36)
KEYS = {"km", "km_between_unstucks", "on_road_fraction", "collisions_per_km", "mean_speed_kmh", "unstucks"}


@pytest.mark.slow
def test_npc_far_better_than_random():
    npc = evaluate("npc", seed=0, minutes=1.5, sim=SMALL)
    rnd = evaluate("random", seed=0, minutes=1.5, sim=SMALL)
    for r in (npc, rnd):
        assert r.keys() >= KEYS
        assert 0.0 <= r["on_road_fraction"] <= 1.0 and r["km"] >= 0 and r["collisions_per_km"] >= 0
        assert r["km_between_unstucks"] == pytest.approx(r["km"] / max(1, r["unstucks"]))
    assert npc["km"] > 0.6 and npc["unstucks"] == 0 and npc["on_road_fraction"] >= 0.95
    assert 20.0 < npc["mean_speed_kmh"] < 90.0
    assert rnd["unstucks"] >= 3  # random controls barely move the car: Unstuck keeps firing
    assert npc["km_between_unstucks"] > 20 * rnd["km_between_unstucks"]


def test_callable_policy_gets_frames_history_and_purpose():
    seen = {}

    def policy(frame, speed, purpose, history):
        seen.setdefault("shape", frame.shape)
        seen["history"] = history.shape
        seen["purpose"] = purpose
        assert -np.pi <= purpose[0] <= np.pi and purpose[1] >= 0
        return 0.0, 0.6

    r = evaluate(policy, seed=0, minutes=0.1, sim=SMALL, history_len=8)
    assert seen["shape"] == (36, 64, 3) and seen["history"] == (8, 5)
    assert r["km"] > 0.0 and r["policy"] == "policy"


def test_session_history_and_unstuck_brake():
    world = SimWorld(SMALL)
    session = DriveSession(
        world, UnstuckConfig(window_s=1.0, fade_out_s=0.2, settle_s=0.2, fade_in_s=0.2), history_len=4
    )
    obs = session.observe()
    assert obs.driving and obs.history.shape == (4, 5) and not obs.history.any()
    ticks = [session.step((0.0, 0.0)) for _ in range(40)]  # standing still: stuck after 1 s
    assert any(t.teleported for t in ticks)
    assert all(t.action == (0.0, -1.0) for t in ticks if not t.unstuck.driving)  # brake while recovering
    while not session.observe(frame=False).driving:
        session.step((0.0, 0.0))
    session.step((0.25, 0.5))
    assert session.observe(frame=False).history[-1, :2].tolist() == [0.25, 0.5]
    assert session.unstuck.unstucks == 1


def test_constant_policy_and_config_help():
    r = evaluate("constant", seed=1, minutes=0.5, sim=SMALL)
    assert r["km"] > 0.05  # half throttle straight ahead does move
    for cls in (SimConfig, NpcConfig, UnstuckConfig):
        lines = help_lines(cls)
        assert lines and all(len(h) > 10 for h in lines.values()), cls


def test_cli_prints_one_json_line():
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "charles.sim.evaluate",
            "--policy",
            "constant",
            "--minutes",
            "0.1",
            "--blocks",
            "3",
            "--traffic",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result.keys() >= KEYS and result["policy"] == "constant"
