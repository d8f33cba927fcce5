"""What the model predicts: the outputs, their types and their bins.

One definition serves the balancer (which bins it balances), the trainer (losses and targets), the model
(head sizes) and the player (how to decode a prediction into a control value). Choose an output's type
here and everything downstream follows.

A *bin* is either an exact value (``0.0``) or an open range (``(0.0, 0.2)``), as the seed's balancing
wrote them: exact values matter because "exactly straight" and "exactly full throttle" dominate a raw
driving stream.
"""

from __future__ import annotations

import enum
import json
import math
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from charles.drive.controls import signals


class OutputKind(enum.StrEnum):
    """How one output is learned and decoded."""

    REGRESSION = "regression"
    """A value in the output's range; MSE loss; decoded by clipping."""
    CLASSIFICATION = "classification"
    """One class per bin; cross-entropy; decoded to the predicted bin's centre."""
    DELTA = "delta"
    """Classification over the *change* from the previous action; decoded as previous + bin centre."""


# The raw signals a sample carries. throttle_brake is GTA-style combined: +1 full throttle, -1 full brake.
SIGNALS: dict[str, tuple[float, float]] = {
    "steering": (-1.0, 1.0),
    "throttle_brake": (-1.0, 1.0),
    "throttle": (0.0, 1.0),
    "brake": (0.0, 1.0),
}


@dataclass(frozen=True, slots=True)
class Bin:
    """An exact value (lo == hi, exact) or the open interval (lo, hi)."""

    lo: float
    hi: float
    exact: bool = False

    def contains(self, x: float) -> bool:
        """Strict membership: the exact value, or strictly inside the range (edges: see BinIndex)."""
        if self.exact:
            return x == self.lo
        return self.lo < x < self.hi

    @property
    def centre(self) -> float:
        return self.lo if self.exact else (self.lo + self.hi) / 2.0

    def to_spec(self) -> float | list[float]:
        return self.lo if self.exact else [self.lo, self.hi]

    def __str__(self) -> str:
        return f"{self.lo:g}" if self.exact else f"({self.lo:g},{self.hi:g})"


def parse_bins(spec: Iterable[float | Sequence[float]]) -> list[Bin]:
    """Parse ``[0.0, [0.0, 0.2], ...]`` (numbers are exact bins, pairs are open ranges).

    Bins must be sorted and must not overlap; an exact value may sit on the edge of a range.
    """
    bins: list[Bin] = []
    for item in spec:
        if isinstance(item, int | float):
            b = Bin(float(item), float(item), True)
        else:
            lo, hi = (float(v) for v in item)
            if not lo < hi:
                raise ValueError(f"bin range ({lo}, {hi}) is empty: the low end must be below the high end")
            b = Bin(lo, hi, False)
        if not (math.isfinite(b.lo) and math.isfinite(b.hi)):
            raise ValueError(f"bin {b} is not finite")
        if bins:
            prev = bins[-1]
            if b.lo < prev.hi or (b.lo == prev.hi and b.exact and prev.exact):
                raise ValueError(f"bins must be sorted and disjoint: {prev} then {b}")
        bins.append(b)
    if not bins:
        raise ValueError("an output needs at least one bin")
    return bins


def fixed_width_bins(lo: float, hi: float, width: float, exact: Sequence[float] = ()) -> list[Bin]:
    """Ranges of ``width`` from lo to hi, with the given exact values as bins of their own (Balancing v2)."""
    n = round((hi - lo) / width)
    edges = [round(lo + i * width, 10) for i in range(n + 1)]
    bins = [Bin(a, b) for a, b in zip(edges[:-1], edges[1:], strict=True)]
    bins += [Bin(float(v), float(v), True) for v in exact]
    # an exact value on a range's low edge sorts before that range
    return sorted(bins, key=lambda b: (b.lo, 0 if b.exact else 1))


class BinIndex:
    """Value -> bin lookup for one bin list; ``-1`` where no bin holds the value.

    Exact bins win. Otherwise a value inside a range belongs to it; a value on the edge between two
    ranges belongs to the lower one, and an edge with no range below it (a saturated -1.0 steering with no
    exact -1.0 bin) joins the range it bounds, so edge values are never silently lost.
    """

    def __init__(self, bins: Sequence[Bin]):
        self.bins = list(bins)
        self._exact = np.array([b.lo for b in self.bins if b.exact], dtype=np.float64)
        self._exact_idx = np.array([i for i, b in enumerate(self.bins) if b.exact], dtype=np.int64)
        ranges = [(i, b) for i, b in enumerate(self.bins) if not b.exact]
        self._lo = np.array([b.lo for _, b in ranges], dtype=np.float64)
        self._hi = np.array([b.hi for _, b in ranges], dtype=np.float64)
        self._range_idx = np.array([i for i, _ in ranges], dtype=np.int64)
        self._exact_list = self._exact.tolist()
        self._exact_idx_list = self._exact_idx.tolist()
        self._ranges = [(b.lo, b.hi, i) for i, b in ranges]

    def __len__(self) -> int:
        return len(self.bins)

    def index(self, x: float) -> int:
        """The bin of one value (the balancer's hot path: plain Python, no array allocation)."""
        for v, i in zip(self._exact_list, self._exact_idx_list, strict=True):
            if x == v:
                return i
        for lo, hi, i in self._ranges:
            if lo < x <= hi:
                return i
        if self._ranges and x == self._ranges[0][0]:
            return self._ranges[0][2]
        return -1

    def indices(self, xs: np.ndarray) -> np.ndarray:
        xs = np.asarray(xs, dtype=np.float64)
        out = np.full(xs.shape, -1, dtype=np.int64)
        if len(self._lo):
            pos = np.searchsorted(self._hi, xs, side="left")
            pos_c = np.clip(pos, 0, len(self._lo) - 1)
            inside = (pos < len(self._lo)) & (xs > self._lo[pos_c]) & (xs <= self._hi[pos_c])
            out[inside] = self._range_idx[pos_c[inside]]
            out[xs == self._lo[0]] = self._range_idx[0]
        for v, i in zip(self._exact, self._exact_idx, strict=True):
            out[xs == v] = i
        return out

    def centres(self) -> np.ndarray:
        return np.array([b.centre for b in self.bins], dtype=np.float64)


