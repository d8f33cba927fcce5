"""A crash-safe, rotating on-disk copy of the trainer's buffers, so a restart trains again within seconds.

Why SQLite (stdlib) in WAL mode rather than our own segment files or LMDB:

* Crash safety is SQLite's job, not ours: a kill -9 or a power loss mid-write loses at most the last
  uncommitted transaction (with ``synchronous=NORMAL``, also the last few commits since the previous
  checkpoint on power loss), never the store. A home-made segment format needs checksummed framing, tail
  truncation and an atomically replaced manifest to get the same guarantee.
* The store mirrors the buffers, so consumed and evicted samples are deleted one by one; SQLite does
  that in place (freed pages are reused, the file stays bounded), while segment files can only drop whole
  segments and would bring consumed samples back on a restart.
* It is fast enough, measured by ``python bench/trainer.py --part c`` (5,000 samples of 25 KB JPEG
  480x270 frames plus a 60-row history, two shared cores, warm page cache): SQLite writes ~13,000
  samples/s and refills ~51,000 samples/s; the cheapest possible segment file (length-prefixed appends,
  no CRC framing, no manifest, no deletes) writes ~35,000/s and refills ~43,000/s. Ten collectors at
  30 Hz insert 300 samples/s, and refilling two full 25,000-sample buffers takes about a second either
  way, so the segment format's faster writes buy nothing we need.
* LMDB would need a package and a fixed map size.

Records are self-describing and versioned (never pickle): ``MAGIC, u32 header length, msgpack header,
payload``. The header names every field of the sample, the codec, shape and size of each frame, the
history's shape, and a CRC-32 of the payload. A record that fails any check on refill is skipped, counted
by reason and deleted; refill never raises on bad data.

Writes never block the receive loop: the buffers call ``on_insert``/``on_remove`` under their lock, and
those only append to a bounded queue that one writer thread drains in transactions; what does not fit is
dropped and counted.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import struct
import threading
import time
import zlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import msgpack
import numpy as np

from charles.proto.frames import Frame, FrameError
from charles.proto.messages import HISTORY_FIELDS, Sample
from charles.sections.trainer import BufferConfig, StorageConfig
from charles.trainer.buffers import Buffers, Entry

log = logging.getLogger(__name__)

MAGIC = b"CHSR"
"""Charles Sample Record."""
RECORD_VERSION = 1
_PREFIX = struct.Struct("<4sI")  # magic, header length
MAX_HEADER = 1 << 20
"""A header longer than this is corrupt (a real one is a few hundred bytes)."""
MAX_HISTORY_ROWS = 100_000


class RecordError(ValueError):
    """A stored record that cannot be trusted; ``reason`` is the metric label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


# ---- record codec -------------------------------------------------------------------------------------


def encode_record(buffer: str, entry: Entry) -> bytes:
    """One entry as a self-describing record (the only copy of the frame bytes we make on the way to disk)."""
    s = entry.sample
    blobs: list[bytes | memoryview] = [s.frame.data, *(f.data for f in s.stack)]
    history = None
    if s.history is not None:
        h = np.ascontiguousarray(s.history, dtype="<f4")
        history = {"shape": list(h.shape)}
        blobs.append(h.tobytes())
    crc = 0
    for b in blobs:
        crc = zlib.crc32(b, crc)
    header = {
        "format": RECORD_VERSION,
        "buffer": buffer,
        "key": entry.key,
        "collector": s.collector,
        "seq": s.seq,
        "game_time": s.game_time,
        "steering": s.steering,
        "throttle_brake": s.throttle_brake,
        "speed": s.speed,
        "purpose": [float(s.purpose[0]), float(s.purpose[1])],
        "previous": None if s.previous is None else [float(s.previous[0]), float(s.previous[1])],
        "source": s.source,
        "valid": sorted(entry.valid),
        "frame": {**s.frame.header(), "size": len(s.frame.data)},
        "stack": [{**f.header(), "size": len(f.data)} for f in s.stack],
        "history": history,
        "crc": crc,
    }
    head = msgpack.packb(header, use_bin_type=True)
    return b"".join([_PREFIX.pack(MAGIC, len(head)), head, *blobs])


