"""Benchmark the player's loop in process: the real ``PlayerService.step`` on the built-in sim, against a bare forward.

    python bench/player_inprocess.py [--quick] [--profile]

The loop drives the sim inside the bench process (sim source, no pacing), so the sim's own work is part of
every frame: ``pps_inprocess`` and ``ratio_inprocess`` (to ``bare_pps``, the same network's plain forward,
see bench/_player.py); ``sim_ms_per_frame`` says how much of a frame is the sim's and
``ratio_inprocess_excl_sim`` leaves it out. Latency (``latency_*_inprocess_ms``) is frame ready (rendered)
-> action decided. Tiny preset at 160x90, one torch thread, the Player Console at its normal 5 Hz. Windows of
the loop and of the bare forward alternate; each figure is from the best window of its kind.

The player as a process of its own, driving the sim agent through a broker, is bench/player.py.

On a GPU: ``model_0004_inceptionresnetv2`` at 480x270 through the same loop.

The last stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import report  # noqa: E402
from _player import GPU_PRESET, bare_window, make_player, on_gpu, setup, warm_up  # noqa: E402


class Timed:
    """Wraps the source's next/act to measure the sim's own share of a frame."""

    def __init__(self, source):
        self.source = source
        self.seconds = 0.0
        source.next, source.act = self._timed(source.next), self._timed(source.act)

    def _timed(self, fn):
        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.seconds += time.perf_counter() - t

        return timed


def loop_window(service, timed: Timed, frames: int) -> dict:
    service.latencies = collections.deque(maxlen=frames)
    p0, s0 = service.predictions, timed.seconds
    t0 = time.perf_counter()
    for _ in range(frames):
        service.step()
    wall = time.perf_counter() - t0
    preds = service.predictions - p0
    sim = timed.seconds - s0
    lat = np.asarray(service.latencies) * 1000.0
    return {
        "pps": preds / wall,
        "fps": frames / wall,
        "sim_ms": sim / frames * 1000.0,
        "player_ms": (wall - sim) / frames * 1000.0,
        "p50": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "predicted": preds / frames,
    }


def profile(service, frames: int) -> None:
    import cProfile
    import pstats

    pr = cProfile.Profile()
    pr.enable()
    for _ in range(frames):
        service.step()
    pr.disable()
    pstats.Stats(pr, stream=sys.stderr).sort_stats("cumulative").print_stats(30)


def run(preset: str, device: str, frames: int, repeats: int, prof: bool = False) -> dict:
    svc, service = make_player(preset, device)
    try:
        timed = Timed(service.source)
        warm_up(service)
        if prof:
            profile(service, frames)
        loops, bares = [], []
        for _ in range(repeats):
            loops.append(loop_window(service, timed, frames))
            bares.append(bare_window(service, frames)[0])
        best = max(loops, key=lambda r: r["pps"])
        bare = max(bares)
        player_pps = 1000.0 / best["player_ms"] * best["predicted"]
        return {
            "pps_inprocess": round(best["pps"], 1),
            "ratio_inprocess": round(best["pps"] / bare, 3),
            "latency_p50_inprocess_ms": round(best["p50"], 2),
            "latency_p99_inprocess_ms": round(best["p99"], 2),
            "sim_ms_per_frame": round(best["sim_ms"], 2),
            "player_ms_per_frame": round(best["player_ms"], 2),
            "ratio_inprocess_excl_sim": round(player_pps / bare, 3),
            "predicted_fraction_inprocess": round(best["predicted"], 3),
            "bare_pps": round(bare, 1),
            "preset": preset,
            "input": [service.cfg.width, service.cfg.height],
            "device": str(service.swapper.active.device),
            "frames": frames,
            "console_hz": service.config.console_hz,
        }
    finally:
        service.shutdown()
        svc.close()


def main() -> None:
    ap = argparse.ArgumentParser(
        description="the player's loop in process: predictions per second and latency"
    )
    ap.add_argument("--quick", action="store_true", help="finish in under 30 seconds")
    ap.add_argument("--profile", action="store_true", help="print a cProfile of the loop to stderr")
    args = ap.parse_args()
    setup()
    frames, repeats = (120, 4) if args.quick else (600, 5)
    t0 = time.perf_counter()
    out = run("tiny", "cpu", frames, repeats, args.profile)
    print(
        f"tiny {out['input'][0]}x{out['input'][1]} on {out['device']}, in process: {out['pps_inprocess']} pps "
        f"(ratio {out['ratio_inprocess']} to a bare forward of {out['bare_pps']}/s; sim "
        f"{out['sim_ms_per_frame']} ms + player {out['player_ms_per_frame']} ms a frame, ratio without the sim "
        f"{out['ratio_inprocess_excl_sim']}), latency p50 {out['latency_p50_inprocess_ms']} ms p99 "
        f"{out['latency_p99_inprocess_ms']} ms",
        file=sys.stderr,
    )
    out["gpu"] = on_gpu(lambda: run(GPU_PRESET, "cuda", *((150, 2) if args.quick else (600, 3))))
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    report(out)


if __name__ == "__main__":
    main()
