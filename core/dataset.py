"""Datasets: what crossed the bus, on disk as WebDataset-style tar shards with a JSON manifest.

Why tar shards: a POSIX tar is the most widely readable container there is (``tar tf``, any archive
browser, Python's stdlib, WebDataset and torchdata read it as it is), it is append-only by nature (a
record is a group of consecutive members; a crash cuts at most the shard being written) and it stores
each frame as its own ``.jpg``/``.png`` file, so people browse a drive with the tools they have. Parquet
would pack labels into columns nicely but hides the frames in binary cells and rewrites its footer on
every close; a crash mid-file loses the whole file. No new dependency either: the members are plain
POSIX ustar (headers byte for byte what stdlib ``tarfile`` writes; the tests read shards with tarfile and
``tar``), written and read here directly because tarfile's per-member objects cost more than everything
else a record costs (bench/dataset.py measures both against bare tarfile).

Layout of a dataset folder::

    manifest.json            what is in it (written atomically: a temporary file, then os.replace)
    shard-000000.tar         records; a shard rotates past --shard-mb or --shard-records
    shard-000001.tar         ...

A record is one bus message ``[topic, header, *blobs]`` exactly as it crossed the broker, stored as the
members of one WebDataset key (``<key>`` = the dataset-wide record number, 10 digits):

    <key>.meta.msgpack       {"topic": str, "crc32": int, "blobs": int}; crc32 of header + blobs in order
    <key>.header.msgpack     the wire header (proto/README.md), byte for byte
    <key>.<i>.jpg|png|raw    blob i: a frame's bytes (the extension from its magic bytes; raw: raw pixels
                             or a history array, shapes and dtypes in the header)

So a record round-trips exactly: :func:`charles.proto.decode` of the stored frames is what the recorder
received. Readers (:func:`envelopes`) validate every record (the crc, then the wire codec, as any
receiver does); a truncated shard ends that shard and a corrupt record is skipped, each counted by reason
(:data:`SKIP_REASONS`), never raised.

Imports: charles.proto only.
"""

from __future__ import annotations

import json
import os
import re
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgpack

from charles.proto import SCHEMA_VERSION, Envelope, ProtocolError, Sample, SampleSet, decode

FORMAT = "charles-webdataset"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-(\d{6})\.tar$")
SKIP_REASONS = ("truncated_shard", "corrupt_record", "unreadable_shard")
"""What a reader skips: the rest of a shard cut short (a crash while recording, a partial copy), a record
whose crc or wire validation fails (flipped bytes), a shard that is not a tar at all."""
MANIFEST_EVERY_S = 5.0
"""The manifest is rewritten at every shard rotation, at close, and at least this often while recording."""


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def shards(root: str | Path) -> list[Path]:
    """The dataset's shard files in recording order (a crashed recording's last one included)."""
    root = Path(root)
    return sorted(p for p in root.iterdir() if SHARD_RE.match(p.name)) if root.is_dir() else []


BLOB_EXTENSIONS = ("jpg", "png", "raw")


def blob_extension(blob: bytes | memoryview) -> str:
    """A blob's file extension from its magic bytes: how a frame is encoded says itself (JPEG, PNG)."""
    head = bytes(blob[:4])
    if head[:3] == b"\xff\xd8\xff":
        return "jpg"
    if head == b"\x89PNG":
        return "png"
    return "raw"


def _crc(parts: Sequence[Any]) -> int:
    c = 0
    for p in parts:
        c = zlib.crc32(p, c)
    return c


def load_manifest(root: str | Path) -> dict:
    """The manifest, or an empty one for a new dataset; ValueError when it is not ours."""
    path = Path(root) / MANIFEST
    if not path.exists():
        return {}
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: not a Charles dataset manifest (format {m.get('format')!r})")
    return m


