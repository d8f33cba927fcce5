"""bench/gpu.py, the GPU half's one command: its CPU smoke run end to end (every part's real code path on
the tiny line: the trainer's loops, the compiled step, the player bench's command line, the CPU decode),
and its runner's promise that a part that fails, hangs or prints no figures is reported under its key
and stops nothing else, with a non-zero exit status at the end."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

GPU_BENCH = Path(__file__).resolve().parents[1] / "bench" / "gpu.py"


def gpu_bench():
    spec = importlib.util.spec_from_file_location("charles_bench_gpu", GPU_BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass looks its module up
    spec.loader.exec_module(module)
    return module


def numbers(tree, path=""):
    """Every number in a JSON tree, with where it is."""
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from numbers(v, f"{path}.{k}")
    elif isinstance(tree, list):
        for i, v in enumerate(tree):
            yield from numbers(v, f"{path}[{i}]")
    elif isinstance(tree, int | float) and not isinstance(tree, bool):
        yield path, tree


def smoke(*parts: str) -> dict:
    """``gpu.py --cpu-smoke`` (only ``parts`` when given): its JSON line, after the checks every run passes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(GPU_BENCH), "--cpu-smoke"] + (["--parts", ",".join(parts)] if parts else [])
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(done.stdout.strip().splitlines()[-1])
    assert r["mode"] == "cpu-smoke" and r["failed"] == [] and "error" not in r, r
    for where, x in numbers(r):
        assert math.isfinite(x) and x >= 0, f"{where} = {x}"
    assert r["machine"]["cuda_available"] is False and r["machine"]["torch"].startswith("2.")
    return r


def check_loop(loop: dict) -> None:
    assert loop["images_per_s"] > 0 and 0 <= loop["data_wait_fraction"] <= 1
    assert loop["peak_gpu_memory_mib"] is None  # no GPU: not measured, not made up


@pytest.mark.slow
def test_the_cpu_smoke_run_of_the_trainer_and_decode_parts_gives_real_figures():
    """The parts on the trainer's code path (its loops against the plain fp32 one, the CPU decode); the
    player's and the compiled step's parts take minutes on a CPU: make test-system runs the whole command."""
    r = smoke("machine", "decode", "trainer")
    trainer = r["trainer"]
    assert trainer["preset"] == "tiny" and trainer["device"] == "cpu" and trainer["speedup"] > 0
    check_loop(trainer["ours"])
    check_loop(trainer["plain_fp32"])
    decode = r["decode"]
    assert decode["frame"] == [480, 270] and decode["cpu"]["images_per_s"] > 0
    assert "unavailable" in decode["nvjpeg"] and "images_per_s" not in decode["nvjpeg"]
    assert set(r["part_seconds"]) == {"machine", "decode", "trainer"}


@pytest.mark.slow
@pytest.mark.system
def test_the_whole_cpu_smoke_run_reports_every_part_with_real_figures():
    r = smoke()
    for loop in (r["trainer"]["ours"], r["trainer"]["plain_fp32"], r["compile"]["ours"]):
        check_loop(loop)
    compiled = r["compile"]["compiled"]
    check_loop(compiled)
    assert compiled["backend"] == "aot_eager" and compiled["speedup_vs_ours"] > 0
    # compiling on the first steps is slower than the eager steps after it (dynamo traces the model)
    assert compiled["compile_s"] > 0
    assert compiled["pays_after_batches"] is None or compiled["pays_after_batches"] >= 1
    player = r["player"]["tiny"]
    assert player["device"] == "cpu" and player["pps"] > 0 and player["bare_pps"] > 0
    assert 0 < player["latency_p50_ms"] <= player["latency_p99_ms"]
    assert set(r["part_seconds"]) == {"machine", "decode", "trainer", "player", "compile"}


HANG = """
import subprocess, sys, time
# as the player bench's broker, game and player: a process of its own, here not even holding the pipes
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
)
open(sys.argv[1], "w").write(str(child.pid))
time.sleep(600)
"""


def running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_a_part_that_fails_hangs_or_prints_no_figures_is_reported_and_the_rest_still_run(
    monkeypatch, capsys, tmp_path
):
    gpu = gpu_bench()
    pid_file = tmp_path / "grandchild.pid"
    as_is = lambda data, smoke: data  # noqa: E731
    monkeypatch.setattr(
        gpu,
        "PARTS",
        [
            gpu.Part(
                "crash",
                30,
                lambda s: ["-c", "import sys; print('boom', file=sys.stderr); sys.exit(3)"],
                as_is,
            ),
            gpu.Part("hang", 3, lambda s: ["-c", HANG, str(pid_file)], as_is),
            gpu.Part("mute", 30, lambda s: ["-c", "print('no figures here')"], as_is),
            gpu.Part("fine", 30, lambda s: ["-c", "print('starting'); print('{\"x\": 1.5}')"], as_is),
        ],
    )
    try:
        assert gpu.main([]) == 1
    finally:
        grandchild = int(pid_file.read_text())
        left = running(grandchild)
        if left:
            os.kill(grandchild, signal.SIGKILL)
    assert not left, "what the hung part started was left running"
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["fine"] == {"x": 1.5}
    assert r["crash"]["error"] == "exit status 3" and "boom" in r["crash"]["output_tail"]
    assert r["hang"]["error"] == "ran past its time limit of 3 s"
    assert r["mute"]["error"].startswith("no figures: JSONDecodeError")
    assert r["failed"] == ["crash", "hang", "mute"] and set(r["part_seconds"]) == {
        "crash",
        "hang",
        "mute",
        "fine",
    }


def test_without_cuda_the_gpu_run_stops_after_saying_so(monkeypatch, capsys):
    gpu = gpu_bench()
    never = gpu.Part("trainer", 30, lambda s: ["-c", "raise SystemExit(1)"], lambda data, smoke: data)
    machine = next(p for p in gpu.PARTS if p.name == "machine")  # the real one: this box has no CUDA
    machine = dataclasses.replace(machine, limit_s=300)  # importing torch on a busy 2-core box
    monkeypatch.setattr(gpu, "PARTS", [machine, never])
    assert gpu.main([]) == 1
    r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert r["machine"]["cuda_available"] is False and "trainer" not in r
    assert r["error"].startswith("no CUDA here") and "--cpu-smoke" in r["error"]
