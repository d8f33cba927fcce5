"""Label streams that look like NPC driving, for the bench, the tests and ``charles balance-plot``.

Only labels matter to the balancer, so a sample here carries one shared 1x1 frame: building a stream
of a million samples costs labels, not images. The mix is deliberately lopsided the way real driving
is (mostly straight, mostly full throttle, saturated values exactly at -1/0/1) so the balancer has
something to do.
"""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from charles.proto.frames import Frame
from charles.proto.messages import Sample

RATE_HZ = 30.0
"""Collectors emit at 30 Hz of game time; synthetic timestamps follow it."""

_BLANK = Frame("raw", (1, 1, 3), bytes(3))

# (name, probability, steering target range, throttle_brake target range). Straight cruising dominates;
# hard turns and full braking are the rare bins that decide how fast sets complete.
_MANEUVERS = (
    ("cruise", 0.50, (0.0, 0.0), (1.0, 1.0)),
    ("correct", 0.18, (-0.15, 0.15), (0.5, 1.0)),
    ("turn", 0.14, (-0.7, 0.7), (0.0, 0.7)),
    ("hard_turn", 0.05, (-1.0, 1.0), (-0.4, 0.4)),
    ("coast", 0.06, (-0.1, 0.1), (0.0, 0.0)),
    ("brake", 0.07, (-0.3, 0.3), (-1.0, -0.1)),
)


def synthetic_labels(n: int, seed: int = 0) -> np.ndarray:
    """``n`` x 2 float64 (steering, throttle_brake): maneuvers of 0.5-4 s eased in from the last one."""
    rng = np.random.default_rng(seed)
    probs = np.array([m[1] for m in _MANEUVERS])
    out = np.empty((n, 2), dtype=np.float64)
    cur = np.zeros(2)
    i = 0
    while i < n:
        _, _, (slo, shi), (tlo, thi) = _MANEUVERS[rng.choice(len(_MANEUVERS), p=probs)]
        target = np.array([rng.uniform(slo, shi), rng.uniform(tlo, thi)])
        # NPCs saturate: a hard turn often is full lock, a brake often is a full stop
        if abs(target[0]) > 0.85 and rng.random() < 0.5:
            target[0] = np.sign(target[0])
        if target[1] < -0.85:
            target[1] = -1.0
        length = int(rng.integers(15, 120))
        ease = min(length, int(rng.integers(3, 12)))
        for k in range(min(length, n - i)):
            w = min(1.0, (k + 1) / ease)
            val = cur + (target - cur) * w
            if w < 1.0:
                val = val + rng.normal(0.0, 0.02, 2)
            out[i] = np.clip(val, -1.0, 1.0)
            i += 1
        cur = out[i - 1].copy()
    # The autopilot's "nothing" is an exact zero; tiny jitter around it would be an artefact.
    out[np.abs(out) < 1e-3] = 0.0
    return out


def samples_from_labels(labels: np.ndarray, collector: str = "synthetic", start_seq: int = 0) -> list[Sample]:
    """One Sample per label row, ``previous`` taken from the row before (None for the first)."""
    labels = np.asarray(labels, dtype=np.float64).reshape(-1, 2)
    rows = labels.tolist()
    samples = []
    prev: tuple[float, float] | None = None
    for k, (s, tb) in enumerate(rows):
        seq = start_seq + k
        samples.append(
            Sample(
                collector=collector,
                seq=seq,
                game_time=seq / RATE_HZ,
                frame=_BLANK,
                steering=s,
                throttle_brake=tb,
                speed=0.0,
                purpose=(0.0, 0.0),
                previous=prev,
            )
        )
        prev = (s, tb)
    return samples


def times(n: int, rate_hz: float = RATE_HZ, start: float = 0.0) -> Iterator[float]:
    """Arrival times of ``n`` samples at ``rate_hz`` (the balancer's ``now``)."""
    for k in range(n):
        yield start + k / rate_hz


def load_labels(path: str | Path) -> np.ndarray:
    """Recorded labels: ``.npy`` (N x 2) or CSV with ``steering`` and ``throttle_brake`` columns, in stream order."""
    path = Path(path)
    if path.suffix == ".npy":
        arr = np.load(path, allow_pickle=False)
    else:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            missing = {"steering", "throttle_brake"} - set(reader.fieldnames or ())
            if missing:
                raise ValueError(
                    f"{path}: CSV needs columns steering and throttle_brake; missing {sorted(missing)}"
                )
            arr = np.array(
                [[float(r["steering"]), float(r["throttle_brake"])] for r in reader], dtype=np.float64
            )
    arr = np.asarray(arr, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise ValueError(f"{path}: labels must be N x 2 (steering, throttle_brake), got shape {arr.shape}")
    return arr
