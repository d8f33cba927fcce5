"""The trainer's sample buffers: one bounded, randomly drawn pool per balanced output.

The seed's rule (Storage and Buffer page): every balanced output gets its own buffer of 25,000 samples;
training starts once *every* buffer is at least 90 % full, and each batch draws the same number of random
samples from each buffer and removes them, so a sample trains the model once and batches stay random.

Beyond the seed:

* ``samples_per_insert`` (Reverb's sample-to-insert ratio) lets a sample serve up to
  ``ceil(samples_per_insert)`` batches when collectors cannot keep up, while the total number of draws
  from a buffer never exceeds ``samples_per_insert`` times the samples ever inserted into it. 1.0 is the
  seed's consume-once. Every draw of an already drawn sample is counted as a reuse.
* A full buffer evicts to make room and counts it. The default evicts the *oldest* sample: the on-disk
  storage rotates oldest-first too, so memory and disk keep the same samples, and when collectors outrun
  the trainer the freshest data (current weather, current balancing) is what trains. ``random`` eviction
  keeps a longer time horizon instead (reservoir-like), at the price of disk and memory drifting apart
  until the storage's own rotation catches up.

Frames stay encoded (JPEG by default) exactly as they came off the socket; decoding happens at batch time
(``charles.trainer.batches``). A ``memoryview`` that would pin a much larger receive buffer is copied
once on insert (counted), so one lingering sample never keeps a whole multipart message alive.

Thread safety: the receive loop inserts while the prefetch thread draws; one lock guards all buffers and a
condition wakes a waiting drawer when inserts make the buffers ready.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

import msgspec

from charles.proto.frames import Frame
from charles.proto.messages import Sample, SampleSet
from charles.sections.trainer import BufferConfig  # the trainer section's part: light, so config loads fast

PIN_SLACK_BYTES = 4096
"""A view may sit in a buffer up to this much (plus its own size) larger than itself without a copy."""


@dataclass(slots=True)
class Entry:
    """One buffered sample and the bookkeeping the buffer and the storage need."""

    key: int
    """Unique, increasing over the trainer's life (storage rows carry it, so a restart continues it)."""
    sample: Sample
    valid: frozenset[str]
    """Outputs whose labels are real for this sample (a v2 set carries only its own output's label)."""
    uses: int = 0
    """Batches this sample has been in so far."""

    @property
    def nbytes(self) -> int:
        return self.sample.frame.nbytes + sum(f.nbytes for f in self.sample.stack)


class BufferObserver(Protocol):
    """Told about every change to the buffers; the on-disk storage is one (it must never block)."""

    def on_insert(self, buffer: str, entries: Sequence[Entry]) -> None: ...

    def on_remove(self, buffer: str, keys: Sequence[int]) -> None: ...


def buffer_key(outputs: Iterable[str]) -> str:
    """Canonical buffer name of the output(s) a set balances: ``steering`` or ``steering+throttle_brake``."""
    names = sorted(set(outputs))
    if not names:
        raise ValueError("a sample set must balance at least one output")
    return "+".join(names)


def buffer_names(outputs: Sequence[str], version: int) -> list[str]:
    """The buffers a run needs: Balancing v1 balances all outputs jointly (one buffer), v2+ one per output."""
    return [buffer_key(outputs)] if version == 1 else [buffer_key([o]) for o in outputs]


def valid_labels(sample_set: SampleSet) -> frozenset[str]:
    """Outputs whose labels a set's samples carry.

    An empty ``labels_kept`` means every label travelled (v1 and v3 sets); otherwise only those named.
    The combined throttle_brake label also makes the derived throttle and brake signals valid.
    """
    kept = (
        set(sample_set.labels_kept)
        if sample_set.labels_kept
        else {"steering", "throttle_brake", "throttle", "brake"}
    )
    if "throttle_brake" in kept:
        kept |= {"throttle", "brake"}
    return frozenset(kept)


def _unpinned(frame: Frame) -> tuple[Frame, bool]:
    """The frame, or a copy of it when its memoryview would keep a much larger buffer alive."""
    data = frame.data
    if not isinstance(data, memoryview):
        return frame, False
    try:
        base = memoryview(data.obj).nbytes if data.obj is not None else data.nbytes
    except TypeError:  # an owner without the buffer protocol: assume the worst
        base = math.inf
    if base <= 2 * data.nbytes + PIN_SLACK_BYTES:
        return frame, False
    return Frame(frame.codec, frame.shape, bytes(data)), True


