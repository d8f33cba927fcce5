"""Synthetic samples with road-like frames, for the trainer's tests and benches.

Random noise would make JPEGs several times larger than real hood-camera frames and flatter every storage
and decode number; these frames (sky, road, lane marks, blocks, mild sensor noise) encode to about the
25 KB that a 480x270 game frame does at quality 88, so throughput measured on them means something.
"""

from __future__ import annotations

import cv2
import numpy as np

from charles.proto.frames import Frame
from charles.proto.messages import HISTORY_FIELDS, Sample, SampleSet


def road_image(
    i: int, height: int = 270, width: int = 480, rng: np.random.Generator | None = None
) -> np.ndarray:
    """An RGB uint8 frame that looks (to a JPEG encoder) roughly like a hood camera on a road."""
    rng = rng or np.random.default_rng(i)
    y = np.arange(height, dtype=np.float32)[:, None]
    x = np.arange(width, dtype=np.float32)[None, :]
    img = np.empty((height, width, 3), np.float32)
    horizon = height * (0.45 + 0.03 * np.sin(i * 0.1))
    sky = np.broadcast_to(y < horizon, (height, width))
    img[..., 0] = np.where(sky, 120 + 60 * y / height, 70)
    img[..., 1] = np.where(sky, 160 + 40 * y / height, 75)
    img[..., 2] = np.where(sky, 230, 80)
    cx = width / 2 + width / 8 * np.sin(i * 0.05)
    road = ~sky & (np.abs(x - cx) < (y - horizon) * 1.2)
    img[road] = (90, 90, 95)
    lane = road & (np.abs(x - cx) < 2 + (y - horizon) * 0.02) & ((y.astype(int) // 12 + i) % 2 == 0)
    img[lane] = (230, 230, 210)
    for k in range(6):
        bx = int((k * 97 + i * 3) % width)
        by = int(horizon - height / 7 - (k * 13) % (height // 9 + 1))
        cv2.rectangle(
            img, (bx, by), (bx + width // 16 + k * 5, int(horizon)), (40 + k * 20, 60, 50 + k * 10), -1
        )
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_sample(
    i: int,
    frame: Frame | None = None,
    *,
    height: int = 270,
    width: int = 480,
    codec: str = "jpeg",
    quality: int = 88,
    history_len: int = 0,
    stack_len: int = 0,
    collector: str = "synthetic",
) -> Sample:
    """Sample number i with deterministic labels; pass ``frame`` to reuse one encoded frame (fast)."""
    rng = np.random.default_rng(i)
    if frame is None:
        frame = Frame.encode(road_image(i, height, width, rng), codec, quality)
    history = None
    if history_len:
        history = rng.uniform(-1, 1, (history_len, len(HISTORY_FIELDS))).astype(np.float32)
    return Sample(
        collector=collector,
        seq=i,
        game_time=i / 30.0,
        frame=frame,
        steering=float(np.sin(i * 0.37)),
        throttle_brake=float(np.cos(i * 0.11)),
        speed=float(10 + i % 20),
        purpose=(float(np.sin(i * 0.01)), float(100 + i % 50)),
        history=history,
        stack=[frame] * stack_len,
        previous=(float(np.sin((i - 1) * 0.37)), float(np.cos((i - 1) * 0.11))),
    )


def make_frames(
    n: int, height: int = 270, width: int = 480, codec: str = "jpeg", quality: int = 88
) -> list[Frame]:
    """n distinct encoded frames (encoding is the slow part; benches cycle through a few hundred)."""
    return [Frame.encode(road_image(i, height, width), codec, quality) for i in range(n)]


def make_set(
    outputs: list[str], samples: list[Sample], version: int = 2, labels_kept: list[str] | None = None
) -> SampleSet:
    """A balanced set as the balancer would send it (v2 keeps only the balanced output's label)."""
    kept = list(outputs) if labels_kept is None else labels_kept
    return SampleSet(outputs=list(outputs), version=version, samples=samples, labels_kept=kept)
