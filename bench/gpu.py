"""The GPU half, measured: one command on a machine with an NVIDIA GPU, one JSON line.

    make bench-gpu                      make install (torch 2.14.1 from PyPI: the CUDA build), then this
    python bench/gpu.py [--parts ...]   (from the repository or bench/; --parts to run again what failed)
    python bench/gpu.py --cpu-smoke     the same code paths on a CPU with tiny sizes: not a measurement

Each part is a process of its own, run one after the other (none shares the GPU with another) under its
own time limit; together they stay within BUDGET_S. A part that fails or runs out of time is reported
under its key as ``{"error": ..., "output_tail": ...}``, the others still run, and the exit status is 1.

machine  torch, CUDA and the GPU this ran on.
decode   bench/trainer.py part (d): nvJPEG batch decode of 480x270 JPEGs (torchvision's decode_jpeg on the
         GPU, and the trainer's CUDA path around it) against the trainer's CPU decode, images/s.
trainer  bench/trainer.py part (b): model_0004 (inception_resnet_v2 at 480x270) trained by our Trainer as
         the service runs it (bf16 autocast, channels_last, fused AdamW, nvJPEG on the prefetch thread)
         against a plain fp32 loop on the same backbone: images/s, data-wait fraction and peak GPU memory
         of each, and the speed-up.
player   bench/player.py's command line (--quick --gpu-presets ...): the player as a process of its own,
         on the GPU for model_0004 and model_0012 (RegNet) at 480x270: predictions/s, p50/p99
         frame-to-action latency (goal p99 <= 33 ms).
compile  our Trainer under torch.compile (inductor) against the same step eager, in one process: steady
         images/s, compile time, speed-up, and after how many batches compiling pays (null: never).
         Last, as the part most likely to run long.

``--cpu-smoke``: the same parts with the tiny preset and small batches on the CPU, the compiled step with
the aot_eager backend (inductor's C++ build takes minutes on a small CPU); nvJPEG is reported unavailable,
GPU memory as null. It proves that the command runs end to end, so the GPU run is a formality.

The last stdout line is the JSON object; progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
PLAYER_BENCH = BENCH / "player.py"
"""The player's benchmark, used only through its command line (``player_argv``, ``player_figures``)."""
BUDGET_S = 540
"""All parts together on the GPU machine: the whole command ends well inside ten minutes."""
SMOKE_SLACK = 3
"""--cpu-smoke: limits this many times longer (a shared 2-core box takes 12 s just to import torch)."""
GPU_PRESETS = ("model_0004_inceptionresnetv2", "model_0012_regnet")
"""The lines whose player figures the GPU run reports."""


@dataclass
class Part:
    name: str
    limit_s: int
    """Its share of BUDGET_S (the limits add up to it)."""
    argv: Callable[[bool], list[str]]
    """The command after ``python``, for the GPU (False) or the CPU smoke run (True)."""
    figures: Callable[[dict, bool], dict]
    """Its figures from the command's JSON line; raises ValueError when they are not there."""


# ---- what each part runs and reports ----------------------------------------------------------------------

MACHINE = """
import json, torch, torchvision
cuda = torch.cuda.is_available()
print(json.dumps({
    "torch": torch.__version__, "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
    "cuda_available": cuda, "gpus": torch.cuda.device_count() if cuda else 0,
    "gpu": torch.cuda.get_device_name() if cuda else None,
    "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1) if cuda else None,
}))
"""


def trainer_argv(smoke: bool, *extra: str) -> list[str]:
    """bench/trainer.py part (b): on the GPU model_0004 at its size, on the CPU tiny at batches of 8."""
    if smoke:
        sizes = ["--quick", "--b-device", "cpu", "--b-preset", "tiny", "--b-batch", "8", "--b-steps", "3"]
        return [str(BENCH / "trainer.py"), "--part", "b", *sizes, *extra]
    return [str(BENCH / "trainer.py"), "--part", "b", "--b-device", "cuda", *extra]


def gpu_section(data: dict) -> dict:
    gpu = data.get("gpu")
    if not isinstance(gpu, dict) or "skipped" in gpu:
        raise ValueError(f"bench/trainer.py measured no training: {gpu}")
    return gpu


def trainer_figures(data: dict, smoke: bool) -> dict:
    gpu = gpu_section(data)
    keys = ("ours", "plain_fp32", "speedup", "device", "preset", "input", "batch")
    return {k: gpu[k] for k in keys}


def compile_figures(data: dict, smoke: bool) -> dict:
    gpu = gpu_section(data)
    return {
        "ours": gpu["ours"],
        "compiled": gpu["compiled"],
        "preset": gpu["preset"],
        "device": gpu["device"],
    }


def decode_figures(data: dict, smoke: bool) -> dict:
    decode = data["decode"]
    if not smoke and "images_per_s" not in decode["nvjpeg"]:
        raise ValueError(f"nvJPEG was not measured: {decode['nvjpeg']}")
    return decode


PLAYER_KEYS = (
    "pps",
    "latency_p50_ms",
    "latency_p99_ms",
    "bare_pps",
    "ratio_to_bare",
    "preset",
    "input",
    "device",
)