def _num(h: dict, name: str) -> float:
    v = h.get(name)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise RecordError("bad_field", f"{name} is {v!r}")
    return float(v)


def _pair(h: dict, name: str, optional: bool = False) -> tuple[float, float] | None:
    v = h.get(name)
    if v is None and optional:
        return None
    if not (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int | float) and not isinstance(x, bool) for x in v)
    ):
        raise RecordError("bad_field", f"{name} is {v!r}")
    return float(v[0]), float(v[1])


def _frame(meta: object, view: memoryview, at: int) -> tuple[Frame, int]:
    try:
        codec, shape = Frame.check_header(meta)
    except FrameError as e:
        raise RecordError("bad_frame", str(e)) from None
    size = meta.get("size")  # type: ignore[union-attr]  # check_header proved it is a dict
    if not isinstance(size, int) or size < 0 or at + size > len(view):
        raise RecordError("bad_size", f"frame of {size!r} bytes at {at} in a {len(view)}-byte payload")
    return Frame(codec, shape, view[at : at + size]), at + size


def decode_record(record: bytes | memoryview) -> tuple[str, Entry]:
    """A record back into (buffer name, entry); frames are views into ``record``. Raises RecordError."""
    view = memoryview(record)
    if len(view) < _PREFIX.size:
        raise RecordError("truncated", f"{len(view)} bytes")
    magic, hlen = _PREFIX.unpack_from(view)
    if magic != MAGIC:
        raise RecordError("bad_magic", repr(bytes(magic)))
    if hlen > MAX_HEADER or _PREFIX.size + hlen > len(view):
        raise RecordError("truncated", f"header of {hlen} bytes in a {len(view)}-byte record")
    try:
        h = msgpack.unpackb(view[_PREFIX.size : _PREFIX.size + hlen], raw=False, strict_map_key=True)
    except Exception as e:  # msgpack raises several unrelated types on garbage
        raise RecordError("bad_header", type(e).__name__) from None
    if not isinstance(h, dict):
        raise RecordError("bad_header", "not a map")
    if h.get("format") != RECORD_VERSION:
        raise RecordError("unsupported_version", repr(h.get("format")))
    payload = view[_PREFIX.size + hlen :]
    crc = h.get("crc")
    if not isinstance(crc, int) or zlib.crc32(payload) != crc:
        raise RecordError("bad_crc")
    key, buffer = h.get("key"), h.get("buffer")
    if not isinstance(key, int) or isinstance(key, bool) or not isinstance(buffer, str):
        raise RecordError("bad_field", f"key {key!r}, buffer {buffer!r}")
    frame, at = _frame(h.get("frame"), payload, 0)
    stack_meta = h.get("stack")
    if not isinstance(stack_meta, list):
        raise RecordError("bad_field", "stack is not a list")
    stack = []
    for m in stack_meta:
        f, at = _frame(m, payload, at)
        stack.append(f)
    history = None
    hm = h.get("history")
    if hm is not None:
        shape = hm.get("shape") if isinstance(hm, dict) else None
        if not (
            isinstance(shape, list)
            and len(shape) == 2
            and isinstance(shape[0], int)
            and 0 <= shape[0] <= MAX_HISTORY_ROWS
            and shape[1] == len(HISTORY_FIELDS)
        ):
            raise RecordError("bad_history", repr(hm))
        size = shape[0] * shape[1] * 4
        if at + size > len(payload):
            raise RecordError("bad_size", "history runs past the payload")
        history = np.frombuffer(payload[at : at + size], dtype="<f4").reshape(shape)
        at += size
    if at != len(payload):
        raise RecordError("bad_size", f"payload has {len(payload) - at} unexplained bytes")
    valid = h.get("valid")
    if not (isinstance(valid, list) and all(isinstance(v, str) for v in valid)):
        raise RecordError("bad_field", "valid")
    collector, source, seq = h.get("collector"), h.get("source"), h.get("seq")
    if not (isinstance(collector, str) and isinstance(source, str) and isinstance(seq, int)):
        raise RecordError("bad_field", "collector/source/seq")
    sample = Sample(
        collector=collector,
        seq=seq,
        game_time=_num(h, "game_time"),
        frame=frame,
        steering=_num(h, "steering"),
        throttle_brake=_num(h, "throttle_brake"),
        speed=_num(h, "speed"),
        purpose=_pair(h, "purpose"),  # type: ignore[arg-type]  # not optional: never None
        history=history,
        stack=stack,
        previous=_pair(h, "previous", optional=True),
        source=source,
    )
    return buffer, Entry(key, sample, frozenset(valid))


