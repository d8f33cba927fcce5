"""Balancing v1..v4 as a plain, socket-free class: samples in, balanced sample sets out.

A raw driving stream is mostly "straight ahead at full throttle"; training on it teaches a model to do
only that. The balancer sorts every sample into bins of each output and lets samples go only as
*balanced sets*: one sample per bin, so every bin reaches the trainer equally often.

Groups and cells
    A *group* is what one kind of set balances; its *cells* are the bins a set must cover.

    - v1: one group over all outputs jointly; a cell is a combination of bins (steering x throttle x
      brake = 9 x 5 x 5 = 225 cells with the seed's three outputs, 81 with steering x throttle_brake).
    - v2: one group per output; cells are that output's bins; sets carry only that output's label
      (``labels_kept``), as the seed's per-output buffers did.
    - v3: as v2, but every sample keeps all labels, so all outputs train on the same images
      (``keep_labels`` adds labels that travel without being balanced).
    - v4: as v3, and when a bin holds several candidates the one chosen is the one whose *other*
      outputs' bins are rarest so far in this group's emitted sets (greedy sub-balancing).

    In v3/v4 one sample sits in every group at once (a reference, not a copy) and may be emitted once
    per group: the trainer keeps one buffer per balanced output and each buffer wants its own mix.

When a set is complete
    A set is *complete* when every *required* cell holds at least one sample; it then takes one sample
    from each (the oldest, or in v4 the sub-balancing choice). In v2..v4 every bin is required: any bin
    of a single control is reachable by driving. In v1 a cell is required when it is *structurally
    reachable*: throttle and brake are both cut from one combined trigger value, so a cell with throttle
    > 0 *and* brake > 0 can never fill and is not waited for (225 cells -> 81 required). Reachable but
    rare combinations (full lock left while braking hard) are still required; the timeout keeps those
    from stalling the stream.

Timeouts
    A group's set *opens* when its first sample arrives (or right after the previous set left, if samples
    are still held). If it has not completed ``set_timeout_s`` later, the policy applies to the set as it
    stands, one sample from each filled cell: ``flush`` emits it as a partial set (still one sample per
    bin it covers, so still balanced among those), ``drop`` discards those samples. Either way the event
    is counted and the next set opens at once. ``poll(now)`` checks timeouts; ``add`` checks them too, so
    a service that is never idle still times out.

Bounded memory
    Each cell holds at most ``cap_per_bin`` samples; a new one past that evicts the oldest (counted as
    ``bin_full``), so the balancer never holds more than ``cells x cap_per_bin`` samples per group
    whatever the stream does. Keeping the newest, not the first, matters because the stream changes as
    the collectors drive on.
"""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from charles.outputs import OutputKind, OutputSpec
from charles.proto.messages import Sample, SampleSet
from charles.sections.balancer import BalancerConfig

# Why a sample is refused (label_errors / rejected counter labels).
REJECT_NAN = "nan"
"""A label (or the previous action a delta output needs) is not a finite number."""
REJECT_NO_BIN = "no_bin"
"""The value falls in no configured bin (out of range, or between classes)."""
REJECT_NO_PREVIOUS = "no_previous"
"""A delta output needs the previous action and the sample carries none (first frame of a collector)."""
REJECT_REASONS = (REJECT_NAN, REJECT_NO_BIN, REJECT_NO_PREVIOUS)

# Why a held sample left without being emitted (evicted counter labels).
EVICT_BIN_FULL = "bin_full"
EVICT_TIMEOUT = "timeout_drop"
EVICT_REASONS = (EVICT_BIN_FULL, EVICT_TIMEOUT)

# How a set ended (sets counter labels).
SET_COMPLETE = "complete"
SET_FLUSHED = "flushed"
SET_DROPPED = "dropped"
SET_OUTCOMES = (SET_COMPLETE, SET_FLUSHED, SET_DROPPED)

# Signal codes: which of a sample's two labels an output reads, and how (mirrors charles.drive.controls.signals,
# inlined because building a dict per sample costs more than all the binning; a test keeps them in step).
_STEERING, _THROTTLE_BRAKE, _THROTTLE, _BRAKE = range(4)
_SIGNAL_CODE = {
    "steering": _STEERING,
    "throttle_brake": _THROTTLE_BRAKE,
    "throttle": _THROTTLE,
    "brake": _BRAKE,
}