def _write_json_atomically(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- writing


BLOCK = 512
RECORD = 20 * BLOCK
"""tar's record: an archive's length is a multiple of it."""


def _ustar_header(name: str, size: int, mtime: int) -> bytes:
    """A POSIX ustar header block for a regular file (mode 0644, owner 0): what ``tarfile`` writes for the
    same member, built directly because tarfile's TarInfo costs more than the rest of a record's write."""
    b = name.encode("ascii")
    if len(b) > 100:
        raise ValueError(f"member name over 100 bytes: {name!r}")
    head = (
        b.ljust(100, b"\0")
        + b"0000644\0"
        + b"0000000\0"
        + b"0000000\0"
        + b"%011o\0" % size
        + b"%011o\0" % mtime
        + b" " * 8  # the checksum, counted as spaces
        + b"0"
        + bytes(100)
        + b"ustar\x0000"
        + bytes(32 + 32 + 8 + 8 + 155 + 12)
    )
    chk = b"%06o\0 " % sum(head)
    return head[:148] + chk + head[156:]


def _shard_entry(name: str) -> dict[str, Any]:
    """A shard's line in the manifest: its own counts (the totals are their sums, so a shard a crash cut
    short is recounted alone)."""
    return {
        "name": name,
        "records": 0,
        "bytes": 0,
        "complete": False,
        "samples": 0,
        "topics": Counter(),
        "sources": Counter(),
        "collectors": Counter(),
        "first_wall": None,
        "last_wall": None,
    }


def _count(entry: dict[str, Any], env: Envelope) -> None:
    entry["records"] += 1
    entry["topics"][env.topic] += 1
    entry["first_wall"] = env.wall if entry["first_wall"] is None else min(entry["first_wall"], env.wall)
    entry["last_wall"] = env.wall if entry["last_wall"] is None else max(entry["last_wall"], env.wall)
    for s in env.msg.samples if isinstance(env.msg, SampleSet) else [env.msg]:
        if isinstance(s, Sample):
            entry["samples"] += 1
            entry["sources"][s.source] += 1
            entry["collectors"][s.collector] += 1


class DatasetWriter:
    """Appends records to a dataset folder: shards rotate by size, the whole is bounded, the manifest follows.

    Opening an existing dataset appends: new shards continue its numbering (a recording never rewrites a
    shard), so recording twice into one folder makes one dataset; a shard that a crash left short (or one
    the manifest does not know) is recounted from its records first. ``max_bytes`` and ``max_records``
    bound the whole dataset; :meth:`write` returns False once either is reached (the recorder then stops).
    """

    def __init__(
        self,
        root: str | Path,
        shard_bytes: int = 256 * 2**20,
        shard_records: int = 10_000,
        max_bytes: int = 50 * 2**30,
        max_records: int = 10_000_000,
    ):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.shard_bytes = shard_bytes
        self.shard_records = shard_records
        self.max_bytes = max_bytes
        self.max_records = max_records
        m = load_manifest(self.root)
        if m and m.get("wire_schema") != SCHEMA_VERSION:
            raise ValueError(
                f"{self.root}: recorded with wire schema {m.get('wire_schema')}, this is {SCHEMA_VERSION}; "
                "record into a new folder"
            )
        known = {e["name"]: e for e in m.get("shards", []) if e.get("complete")}
        entries = []
        for path in shards(self.root):
            e = known.get(path.name)
            if e is None:  # cut short by a crash, or copied in: what it holds now
                e = _shard_entry(path.name)
                for env in envelopes_of(path):
                    _count(e, env)
                e["bytes"] = path.stat().st_size
            for k in ("topics", "sources", "collectors"):
                e[k] = Counter(e.get(k, {}))
            entries.append(e)
        self.manifest: dict[str, Any] = {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "wire_schema": SCHEMA_VERSION,
            "created": m.get("created", time.time()),
            "shards": entries,
        }
        self._total()
        existing = shards(self.root)
        self._next_shard = int(SHARD_RE.match(existing[-1].name).group(1)) + 1 if existing else 0
        self._file: Any = None
        self._shard: dict | None = None
        self._saved = 0.0
        self.full = False

    def _total(self) -> None:
        """The manifest's totals from its shards' counts."""
        m, entries = self.manifest, self.manifest["shards"]
        for k in ("records", "bytes", "samples"):
            m[k] = sum(e[k] for e in entries)
        for k in ("topics", "sources", "collectors"):
            m[k] = sum((e[k] for e in entries), Counter())
        firsts = [e["first_wall"] for e in entries if e["first_wall"] is not None]
        lasts = [e["last_wall"] for e in entries if e["last_wall"] is not None]
        m["first_wall"] = min(firsts, default=None)
        m["last_wall"] = max(lasts, default=None)

    # the manifest's entry of the shard being written is this dict, updated in place
    def _open_shard(self) -> None:
        name = shard_name(self._next_shard)
        self._next_shard += 1
        self._file = open(self.root / name, "xb")  # noqa: SIM115 - open across writes; never overwrite
        self._shard = _shard_entry(name)
        self.manifest["shards"].append(self._shard)
        self.save()

    def _close_shard(self) -> None:
        if self._file is None:
            return
        # the two zero blocks that end a tar, padded to its 10 KiB record as tar itself does
        written = self._shard["bytes"] + 2 * BLOCK
        self._file.write(bytes(2 * BLOCK + -written % RECORD))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._shard["bytes"] = (self.root / self._shard["name"]).stat().st_size
        self._shard["complete"] = True
        self._file = self._shard = None
        self.save()

    def _add(self, name: str, data: bytes, mtime: float) -> int:
        """One member: its ustar header block, its data padded to blocks (one write)."""
        n = len(data)
        self._file.write(_ustar_header(name, n, int(mtime)) + data + bytes(-n % BLOCK))
        return BLOCK + n + -n % BLOCK

    def write(self, frames: Sequence[Any], env: Envelope) -> bool:
        """Store one message as received (``frames``: topic, header, blobs; ``env``: its decoded form, for
        the counts). False, and nothing written, once the dataset is at its bound."""
        m = self.manifest
        size = sum(len(memoryview(f).cast("B")) for f in frames)
        if m["records"] >= self.max_records or m["bytes"] + size > self.max_bytes:
            self.full = True
            return False
        if self._shard is not None and (
            self._shard["records"] >= self.shard_records or self._shard["bytes"] + size > self.shard_bytes
        ):
            self._close_shard()
        if self._file is None:
            self._open_shard()
        topic_b, header, blobs = bytes(frames[0]), bytes(frames[1]), [bytes(b) for b in frames[2:]]
        key = f"{m['records']:010d}"
        meta = msgpack.packb(
            {"topic": topic_b.decode("ascii"), "crc32": _crc([header, *blobs]), "blobs": len(blobs)}
        )
        written = self._add(f"{key}.meta.msgpack", meta, env.wall)
        written += self._add(f"{key}.header.msgpack", header, env.wall)
        for i, b in enumerate(blobs):
            written += self._add(f"{key}.{i}.{blob_extension(b)}", b, env.wall)
        self._file.flush()  # a crash loses at most the record being written
        self._shard["bytes"] += written
        _count(self._shard, env)
        m["records"] += 1  # the totals the bounds read; save() recomputes them all
        m["bytes"] += written
        if time.monotonic() - self._saved > MANIFEST_EVERY_S:
            self.save()
        return True

    def save(self) -> None:
        """Rewrite the manifest atomically (readers never see half of one)."""
        self._total()
        self.manifest["updated"] = time.time()
        _write_json_atomically(self.root / MANIFEST, self.manifest)
        self._saved = time.monotonic()

    def close(self) -> None:
        self._close_shard()
        self.save()

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------- reading


MAX_MEMBER_BYTES = 1 << 30
"""A member header that claims more is damage (the largest message the registry allows is 256 MB)."""


def _members(f: Any, size: int) -> Iterator[tuple[str, bytes]]:
    """The regular files of a ustar stream as (name, data): POSIX ustar as our writer makes it (short names,
    no extensions), read directly rather than through tarfile, whose per-member header parsing and file
    objects cost more than the rest of a replay together (bench/dataset.py). A header block whose
    checksum fails is stepped over block by block, as ``tar --ignore-zeros`` does (the record it belonged
    to then lacks a member and fails its check); a member cut short by the end of the file ends the
    stream."""
    pos = 0
    while pos + BLOCK <= size:
        block = f.read(BLOCK)
        pos += BLOCK
        if len(block) < BLOCK:
            return
        stored = block[148:156].rstrip(b" \0")
        try:
            ok = int(stored or b"-1", 8) == sum(block) - sum(block[148:156]) + 8 * 32
        except ValueError:
            ok = False
        if not ok:  # a zero block (the end marker) or a damaged header: try the next block
            continue
        try:
            n = int(block[124:136].rstrip(b" \0") or b"0", 8)
        except ValueError:
            n = -1
        if not 0 <= n <= MAX_MEMBER_BYTES:
            continue
        data = f.read(n)
        padded = -(-n // BLOCK) * BLOCK
        if padded > n:
            f.seek(padded - n, 1)
        pos += padded
        if len(data) < n:
            return  # cut short: the caller sees the missing end marker
        if block[156:157] in (b"0", b"\0"):  # a regular file; anything else (a folder, a link) is skipped
            yield block[:100].split(b"\0", 1)[0].decode("utf-8", "replace"), data


def _records_of(path: Path, skip: Callable[[str, str], None]) -> Iterator[tuple[bytes, list[bytes]]]:
    """One shard's records as (topic, [header, *blobs]), each checked against its crc.

    A damaged member header is stepped over (:func:`_members`), so one flipped byte costs one record, not
    the rest of the shard; the record it belonged to fails its check and is counted corrupt. A shard that
    does not end with tar's two zero blocks was cut short: counted once as truncated, and its last,
    partial record goes with it (not counted again as corrupt).
    """
    try:
        size = path.stat().st_size
        f = open(path, "rb", buffering=1 << 20)  # noqa: SIM115 - closed by the with below
    except OSError as e:
        skip("unreadable_shard", f"{path.name}: {e}")
        return
    key: str | None = None
    parts: dict[str | int, bytes] = {}
    """The record being read: ``meta.msgpack``, ``header.msgpack`` and blob index -> bytes."""
    members = 0

    def finish(last: bool = False) -> tuple[bytes, list[bytes]] | None:
        try:
            meta = msgpack.unpackb(parts["meta.msgpack"])
            frames = [parts["header.msgpack"]]
            frames += [parts[i] for i in range(int(meta["blobs"]))]  # a missing blob: KeyError
            if _crc(frames) != meta["crc32"]:
                raise ValueError("crc32 mismatch")
            return meta["topic"].encode("ascii"), frames
        except Exception as e:  # noqa: BLE001 - a record from disk is untrusted: anything wrong skips it
            if not (last and not complete):
                skip("corrupt_record", f"{path.name} record {key}: {type(e).__name__}: {e}")
            return None

    with f:
        f.seek(max(0, size - 2 * BLOCK))
        complete = size >= 2 * BLOCK and f.read(2 * BLOCK) == bytes(2 * BLOCK)
        f.seek(0)
        try:
            for name, data in _members(f, size):
                members += 1
                k, _, field = name.partition(".")
                if k != key:
                    if key is not None and (rec := finish()) is not None:
                        yield rec
                    key, parts = k, {}
                if len(parts) > 64:  # a key with absurdly many members
                    continue
                blob, dot, ext = field.partition(".")
                parts[int(blob) if blob.isdigit() and dot and ext in BLOB_EXTENSIONS else field] = data
        except OSError as e:
            skip("truncated_shard", f"{path.name}: {type(e).__name__}: {e}")
            return
        if key is not None and (rec := finish(last=True)) is not None:
            yield rec
        if not complete and members == 0:
            skip("unreadable_shard", f"{path.name}: no tar member in it")
        elif not complete:
            skip("truncated_shard", f"{path.name}: ends without tar's end-of-archive blocks (cut short)")


def records(
    root: str | Path, skip: Callable[[str, str], None] | None = None
) -> Iterator[tuple[bytes, list[bytes]]]:
    """Every intact record of the dataset in order: (topic, [header, *blobs]). ``skip(reason, detail)``
    hears each thing skipped (``reason`` one of SKIP_REASONS)."""
    skip = skip or (lambda reason, detail: None)
    for path in shards(root):
        yield from _records_of(path, skip)


def envelopes_of(path: Path, skip: Callable[[str, str], None] | None = None) -> Iterator[Envelope]:
    """One shard's records decoded (what :func:`envelopes` does for every shard)."""
    skip = skip or (lambda reason, detail: None)
    for topic, frames in _records_of(path, skip):
        try:
            yield decode([topic, *frames])
        except ProtocolError as e:
            skip("corrupt_record", f"{path.name}: {topic[:64]!r}: {e}")


def envelopes(root: str | Path, skip: Callable[[str, str], None] | None = None) -> Iterator[Envelope]:
    """Every record decoded by the wire codec, exactly as a receiver on the bus would have had it."""
    for path in shards(root):
        yield from envelopes_of(path, skip)


def samples(root: str | Path, skip: Callable[[str, str], None] | None = None) -> Iterator[Sample]:
    """The samples of a dataset in order: recorded samples as they are, recorded sets' samples one by one."""
    for env in envelopes(root, skip):
        if isinstance(env.msg, SampleSet):
            yield from env.msg.samples
        elif isinstance(env.msg, Sample):
            yield env.msg


class SkipCounter:
    """Counts what a reader skipped by reason (the summary ``charles dataset info`` prints)."""

    def __init__(self, also: Callable[[str, str], None] | None = None):
        self.counts: Counter[str] = Counter()
        self.first: dict[str, str] = {}
        self.also = also

    def __call__(self, reason: str, detail: str) -> None:
        self.counts[reason] += 1
        self.first.setdefault(reason, detail)
        if self.also is not None:
            self.also(reason, detail)


def summary(root: str | Path) -> dict:
    """What ``charles dataset info`` prints: the manifest's counts, and what a full read finds (label
    ranges and means per output, what was skipped). Reads every record: seconds per GB."""
    import numpy as np

    m = load_manifest(root)
    skipped = SkipCounter()
    steer, throttle, read, sets = [], [], Counter(), 0
    sources: Counter[str] = Counter()
    collectors: Counter[str] = Counter()
    for env in envelopes(root, skipped):
        read[env.topic] += 1
        if isinstance(env.msg, SampleSet):
            sets += 1
        for s in env.msg.samples if isinstance(env.msg, SampleSet) else [env.msg]:
            if isinstance(s, Sample):
                steer.append(s.steering)
                throttle.append(s.throttle_brake)
                sources[s.source] += 1
                collectors[s.collector] += 1

    def stats(v: list[float]) -> dict:
        if not v:
            return {}
        a = np.asarray(v, dtype=np.float64)
        return {
            "mean": round(float(a.mean()), 4),
            "min": round(float(a.min()), 4),
            "max": round(float(a.max()), 4),
        }

    first, last = m.get("first_wall"), m.get("last_wall")
    return {
        "path": str(root),
        "wire_schema": m.get("wire_schema"),
        "shards": len(shards(root)),
        "bytes": sum(p.stat().st_size for p in shards(root)),
        "records": sum(read.values()),
        "samples": len(steer),
        "sets": sets,
        "topics": dict(read),
        "sources": dict(sources),
        "collectors": dict(collectors),
        "time_span_s": round(last - first, 3) if first is not None and last is not None else 0.0,
        "first_wall": first,
        "labels": {"steering": stats(steer), "throttle_brake": stats(throttle)},
        "skipped": dict(skipped.counts),
        "manifest_records": m.get("records", 0),
    }
