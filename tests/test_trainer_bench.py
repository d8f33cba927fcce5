"""Smoke test of the trainer benchmark's GPU comparison, run on the CPU with the tiny line (hidden flags):
our Trainer and the plain loop both train, and the JSON keys the GPU run reports are there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "trainer.py"


@pytest.mark.slow
def test_part_b_code_path_runs_on_the_cpu_with_a_tiny_line():
    cmd = [sys.executable, str(BENCH), "--quick", "--part", "b", "--b-device", "cpu", "--b-preset", "tiny"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=180, check=True, env=env)
    gpu = json.loads(out.stdout.strip().splitlines()[-1])["gpu"]
    assert {"ours", "plain_fp32", "speedup", "device"} <= gpu.keys() and gpu["preset"] == "tiny"
    for loop in ("ours", "plain_fp32"):
        assert gpu[loop]["images_per_s"] > 0 and 0 <= gpu[loop]["data_wait_fraction"] <= 1