@dataclass(frozen=True)
class OutputSpec:
    """One model output: which signal it predicts, how, and over which bins."""

    name: str
    """The signal: steering, throttle_brake (combined), throttle or brake."""
    kind: OutputKind = OutputKind.REGRESSION
    bins: tuple[Bin, ...] = field(default_factory=tuple)
    """Balancing bins; for classification the classes; for delta, bins over the per-frame change."""

    def __post_init__(self) -> None:
        if self.name not in SIGNALS:
            raise ValueError(f"unknown output {self.name!r}; choose one of {sorted(SIGNALS)}")
        object.__setattr__(self, "kind", OutputKind(self.kind))
        if not self.bins:
            raise ValueError(f"output {self.name!r} has no bins")

    @property
    def range(self) -> tuple[float, float]:
        return SIGNALS[self.name]

    @property
    def width(self) -> int:
        """Units in the model's output layer for this output."""
        return 1 if self.kind is OutputKind.REGRESSION else len(self.bins)

    def bin_index(self) -> BinIndex:
        return BinIndex(self.bins)

    def balance_value(self, value: float, previous: float | None) -> float:
        """The number the balancer bins: the value itself, or for delta outputs the change."""
        if self.kind is OutputKind.DELTA:
            # rounded as the trainer's targets are, so 0.3 - 0.2 lands in the exact 0.1 bin on both sides
            return round(value - (previous if previous is not None else value), 6)
        return value

    def decode(self, raw: np.ndarray, previous: float = 0.0) -> float:
        """Model output (1 value or one logit per bin) -> a control value in the signal's range."""
        lo, hi = self.range
        raw = np.asarray(raw, dtype=np.float64).reshape(-1)
        if self.kind is OutputKind.REGRESSION:
            v = float(raw[0])
        else:
            centre = self.bins[int(np.argmax(raw))].centre
            v = centre if self.kind is OutputKind.CLASSIFICATION else previous + centre
        if not math.isfinite(v):
            v = 0.0
        return float(min(max(v, lo), hi))

    def to_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind.value, "bins": [b.to_spec() for b in self.bins]}

    @classmethod
    def from_dict(cls, d: Mapping) -> OutputSpec:
        return cls(
            name=d["name"], kind=OutputKind(d.get("kind", "regression")), bins=tuple(parse_bins(d["bins"]))
        )


signals_from = signals
"""Every signal derived from the two a sample carries: charles.drive.controls.signals, the one split."""


# The seed's Balancing v1 bins.
V1_TRIGGER = [0.0, (0.0, 0.2), (0.2, 0.8), (0.8, 1.0), 1.0]
V1_STEERING = [-1.0, (-1.0, -0.6), (-0.6, -0.2), (-0.2, 0.0), 0.0, (0.0, 0.2), (0.2, 0.6), (0.6, 1.0), 1.0]
# Combined throttle/brake: the trigger bins mirrored, brake negative.
V1_THROTTLE_BRAKE = [
    -1.0,
    (-1.0, -0.8),
    (-0.8, -0.2),
    (-0.2, 0.0),
    0.0,
    (0.0, 0.2),
    (0.2, 0.8),
    (0.8, 1.0),
    1.0,
]


def default_bins(name: str, version: int = 3) -> list[Bin]:
    """The seed's bins for a signal: v1's coarse sets, or 0.1-wide bins (v2 and later)."""
    if version == 1:
        spec = {"steering": V1_STEERING, "throttle_brake": V1_THROTTLE_BRAKE}.get(name, V1_TRIGGER)
        return parse_bins(spec)
    exact = {"steering": [0.0], "throttle_brake": [-1.0, 0.0, 1.0]}.get(name, [0.0, 1.0])
    lo, hi = SIGNALS[name]
    return fixed_width_bins(lo, hi, 0.1, exact=exact)


def default_outputs(version: int = 3, kinds: Mapping[str, str] | None = None) -> list[OutputSpec]:
    """Steering and combined throttle/brake, regression unless ``kinds`` says otherwise."""
    kinds = kinds or {}
    return [
        OutputSpec(name, OutputKind(kinds.get(name, "regression")), tuple(default_bins(name, version)))
        for name in ("steering", "throttle_brake")
    ]


def outputs_signature(specs: Iterable[OutputSpec]) -> str:
    """What a balancer's sets mean to a trainer, short enough for a heartbeat: ``name:kind`` per output, and
    for classification and delta outputs a checksum of the bins too (they are the classes the model learns;
    a regression output's balancing bins change the mix, never the targets)."""
    parts = []
    for s in specs:
        part = f"{s.name}:{s.kind.value}"
        if s.kind is not OutputKind.REGRESSION:
            bins = json.dumps([b.to_spec() for b in s.bins]).encode()
            part += f":{zlib.crc32(bins):08x}"
        parts.append(part)
    return ",".join(parts)