def player_argv(smoke: bool) -> list[str]:
    """The player's figures come from its own benchmark's command line: ``--quick`` measures the tiny line
    on the CPU and, where CUDA is, each of GPU_PRESETS on the GPU (its JSON's ``gpu_presets``)."""
    return [str(PLAYER_BENCH), "--quick"] + ([] if smoke else ["--gpu-presets", ",".join(GPU_PRESETS)])


def player_figures(data: dict, smoke: bool) -> dict:
    if smoke:
        return {data["preset"]: {k: data[k] for k in PLAYER_KEYS}}
    out = {}
    for preset in GPU_PRESETS:
        gpu = data.get("gpu_presets", {}).get(preset)
        if not isinstance(gpu, dict):
            raise ValueError(f"bench/player.py measured nothing on the GPU for {preset}: {gpu!r}")
        out[preset] = {**{k: gpu[k] for k in PLAYER_KEYS}, "p99_goal_met": gpu["p99_goal_met"]}
    return out


PARTS = [
    Part("machine", 30, lambda smoke: ["-c", MACHINE], lambda data, smoke: data),
    Part(
        "decode",
        45,
        lambda smoke: (
            [str(BENCH / "trainer.py"), "--part", "d"]
            + (["--quick", "--b-device", "cpu"] if smoke else ["--b-device", "cuda"])
        ),
        decode_figures,
    ),
    # two IRv2 builds and 33 steps each (~1 min); the player bench's tiny CPU run, then IRv2 on the GPU in
    # three processes; eager steps, then inductor compiling IRv2's forward and backward (minutes)
    Part("trainer", 105, trainer_argv, trainer_figures),
    Part("player", 150, player_argv, player_figures),
    Part(
        "compile",
        210,
        lambda smoke: trainer_argv(
            smoke, "--b-loops", "ours,compiled", *(["--b-compile-backend", "aot_eager"] if smoke else [])
        ),
        compile_figures,
    ),
]
assert sum(p.limit_s for p in PARTS) == BUDGET_S


# ---- running them -----------------------------------------------------------------------------------------


def tail(text: str | bytes | None, lines: int = 15) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return "\n".join((text or "").strip().splitlines()[-lines:])


def run_part(part: Part, smoke: bool, limit_s: float) -> dict:
    """Run one part in a session of its own (the player bench starts processes of its own: a time limit
    ends all of them); its figures, or what went wrong."""
    cmd = [sys.executable, *part.argv(smoke)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if smoke:
        env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.Popen(
        cmd, cwd=BENCH, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        return {"error": f"ran past its time limit of {limit_s:.0f} s", "output_tail": tail(err or out)}
    finally:
        if proc.poll() is None:  # this process was interrupted: leave nothing running
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}", "output_tail": tail(err or out)}
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return part.figures(json.loads(lines[-1]), smoke)
    except (IndexError, ValueError, KeyError, TypeError) as e:
        return {"error": f"no figures: {type(e).__name__}: {e}", "output_tail": tail(err or out)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--cpu-smoke", action="store_true", help="tiny sizes on the CPU: the code paths, not a measurement"
    )
    names = [p.name for p in PARTS]
    ap.add_argument(
        "--parts", default=",".join(names), help=f"comma-separated parts to run (default: all of {names})"
    )
    args = ap.parse_args(argv)
    wanted = args.parts.split(",")
    if unknown := sorted(set(wanted) - set(names)):
        ap.error(f"unknown parts {unknown}; choose from {names}")
    t0 = time.monotonic()
    result: dict = {"bench": "gpu", "mode": "cpu-smoke" if args.cpu_smoke else "gpu"}
    seconds: dict[str, float] = {}
    for part in PARTS:
        if part.name not in wanted:
            continue
        limit_s = part.limit_s * (SMOKE_SLACK if args.cpu_smoke else 1)
        print(f"== {part.name} (at most {limit_s} s)", file=sys.stderr, flush=True)
        t1 = time.monotonic()
        result[part.name] = run_part(part, args.cpu_smoke, limit_s)
        seconds[part.name] = round(time.monotonic() - t1, 1)
        print(
            f"   {seconds[part.name]} s: {json.dumps(result[part.name])[:400]}", file=sys.stderr, flush=True
        )
        machine = result.get("machine", {})
        if part.name == "machine" and not args.cpu_smoke and machine.get("cuda_available") is False:
            result["error"] = (
                "no CUDA here: this measures the GPU (--cpu-smoke runs its code paths on a CPU). With an "
                "NVIDIA GPU, PyPI's torch 2.14.1 is a CUDA 13 build and wants a 580-series driver or newer; "
                "for an older one install torch==2.14.1 torchvision==0.29.1 from "
                "https://download.pytorch.org/whl/cu126 into .venv"
            )
            break
    result["failed"] = sorted(k for k, v in result.items() if isinstance(v, dict) and "error" in v)
    result["part_seconds"] = seconds
    result["seconds"] = round(time.monotonic() - t0, 1)
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
    return 1 if result["failed"] or "error" in result else 0


if __name__ == "__main__":
    sys.exit(main())