class SampleBuffer:
    """One output's pool: O(1) insert, O(1) oldest/random eviction, O(k) random draw of k samples.

    Not thread-safe by itself; ``Buffers`` holds the lock.
    """

    def __init__(self, name: str, config: BufferConfig, rng: random.Random):
        self.name = name
        self.config = config
        self._rng = rng
        self._entries: OrderedDict[int, Entry] = OrderedDict()  # insertion order = age, for oldest eviction
        self._keys: list[int] = []  # dense, for uniform random picks; swap-remove keeps it dense
        self._pos: dict[int, int] = {}
        self.nbytes = 0
        # counters (monotonic, for metrics)
        self.inserted = 0
        self.drawn = 0
        self.reused = 0
        self.evicted = 0
        self.evicted_bytes = 0
        """Evicted to stay within max_bytes (``evicted`` counts those over capacity)."""
        self.consumed = 0
        self.discarded = 0
        """Taken out because their frame did not decode (``Buffers.discard``)."""

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def credit(self) -> float:
        """Draws the sample-to-insert ratio still allows."""
        return self.config.samples_per_insert * self.inserted - self.drawn

    def can_draw(self, n: int) -> bool:
        # full enough in samples, or in bytes (big frames reach the byte budget first: never a dead end)
        full = (
            len(self) >= self.config.start_size
            or self.nbytes >= self.config.start_fraction * self.config.max_bytes
        )
        return full and len(self) >= n and self.credit >= n

    def _victim(self) -> int:
        if self.config.eviction == "oldest":
            return next(iter(self._entries))
        return self._keys[self._rng.randrange(len(self._keys))]

    def add(self, entry: Entry) -> list[Entry]:
        """Insert one entry; returns the entries evicted to make room (samples, then bytes)."""
        evicted = []
        if len(self) >= self.config.capacity:
            evicted.append(self._remove(self._victim()))
            self.evicted += 1
        while self._keys and self.nbytes + entry.nbytes > self.config.max_bytes:
            evicted.append(self._remove(self._victim()))
            self.evicted_bytes += 1
        self._entries[entry.key] = entry
        self._pos[entry.key] = len(self._keys)
        self._keys.append(entry.key)
        self.nbytes += entry.nbytes
        self.inserted += 1
        return evicted

    def take(self, n: int) -> tuple[list[Entry], list[int]]:
        """Draw n distinct random entries; those used up leave the buffer. Returns (drawn, removed keys)."""
        picks = [self._keys[i] for i in self._rng.sample(range(len(self._keys)), n)]
        drawn, removed = [], []
        for key in picks:
            entry = self._entries[key]
            if entry.uses:
                self.reused += 1
            entry.uses += 1
            drawn.append(entry)
            if entry.uses >= self.config.max_uses:
                self._remove(key)
                removed.append(key)
        self.drawn += n
        self.consumed += len(removed)
        return drawn, removed

    def _remove(self, key: int) -> Entry:
        entry = self._entries.pop(key)
        i = self._pos.pop(key)
        last = self._keys.pop()
        if last != key:  # move the last key into the hole
            self._keys[i] = last
            self._pos[last] = i
        self.nbytes -= entry.nbytes
        return entry

    def age_order(self) -> list[int]:
        """Keys from oldest to newest (tests and the storage check)."""
        return list(self._entries)

    def stats(self) -> dict:
        return {
            "size": len(self),
            "capacity": self.config.capacity,
            "fill": len(self) / self.config.capacity,
            "bytes": self.nbytes,
            "inserted": self.inserted,
            "drawn": self.drawn,
            "reused": self.reused,
            "evicted": self.evicted,
            "evicted_bytes": self.evicted_bytes,
            "consumed": self.consumed,
            "discarded": self.discarded,
        }