# ---- the store ----------------------------------------------------------------------------------------


@dataclass
class RefillReport:
    """What a refill found (logged at start; the counts also feed metrics)."""

    restored: dict[str, int] = field(default_factory=dict)
    corrupt: dict[str, int] = field(default_factory=dict)
    """Records skipped, per reason."""
    other_buffers: int = 0
    """Rows of buffers this run does not have (another balancing version); kept on disk, not loaded."""
    seconds: float = 0.0

    @property
    def total(self) -> int:
        return sum(self.restored.values())


_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS samples (key INTEGER PRIMARY KEY, buffer TEXT NOT NULL, record BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS samples_by_buffer ON samples (buffer, key);
"""


class Storage:
    """The on-disk mirror of ``Buffers``: a ``BufferObserver`` whose writes happen on its own thread.

    Wiring (trainer start; ``open_buffers`` below does exactly this)::

        storage = Storage(StorageConfig(path=...), capacity=buffer_config.capacity)
        storage.refill(buffers)          # before any socket is read
        buffers.observer = storage       # from now on inserts, draws and evictions reach disk
        ...
        storage.close()                  # drains what is queued (SIGTERM path)
    """

    def __init__(self, config: StorageConfig, capacity: int):
        self.config = config
        self.capacity = capacity
        self.path = Path(config.path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # counters (monotonic, for metrics)
        self.written = 0
        self.deleted = 0
        self.rotated = 0
        self.dropped = 0
        """Samples not written because the queue was full."""
        self.dropped_deletes = 0
        self.write_errors = 0
        self.commits = 0
        self._ops: deque[tuple[str, str, Sequence]] = deque()
        self._pending = 0  # samples queued
        self._cv = threading.Condition()
        self._busy = False
        self._stopping = False
        self._counts: dict[str, int] = {}
        conn = self._connect(create=True)
        self._counts = dict(conn.execute("SELECT buffer, COUNT(*) FROM samples GROUP BY buffer").fetchall())
        conn.close()
        self._thread = threading.Thread(target=self._run, name="storage-writer", daemon=True)
        self._thread.start()

    # ---- connection ----

    def _connect(self, create: bool = False) -> sqlite3.Connection:
        try:
            return self._open()
        except sqlite3.DatabaseError as e:
            if not create:
                raise
            # Not a database (or its header is destroyed): keep it for a post-mortem, start a fresh store.
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            log.error("storage %s is unreadable (%s); moved aside to %s, starting empty", self.path, e, aside)
            for suffix in ("", "-wal", "-shm"):
                p = Path(str(self.path) + suffix)
                if p.exists():
                    os.replace(p, str(aside) + suffix)
            return self._open()

    def _open(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        try:
            conn.execute(f"PRAGMA page_size={self.config.page_size}")  # only takes effect on a new file
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.config.synchronous}")
            # checkpoints truncate the WAL back to 64 MiB, so a burst cannot leave a huge file behind
            conn.execute("PRAGMA journal_size_limit=67108864")
            conn.executescript(_SCHEMA)
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('record_format', ?)", (str(RECORD_VERSION),))
        except sqlite3.DatabaseError:
            conn.close()
            raise
        return conn

    # ---- BufferObserver (called under the buffers' lock: append and return) ----

    def on_insert(self, buffer: str, entries: Sequence[Entry]) -> None:
        with self._cv:
            if self._stopping or self._pending + len(entries) > self.config.queue_samples:
                self.dropped += len(entries)
                return
            self._ops.append(("put", buffer, list(entries)))
            self._pending += len(entries)
            self._cv.notify()

    def on_remove(self, buffer: str, keys: Sequence[int]) -> None:
        if self.config.mirror_removals:
            self._enqueue_delete(buffer, keys)

    def _enqueue_delete(self, buffer: str, keys: Sequence[int]) -> None:
        with self._cv:
            # deletes carry no frames; bound them by operations so a stalled disk cannot grow the queue forever
            if self._stopping or len(self._ops) >= self.config.queue_samples:
                self.dropped_deletes += len(keys)
                return
            self._ops.append(("del", buffer, list(keys)))
            self._cv.notify()

    # ---- writer thread (drains at the insert rate: collectors x 30 Hz, in transactions) ----

    def _run(self) -> None:
        conn = self._connect()
        try:
            while True:
                with self._cv:
                    while not self._ops and not self._stopping:
                        self._busy = False
                        self._cv.notify_all()  # flush() waiters
                        self._cv.wait()
                    if not self._ops and self._stopping:
                        break
                    self._busy = True
                    batch, n = [], 0
                    while self._ops and n < self.config.batch_samples:
                        op = self._ops.popleft()
                        batch.append(op)
                        if op[0] == "put":
                            n += len(op[2])
                            self._pending -= len(op[2])
                self._write(conn, batch)
        finally:
            conn.close()  # the last connection checkpoints the WAL into the main file
            with self._cv:
                self._busy = False
                self._cv.notify_all()

    def _write(self, conn: sqlite3.Connection, batch: list[tuple[str, str, Sequence]]) -> None:
        # Encode outside the transaction so the write lock is held for the I/O only.
        rows, deletes = [], []
        for kind, buffer, items in batch:
            if kind == "put":
                rows.extend((e.key, buffer, encode_record(buffer, e)) for e in items)
            else:
                deletes.append((buffer, items))
        counts = dict(self._counts)
        try:
            conn.execute("BEGIN IMMEDIATE")
            conn.executemany("INSERT OR REPLACE INTO samples VALUES (?, ?, ?)", rows)
            for _, buffer, _ in rows:
                counts[buffer] = counts.get(buffer, 0) + 1
            deleted = 0
            for buffer, keys in deletes:
                cur = conn.executemany("DELETE FROM samples WHERE key = ?", [(k,) for k in keys])
                deleted += cur.rowcount
                counts[buffer] = counts.get(buffer, 0) - cur.rowcount
            rotated = 0
            for buffer in {b for _, b, _ in rows}:
                excess = counts[buffer] - self.capacity
                if excess > 0:  # rotation: whatever the mirror missed, the oldest rows go first
                    cur = conn.execute(
                        "DELETE FROM samples WHERE key IN "
                        "(SELECT key FROM samples WHERE buffer = ? ORDER BY key LIMIT ?)",
                        (buffer, excess),
                    )
                    rotated += cur.rowcount
                    counts[buffer] -= cur.rowcount
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            # disk full, I/O error: lose this batch (counted), keep the thread and the store alive
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            self.write_errors += 1
            self.dropped += len(rows)
            log.warning("storage write of %d samples failed: %s", len(rows), e)
            time.sleep(0.1)
            return
        self._counts = counts
        self.written += len(rows)
        self.deleted += deleted
        self.rotated += rotated
        self.commits += 1

    # ---- control ----

    def flush(self, timeout: float = 10.0) -> bool:
        """Wait until everything queued so far is committed; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cv:
            while self._ops or self._busy:
                left = deadline - time.monotonic()
                if left <= 0 or not self._thread.is_alive():
                    return False
                self._cv.wait(left)
        return True

    def close(self, timeout: float = 10.0) -> None:
        """Write what is queued, stop the writer and close the file (refuses later writes, counted)."""
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "storage writer did not finish within %.1f s; %d samples may be lost", timeout, self._pending
            )

    def __enter__(self) -> Storage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def count(self, buffer: str | None = None) -> int:
        """Rows on disk (committed), for one buffer or all."""
        conn = self._connect()
        try:
            if buffer is None:
                return conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
            return conn.execute("SELECT COUNT(*) FROM samples WHERE buffer = ?", (buffer,)).fetchone()[0]
        finally:
            conn.close()

    def stats(self) -> dict:
        with self._cv:
            queued = self._pending
        return {
            "rows": dict(self._counts),
            "queued": queued,
            "written": self.written,
            "deleted": self.deleted,
            "rotated": self.rotated,
            "dropped": self.dropped,
            "dropped_deletes": self.dropped_deletes,
            "write_errors": self.write_errors,
            "commits": self.commits,
            "file_bytes": sum(p.stat().st_size for p in (self.path, Path(f"{self.path}-wal")) if p.exists()),
        }

    # ---- refill (trainer start, before the network) ----

    def refill(self, buffers: Buffers) -> RefillReport:
        """Load the newest ``capacity`` rows of each of the run's buffers into ``buffers``; never raises on data.

        Corrupt records are skipped, counted per reason and deleted (a newer format's records are kept).
        """
        t0 = time.perf_counter()
        report = RefillReport()
        conn = self._connect()
        bad_keys: dict[str, list[int]] = {}
        try:
            # rows of other buffers and corrupt rows hold keys too: new keys must not collide with any
            top = conn.execute("SELECT MAX(key) FROM samples").fetchone()[0]
            if top is not None:
                buffers.continue_keys_after(top)
            known = set(buffers.names)
            for name, n in self._counts.items():
                if name not in known:
                    report.other_buffers += n
            for name in buffers.names:
                entries: list[Entry] = []
                try:
                    rows = conn.execute(
                        "SELECT key, record FROM samples WHERE buffer = ? ORDER BY key DESC LIMIT ?",
                        (name, buffers.config.capacity),
                    )
                    for key, record in rows:
                        try:
                            stored_buffer, entry = decode_record(record)
                            if stored_buffer != name or entry.key != key:
                                raise RecordError(
                                    "mismatch", f"row {key}/{name} holds {entry.key}/{stored_buffer}"
                                )
                        except RecordError as e:
                            report.corrupt[e.reason] = report.corrupt.get(e.reason, 0) + 1
                            if e.reason != "unsupported_version":
                                bad_keys.setdefault(name, []).append(key)
                            continue
                        entries.append(entry)
                except sqlite3.DatabaseError as e:  # a damaged page: keep what was read, never fatal
                    report.corrupt["database"] = report.corrupt.get("database", 0) + 1
                    log.error("storage refill of buffer %s stopped early: %s", name, e)
                entries.reverse()  # oldest first, so the buffer's age order matches the disk's
                report.restored[name] = buffers.restore(name, entries)
        finally:
            conn.close()
        for name, keys in bad_keys.items():
            self._enqueue_delete(name, keys)
        report.seconds = time.perf_counter() - t0
        if report.corrupt:
            log.warning("storage refill skipped corrupt records: %s", report.corrupt)
        return report


def open_buffers(
    names: Sequence[str], buffer_config: BufferConfig, storage_config: StorageConfig
) -> tuple[Buffers, Storage | None, RefillReport]:
    """The trainer's start, in the one safe order: refill from disk first, then mirror every change to it.

    With storage disabled the buffers start empty and nothing is written. Call before any socket is read;
    ``storage.close()`` on shutdown writes what is still queued.
    """
    buffers = Buffers(names, buffer_config)
    if not storage_config.enabled:
        return buffers, None, RefillReport()
    storage = Storage(storage_config, capacity=buffer_config.capacity)
    report = storage.refill(buffers)
    buffers.observer = storage
    log.info(
        "refilled %d samples from %s in %.2f s: %s",
        report.total,
        storage.path,
        report.seconds,
        report.restored,
    )
    return buffers, storage, report
