"""What the two player benchmarks share: a player with weights in this process, and the bare forward of
its network that both hold the player to.

- ``bench/player.py``: the player as a process of its own, driving the sim agent through a broker.
- ``bench/player_inprocess.py``: the player's loop (``PlayerService.step``) on the sim in this process.

Each compares predictions per second with :func:`bare_window`, the same network's plain forward, measured in
windows that alternate with its own (a shared box is noisy: each figure is from the best window of its kind).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from charles.runtime import free_ports  # noqa: E402

GPU_PRESET = "model_0004_inceptionresnetv2"
"""What the benchmarks run on a GPU: the big line at 480x270, where the goal is p99 latency <= 33 ms."""
WARM_STEPS = 30
"""Loop steps before any window: the first swap, allocations, the painter's first JPEGs."""


def setup() -> None:
    """One torch thread (the player's own setting in the CPU demo); only warnings from the services."""
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)


def make_player(preset: str, device: str, console_hz: float = 5.0, threads: int = 1):
    """A PlayerService on its sim, with weights of the preset already loaded (no broker needed); the first
    of :data:`WARM_STEPS` steps swaps them in."""
    from charles import config
    from charles.model.weights import save_weights
    from charles.player.service import PlayerService
    from charles.player.swap import WeightsMeta
    from charles.runtime import Service

    names = ["publish", "subscribe", "control", "subscribe_bulk"]
    data = {
        "model": {"preset": preset},
        "bus": {"host": "127.0.0.1", "ports": dict(zip(names, free_ports(len(names)), strict=True))},
        "player": {
            "realtime": False,
            "terminal": False,
            "console_hz": console_hz,
            "device": device,
            "threads": threads,
        },
        # untrained weights drive into walls: a long stuck window keeps Unstuck's non-predicting frames
        # (fade, settle) out of a throughput figure (water still triggers it; predicted_fraction says)
        "unstuck": {"window_s": 1e6},
    }
    svc = Service(
        "player", config.load(data=data, environ={}), instance="player-bench", http=False, signals=False
    )
    service = PlayerService(svc)
    p = service.swapper.predictors[0]
    service.swapper.load(
        save_weights(p.model, service.cfg, half=True),
        WeightsMeta(preset, f"{preset}_bench", 1, time.time(), ""),
    )
    return svc, service


def warm_up(service) -> None:
    for _ in range(WARM_STEPS):
        service.step()


def bare_window(service, n: int, channels_last: bool = True, folded: bool = False) -> tuple[float, float]:
    """The same model's plain forward: batch 1, inference mode, the player's input size. The network as
    timm and CharlesNet build it (``folded``: the player's own, batch norm folded into the convolutions).

    Returns (forwards per second of wall clock, CPU ms per forward of this process)."""
    active = service.swapper.active
    model, cfg, dev = (active.net if folded else active.model), service.cfg, active.device
    x = torch.randn(1, cfg.in_chans, cfg.height, cfg.width, device=dev)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    autocast = service.swapper.active.autocast
    with torch.inference_mode():
        for _ in range(3):
            model(image=x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n):
            if autocast is not None:
                with torch.autocast(dev.type, dtype=autocast):
                    model(image=x)
            else:
                model(image=x)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        return n / (time.perf_counter() - t0), (time.process_time() - c0) / n * 1000.0


def on_gpu(run: Callable[[], dict], preset: str = GPU_PRESET) -> dict | str:
    """``run()``'s figures for ``preset`` on CUDA, or why there are none."""
    if not torch.cuda.is_available():
        print(f"GPU: skipped (no CUDA): {preset} at 480x270, p99 <= 33 ms not measured", file=sys.stderr)
        return "skipped: no CUDA"
    torch.set_num_threads(4)
    gpu = run()
    print(f"GPU: {gpu}", file=sys.stderr)
    return gpu