def _signal(code: int, steering: float, throttle_brake: float) -> float:
    if code == _STEERING:
        return steering
    if code == _THROTTLE_BRAKE:
        return throttle_brake
    if code == _THROTTLE:
        return throttle_brake if throttle_brake > 0.0 else 0.0
    return -throttle_brake if throttle_brake < 0.0 else 0.0


# One held sample: the sample itself (opaque) and its bin in every output, computed once on arrival.
_Entry = tuple[Sample, tuple[int, ...]]


@dataclass(eq=False)
class _Group:
    """One kind of balanced set: its cells, what they hold, and its counters."""

    name: str
    outputs: list[str]
    """SampleSet.outputs: the outputs this group's sets balance."""
    labels_kept: list[str]
    key_outputs: tuple[int, ...]
    """Positions (in the balancer's output list) of the outputs that form a cell."""
    radix: tuple[int, ...]
    """Mixed-radix multipliers: cell = sum(bin[i] * radix[k]) over key_outputs."""
    required: list[bool]
    cells: list[deque[_Entry]]
    emitted: list[list[int]]
    """Per output (all of them, not only this group's), per bin: samples emitted in this group's sets."""
    n_required: int = 0
    filled: int = 0
    """Required cells holding at least one sample; the set is complete when this reaches n_required."""
    held: int = 0
    opened_at: float | None = None
    accepted: int = 0
    samples_emitted: int = 0
    sets: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SET_OUTCOMES, 0))
    evicted: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EVICT_REASONS, 0))

    def cell_of(self, bins: tuple[int, ...]) -> int:
        key = 0
        for pos, mult in zip(self.key_outputs, self.radix, strict=True):
            key += bins[pos] * mult
        return key


@dataclass
class GroupStats:
    """A snapshot of one group, for metrics, consoles and pictures."""

    name: str
    outputs: list[str]
    labels_kept: list[str]
    cells: int
    cells_required: int
    cells_filled: int
    held: int
    capacity: int
    """The most samples this group can ever hold: cells x cap_per_bin."""
    accepted: int
    samples_emitted: int
    sets: dict[str, int]
    evicted: dict[str, int]
    open_for_s: float | None
    """How long the current set has been waiting (None when nothing is held)."""
    fill: dict[str, np.ndarray]
    """Per output this group balances, per bin: samples held now (summed over the other outputs in v1)."""
    emitted: dict[str, np.ndarray]
    """Per output (all of them), per bin: samples emitted in this group's sets so far."""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values; :meth:`from_dict` reads them back."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {**d, "fill": _lists(self.fill), "emitted": _lists(self.emitted)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GroupStats:
        return cls(**{**d, "fill": _arrays(d["fill"]), "emitted": _arrays(d["emitted"])})