class Buffers:
    """All of the trainer's buffers, one per balanced output, behind one lock.

    The receive loop calls ``add_set`` (never blocks beyond the lock); the batch side calls ``draw`` or
    ``wait_draw`` with the per-buffer count (batch size / number of buffers).
    """

    def __init__(
        self, names: Sequence[str], config: BufferConfig | None = None, observer: BufferObserver | None = None
    ):
        if not names:
            raise ValueError("the trainer needs at least one buffer")
        if len(set(names)) != len(names):
            raise ValueError(f"buffer names must be unique, got {list(names)}")
        self.config = config or BufferConfig()
        self.observer = observer
        self._rng = random.Random(self.config.seed)
        self.buffers: dict[str, SampleBuffer] = {n: SampleBuffer(n, self.config, self._rng) for n in names}
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._next_key = 0
        self._closed = False
        self.rejected: dict[str, int] = {}
        """Sets refused, per reason (metric)."""
        self.copied_frames = 0
        self.starved_s = 0.0
        """Seconds ``wait_draw`` waited because the buffers could not give a batch (too few samples, or
        the sample-to-insert ratio spent): the trainer waiting for *data*, not for decoding (flow control)."""
        """Frames copied on insert because their view pinned a much larger buffer."""

    @property
    def names(self) -> list[str]:
        return list(self.buffers)

    def __len__(self) -> int:
        with self._lock:
            return sum(len(b) for b in self.buffers.values())

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {n: len(b) for n, b in self.buffers.items()}

    # ---- receive side (≈ collectors x 30 Hz <- set.*) -------------------------------------------------

    def add_set(self, sample_set: SampleSet) -> int:
        """Buffer a balanced set into the buffer of the output(s) it balances; returns samples added."""
        try:
            name = buffer_key(sample_set.outputs)
        except ValueError:
            return self._reject("no_outputs")
        if name not in self.buffers:
            return self._reject("unknown_buffer")
        return self.add(name, sample_set.samples, valid_labels(sample_set))

    def add(self, name: str, samples: Iterable[Sample], valid: frozenset[str]) -> int:
        """Buffer samples into one named buffer (new keys; the observer is told, so they reach disk)."""
        prepared = [self._prepare(s) for s in samples]
        with self._lock:
            entries = [Entry(self._take_key(), s, valid) for s in prepared]
            self._insert(name, entries, notify=True)
        return len(entries)

    def restore(self, name: str, entries: Iterable[Entry]) -> int:
        """Put back entries read from storage, keeping their keys; not echoed to the observer as inserts.

        Called before the network delivers anything; later keys continue after the largest restored one.
        """
        if name not in self.buffers:
            raise KeyError(f"no buffer {name!r}; this run has {self.names}")
        with self._lock:
            batch = list(entries)
            for e in batch:
                self._next_key = max(self._next_key, e.key + 1)
            self._insert(name, batch, notify=False)
        return len(batch)

    def continue_keys_after(self, key: int) -> None:
        """Make every later key larger than ``key`` (the storage's largest row, whatever buffer it is in)."""
        with self._lock:
            self._next_key = max(self._next_key, key + 1)

    def _prepare(self, sample: Sample) -> Sample:
        frame, copied = _unpinned(sample.frame)
        stack = []
        for f in sample.stack:
            f2, c = _unpinned(f)
            stack.append(f2)
            copied |= c
        if copied:
            with self._lock:
                self.copied_frames += 1
            sample = msgspec.structs.replace(sample, frame=frame, stack=stack)  # messages are Structs
        return sample

    def _take_key(self) -> int:
        key = self._next_key
        self._next_key += 1
        return key

    def _insert(self, name: str, entries: list[Entry], notify: bool) -> None:
        buf = self.buffers[name]
        evicted = [e.key for entry in entries for e in buf.add(entry)]
        if self.observer is not None:
            if notify and entries:
                self.observer.on_insert(name, entries)
            if evicted:
                self.observer.on_remove(name, evicted)
        self._ready.notify_all()

    def _reject(self, reason: str) -> int:
        with self._lock:
            self.rejected[reason] = self.rejected.get(reason, 0) + 1
        return 0

    # ---- batch side ---------------------------------------------------------------------------------

    def ready(self, per_buffer: int = 1) -> bool:
        """Whether every buffer is full enough (start_fraction) and allowed (ratio) to give per_buffer."""
        with self._lock:
            return self._ready_locked(per_buffer)

    def _ready_locked(self, per_buffer: int) -> bool:
        return all(b.can_draw(per_buffer) for b in self.buffers.values())

    def draw(self, per_buffer: int) -> dict[str, list[Entry]] | None:
        """Draw per_buffer random samples from every buffer at once, or None if not all buffers are ready.

        Drawn samples that reached their use limit are removed (consume-once by default).
        """
        if per_buffer < 1:
            raise ValueError(f"per_buffer must be at least 1, got {per_buffer}")
        with self._lock:
            return self._draw_locked(per_buffer)

    def wait_draw(self, per_buffer: int, timeout: float | None = None) -> dict[str, list[Entry]] | None:
        """Like ``draw``, but waits up to timeout seconds for the buffers to become ready."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            t0 = time.monotonic()
            try:
                while not self._closed and not self._ready_locked(per_buffer):
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        return None
                    self._ready.wait(left)
            finally:
                self.starved_s += time.monotonic() - t0
            return None if self._closed else self._draw_locked(per_buffer)

    def _draw_locked(self, per_buffer: int) -> dict[str, list[Entry]] | None:
        if not self._ready_locked(per_buffer):
            return None
        out = {}
        for name, buf in self.buffers.items():
            drawn, removed = buf.take(per_buffer)
            out[name] = drawn
            if removed and self.observer is not None:
                self.observer.on_remove(name, removed)
        return out

    def discard(self, name: str, keys: Iterable[int]) -> int:
        """Take these entries out of buffer ``name`` (and the storage, through the observer): a sample whose
        frame turned out not to decode must not be drawn again. Keys no longer there (used up, evicted) are
        skipped; returns how many were removed."""
        with self._lock:
            buf = self.buffers[name]
            removed = [k for k in keys if k in buf._entries]
            for k in removed:
                buf._remove(k)
            buf.discarded += len(removed)
            if removed and self.observer is not None:
                self.observer.on_remove(name, removed)
            return len(removed)

    def close(self) -> None:
        """Wake every waiting drawer (shutdown); later waits return None at once."""
        with self._lock:
            self._closed = True
            self._ready.notify_all()

    def stats(self) -> dict:
        """Per-buffer sizes and counters plus rejections, for metrics and the trainer console."""
        with self._lock:
            return {
                "buffers": {n: b.stats() for n, b in self.buffers.items()},
                "ready": self._ready_locked(1),
                "rejected": dict(self.rejected),
                "copied_frames": self.copied_frames,
                "bytes": sum(b.nbytes for b in self.buffers.values()),
                "starved_s": self.starved_s,
            }