def _lists(counts: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {k: v.tolist() for k, v in counts.items()}


def _arrays(counts: dict[str, Sequence[int]]) -> dict[str, np.ndarray]:
    return {k: np.asarray(v, dtype=np.int64) for k, v in counts.items()}


@dataclass
class BalancerStats:
    """Everything the service exports: counters (monotonic), gauges (now) and the histograms behind them."""

    version: int
    outputs: list[str]
    bin_labels: dict[str, list[str]]
    arrived: int
    accepted: int
    rejected: dict[str, int]
    """Samples no group took, by the first reason found."""
    label_errors: dict[tuple[str, str], int]
    """(output, reason) -> samples whose label for that output could not be binned."""
    arrivals: dict[str, np.ndarray]
    """The raw stream: per output, per bin, every sample whose value for that output has a bin."""
    groups: dict[str, GroupStats]
    sets_per_s: float
    samples_per_s: float
    """Arrival and emission rates since the previous ``stats(now)`` call (0 on the first)."""

    @property
    def acceptance_rate(self) -> float:
        """Fraction of arrivals that some group took in (the rest had labels that cannot be binned)."""
        return self.accepted / self.arrived if self.arrived else 0.0

    @property
    def emit_rate(self) -> float:
        """Fraction of arrivals that left in a set (per group on average): how much of the stream trains."""
        if not self.arrived or not self.groups:
            return 0.0
        return sum(g.samples_emitted for g in self.groups.values()) / (self.arrived * len(self.groups))

    @property
    def evicted(self) -> dict[str, int]:
        out = dict.fromkeys(EVICT_REASONS, 0)
        for g in self.groups.values():
            for reason, n in g.evicted.items():
                out[reason] += n
        return out

    @property
    def sets(self) -> dict[str, int]:
        out = dict.fromkeys(SET_OUTCOMES, 0)
        for g in self.groups.values():
            for outcome, n in g.sets.items():
                out[outcome] += n
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON values (the service's ``/histogram.json``; ``balance-plot --from`` reads them back)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        return {
            **d,
            "label_errors": [[output, reason, n] for (output, reason), n in self.label_errors.items()],
            "arrivals": _lists(self.arrivals),
            "groups": {name: g.to_dict() for name, g in self.groups.items()},
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BalancerStats:
        return cls(
            **{
                **d,
                "label_errors": {(output, reason): n for output, reason, n in d["label_errors"]},
                "arrivals": _arrays(d["arrivals"]),
                "groups": {name: GroupStats.from_dict(g) for name, g in d["groups"].items()},
            }
        )

    def balanced_group(self, output: str) -> GroupStats:
        """The group whose sets balance ``output`` (the joint group in v1)."""
        for g in self.groups.values():
            if output in g.outputs:
                return g
        raise KeyError(output)


class Balancer:
    """Bins samples per output and emits balanced sets; see the module docstring for the rules.

    Single-threaded and socket-free: the service main calls :meth:`add` for every sample that arrives
    (``# 30 Hz x collectors <- sample.*``) and :meth:`poll` when idle, publishes what they return on
    ``set.*``, and exports :meth:`stats`. ``now`` is any monotonic clock in seconds (``time.monotonic()``
    in the service, synthetic time in tests), so timeouts are deterministic under test.
    """

    def __init__(self, config: BalancerConfig | None = None, outputs: Sequence[OutputSpec] | None = None):
        """``outputs`` overrides the config's outputs, so the model's own specs (classes!) can be shared."""
        self.config = config or BalancerConfig()
        self.specs: list[OutputSpec] = list(outputs) if outputs is not None else self.config.output_specs()
        if not self.specs:
            raise ValueError("the balancer needs at least one output")
        self.names = [s.name for s in self.specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"each output may appear once, got {self.names}")
        self.version = self.config.version
        self.cap = self.config.cap_per_bin
        self.timeout = self.config.set_timeout_s
        self.flush_on_timeout = self.config.timeout_policy == "flush"
        # v2 takes a sample into each output's group on its own; v1/v3/v4 keep every label, so a sample
        # with one unbinnable label would teach that output garbage: it is refused as a whole.
        self._need_all = self.version != 2

        indexers = [s.bin_index() for s in self.specs]
        # (signal code, is delta, bin lookup) per output: everything the hot path needs, resolved once.
        self._plan: list[tuple[int, bool, Callable[[float], int]]] = [
            (_SIGNAL_CODE[s.name], s.kind is OutputKind.DELTA, ix.index)
            for s, ix in zip(self.specs, indexers, strict=True)
        ]
        self._nbins = [len(s.bins) for s in self.specs]
        self.bin_labels = {s.name: [str(b) for b in s.bins] for s in self.specs}

        self.groups: list[_Group] = self._make_groups()
        # The v4 chooser scores candidates on the outputs outside the cell key.
        self._others = {
            id(g): tuple(i for i in range(len(self.specs)) if i not in g.key_outputs) for g in self.groups
        }

        self.arrived = 0
        self.accepted = 0
        self.rejected = dict.fromkeys(REJECT_REASONS, 0)
        self.label_errors = {(n, r): 0 for n in self.names for r in REJECT_REASONS}
        self.arrivals = [[0] * n for n in self._nbins]
        self._rate_mark: tuple[float, int, int] | None = None

    # -- construction -------------------------------------------------------------------------------------

    def _make_groups(self) -> list[_Group]:
        everyone = list(self.names)
        if self.version == 1:
            positions = tuple(range(len(self.specs)))
            return [self._group("+".join(everyone), everyone, everyone, positions, self._reachable_cells())]
        groups = []
        for i, name in enumerate(self.names):
            kept = [name] if self.version == 2 else everyone + list(self.config.keep_labels)
            groups.append(self._group(name, [name], kept, (i,), None))
        return groups

    def _group(
        self,
        name: str,
        outputs: list[str],
        kept: list[str],
        positions: tuple[int, ...],
        required: set[int] | None,
    ) -> _Group:
        radix, mult = [], 1
        for pos in reversed(positions):
            radix.append(mult)
            mult *= self._nbins[pos]
        n_cells = mult
        req = [True] * n_cells if required is None else [c in required for c in range(n_cells)]
        return _Group(
            name=name,
            outputs=list(outputs),
            labels_kept=list(kept),
            key_outputs=positions,
            radix=tuple(reversed(radix)),
            required=req,
            cells=[deque() for _ in range(n_cells)],
            emitted=[[0] * n for n in self._nbins],
            n_required=sum(req),
        )

    def _reachable_cells(self) -> set[int]:
        """v1's required cells: the bin combinations one (steering, throttle_brake) pair can produce.

        Outputs cut from the same raw label are coupled (throttle and brake both come from
        throttle_brake, so never both above zero). Each raw label's outputs are piecewise constant in it
        with breaks only at bin edges, so evaluating every edge and every midpoint between edges finds
        every reachable combination exactly. Delta outputs count as free: any change can follow any value.
        """
        per_axis: list[tuple[list[int], set[tuple[int, ...]]]] = []
        free: list[int] = []
        for axis in (_STEERING, _THROTTLE_BRAKE):
            members = [
                i for i, (code, delta, _) in enumerate(self._plan) if not delta and self._axis(code) == axis
            ]
            if not members:
                continue
            points = {-1.0, 0.0, 1.0}
            for i in members:
                code = self._plan[i][0]
                for b in self.specs[i].bins:
                    for v in (b.lo, b.hi):
                        points.add(-v if code == _BRAKE else v)
            raw = sorted(p for p in points if -1.0 <= p <= 1.0)
            raw += [(a + b) / 2.0 for a, b in itertools.pairwise(raw)]
            combos = set()
            for r in raw:
                s, tb = (r, 0.0) if axis == _STEERING else (0.0, r)
                combo = tuple(self._plan[i][2](_signal(self._plan[i][0], s, tb)) for i in members)
                if min(combo) >= 0:
                    combos.add(combo)
            per_axis.append((members, combos))
        free = [i for i, (_, delta, _) in enumerate(self._plan) if delta]

        radix, mult = [0] * len(self.specs), 1
        for pos in reversed(range(len(self.specs))):
            radix[pos] = mult
            mult *= self._nbins[pos]
        partial_keys = [
            [sum(b * radix[i] for i, b in zip(members, combo, strict=True)) for combo in combos]
            for members, combos in per_axis
        ]
        partial_keys += [[b * radix[i] for b in range(self._nbins[i])] for i in free]
        return {sum(parts) for parts in itertools.product(*partial_keys)}

    @staticmethod
    def _axis(code: int) -> int:
        return _STEERING if code == _STEERING else _THROTTLE_BRAKE

    # -- the hot path ---------------------------------------------------------------------------------------

    def bins_of(self, sample: Sample) -> tuple[tuple[int, ...], str | None]:
        """Each output's bin for this sample (-1 where it has none) and the first reason for a -1."""
        s, tb = sample.steering, sample.throttle_brake
        if not (math.isfinite(s) and math.isfinite(tb)):
            return (-1,) * len(self._plan), REJECT_NAN
        prev = sample.previous
        out: list[int] = []
        reason: str | None = None
        for code, delta, index in self._plan:
            v = _signal(code, s, tb)
            if delta:
                if prev is None:
                    out.append(-1)
                    reason = reason or REJECT_NO_PREVIOUS
                    continue
                ps, ptb = prev
                if not (math.isfinite(ps) and math.isfinite(ptb)):
                    out.append(-1)
                    reason = reason or REJECT_NAN
                    continue
                v -= _signal(code, ps, ptb)
            b = index(v)
            if b < 0:
                reason = reason or REJECT_NO_BIN
            out.append(b)
        return tuple(out), reason

    def add(self, sample: Sample, now: float | None = None) -> list[SampleSet]:
        """Take one sample; return the sets it completed and any that timed out (usually none)."""
        if now is None:
            now = time.monotonic()
        self.arrived += 1
        bins, reason = self.bins_of(sample)
        arrivals = self.arrivals
        for i, b in enumerate(bins):
            if b >= 0:
                arrivals[i][b] += 1
        if reason is not None:
            self._count_label_errors(bins, reason, sample)

        out: list[SampleSet] = []
        if reason is None:
            self.accepted += 1
            entry = (sample, bins)
            for g in self.groups:
                self._put(g, entry, now, out)
        elif not self._need_all:
            took = False
            for g in self.groups:
                if bins[g.key_outputs[0]] >= 0:
                    self._put(g, (sample, bins), now, out)
                    took = True
            if took:
                self.accepted += 1
            else:
                self.rejected[reason] += 1
        else:
            self.rejected[reason] += 1
        self._check_timeouts(now, out)
        return out

    def _count_label_errors(self, bins: tuple[int, ...], reason: str, sample: Sample) -> None:
        # Rare path: work out each output's own reason (the first found is what `reason` says).
        if reason == REJECT_NAN and not (
            math.isfinite(sample.steering) and math.isfinite(sample.throttle_brake)
        ):
            for name in self.names:
                self.label_errors[(name, REJECT_NAN)] += 1
            return
        for (_, delta, _), name, b in zip(self._plan, self.names, bins, strict=True):
            if b >= 0:
                continue
            if delta and sample.previous is None:
                why = REJECT_NO_PREVIOUS
            elif delta and not all(math.isfinite(p) for p in sample.previous):
                why = REJECT_NAN
            else:
                why = REJECT_NO_BIN
            self.label_errors[(name, why)] += 1

    def _put(self, g: _Group, entry: _Entry, now: float, out: list[SampleSet]) -> None:
        key = g.cell_of(entry[1])
        dq = g.cells[key]
        if not dq:
            if g.required[key]:
                g.filled += 1
        elif len(dq) >= self.cap:
            dq.popleft()  # keep the newest: the stream drifts as collectors drive on
            g.held -= 1
            g.evicted[EVICT_BIN_FULL] += 1
        dq.append(entry)
        g.held += 1
        g.accepted += 1
        if g.opened_at is None:
            g.opened_at = now
        if g.filled == g.n_required:
            out.append(self._emit(g, now, SET_COMPLETE))

    # -- sets -----------------------------------------------------------------------------------------------

    def _take(self, g: _Group) -> list[_Entry]:
        """One entry from every filled cell, removed from the cells (the set as it stands)."""
        taken: list[_Entry] = []
        others = self._others[id(g)] if self.version == 4 else ()
        for key, dq in enumerate(g.cells):
            if not dq:
                continue
            if others and len(dq) > 1:
                entry = self._choose(g, dq, others)
            else:
                entry = dq.popleft()
            taken.append(entry)
            if others:
                # greedy: count each pick at once so the rest of this set spreads around it
                for i in others:
                    b = entry[1][i]
                    if b >= 0:
                        g.emitted[i][b] += 1
            if not dq and g.required[key]:
                g.filled -= 1
        g.held -= len(taken)
        return taken

    @staticmethod
    def _choose(g: _Group, dq: deque[_Entry], others: tuple[int, ...]) -> _Entry:
        """v4: the candidate whose other outputs' bins are rarest in this group's emitted sets.

        Ties go to the oldest, so with nothing to gain v4 behaves exactly like v3.
        """
        emitted = g.emitted
        best_i, best_score = 0, -1
        for i, (_, bins) in enumerate(dq):
            score = 0
            for o in others:
                score += emitted[o][bins[o]]
            if best_score < 0 or score < best_score:
                best_i, best_score = i, score
                if score == 0:
                    break
        entry = dq[best_i]
        del dq[best_i]
        return entry

    def _emit(self, g: _Group, now: float, outcome: str) -> SampleSet:
        taken = self._take(g)
        subbalanced = self.version == 4
        for _, bins in taken:
            for i, b in enumerate(bins):
                if b >= 0 and not (subbalanced and i not in g.key_outputs):
                    g.emitted[i][b] += 1
        g.samples_emitted += len(taken)
        g.sets[outcome] += 1
        g.opened_at = now if g.held else None
        return SampleSet(
            outputs=list(g.outputs),
            version=self.version,
            samples=[s for s, _ in taken],
            labels_kept=list(g.labels_kept),
        )

    def _check_timeouts(self, now: float, out: list[SampleSet]) -> None:
        for g in self.groups:
            if g.opened_at is None or now - g.opened_at < self.timeout:
                continue
            if self.flush_on_timeout:
                out.append(self._emit(g, now, SET_FLUSHED))
            else:
                dropped = self._take_oldest(g)
                g.evicted[EVICT_TIMEOUT] += dropped
                g.sets[SET_DROPPED] += 1
                g.opened_at = now if g.held else None

    @staticmethod
    def _take_oldest(g: _Group) -> int:
        n = 0
        for key, dq in enumerate(g.cells):
            if dq:
                dq.popleft()
                n += 1
                if not dq and g.required[key]:
                    g.filled -= 1
        g.held -= n
        return n

    def poll(self, now: float | None = None) -> list[SampleSet]:
        """Apply the timeout policy to sets that waited too long; call it when no sample has come for a while."""
        out: list[SampleSet] = []
        self._check_timeouts(time.monotonic() if now is None else now, out)
        return out

    def flush(self) -> list[SampleSet]:
        """Emit every group's set as it stands (shutdown: what is held reaches the trainer, not the bin)."""
        now = time.monotonic()
        return [self._emit(g, now, SET_FLUSHED) for g in self.groups if g.held]

    # -- what the service exports -----------------------------------------------------------------------

    @property
    def held(self) -> int:
        """Samples held across groups (a sample held by two groups in v3/v4 counts twice)."""
        return sum(g.held for g in self.groups)

    @property
    def capacity(self) -> int:
        """The most samples the balancer can ever hold: the memory bound."""
        return sum(len(g.cells) for g in self.groups) * self.cap

    def next_deadline(self) -> float | None:
        """When the next timeout falls due, so the service can poll exactly then (None: nothing waits)."""
        opened = [g.opened_at for g in self.groups if g.opened_at is not None]
        return min(opened) + self.timeout if opened else None

    def stats(self, now: float | None = None, mark: bool = True) -> BalancerStats:
        """A snapshot (copies, safe to keep) of every counter and histogram.

        The rates cover the time since the previous call with ``mark`` set; a Prometheus scrape passes
        ``mark=False`` so it does not shorten the console's window (Prometheus makes its own rates).
        """
        if now is None:
            now = time.monotonic()
        groups = {g.name: self._group_stats(g, now) for g in self.groups}
        sets_total = sum(sum(g.sets[o] for o in (SET_COMPLETE, SET_FLUSHED)) for g in self.groups)
        sets_per_s = samples_per_s = 0.0
        if self._rate_mark is not None and now > self._rate_mark[0]:
            dt = now - self._rate_mark[0]
            sets_per_s = (sets_total - self._rate_mark[1]) / dt
            samples_per_s = (self.arrived - self._rate_mark[2]) / dt
        if mark:
            self._rate_mark = (now, sets_total, self.arrived)
        return BalancerStats(
            version=self.version,
            outputs=list(self.names),
            bin_labels={k: list(v) for k, v in self.bin_labels.items()},
            arrived=self.arrived,
            accepted=self.accepted,
            rejected=dict(self.rejected),
            label_errors=dict(self.label_errors),
            arrivals={n: np.array(a, dtype=np.int64) for n, a in zip(self.names, self.arrivals, strict=True)},
            groups=groups,
            sets_per_s=sets_per_s,
            samples_per_s=samples_per_s,
        )

    def _group_stats(self, g: _Group, now: float) -> GroupStats:
        lengths = np.array([len(dq) for dq in g.cells], dtype=np.int64)
        shape = [self._nbins[i] for i in g.key_outputs]
        per_cell = lengths.reshape(shape)
        fill = {}
        for axis, pos in enumerate(g.key_outputs):
            other_axes = tuple(a for a in range(len(shape)) if a != axis)
            fill[self.names[pos]] = per_cell.sum(axis=other_axes) if other_axes else per_cell.copy()
        return GroupStats(
            name=g.name,
            outputs=list(g.outputs),
            labels_kept=list(g.labels_kept),
            cells=len(g.cells),
            cells_required=g.n_required,
            cells_filled=int((lengths > 0).sum()),
            held=g.held,
            capacity=len(g.cells) * self.cap,
            accepted=g.accepted,
            samples_emitted=g.samples_emitted,
            sets=dict(g.sets),
            evicted=dict(g.evicted),
            open_for_s=None if g.opened_at is None else now - g.opened_at,
            fill=fill,
            emitted={n: np.array(e, dtype=np.int64) for n, e in zip(self.names, g.emitted, strict=True)},
        )


def run_stream(balancer: Balancer, samples: Iterable[Sample], times: Iterable[float]) -> list[SampleSet]:
    """Feed a recorded or synthetic stream through ``balancer``; every set it emitted, in order."""
    out: list[SampleSet] = []
    for sample, now in zip(samples, times, strict=False):
        out.extend(balancer.add(sample, now))
    return out
