"""Datasets: record and replay samples/s against the bare library on the same shards.

The samples are what a collector sends at the default model resolution: a 160x90 JPEG q90 hood frame of
the sim (~6 KB), a 60-row history, labels. Both sides on the same bytes:
- record, ours: ``DatasetWriter.write`` of each message as received (crc32, the ustar members written
  directly, a flush per record, the manifest); bare: stdlib ``tarfile.addfile`` of the same members, no
  crc, no flush, no manifest.
- replay, ours: ``charles.dataset.samples`` (its own ustar reader, the crc check, the wire codec's typed,
  validated decode: Samples with their frames and history); bare: stdlib ``tarfile`` iteration reading
  every member and ``msgpack.unpackb`` of each header (no validation, no checks).
``record_ratio`` / ``replay_ratio`` = ours / bare samples/s; the goal is >= 0.8 for both (``meets_goal``).
Each side is timed in alternating rounds (best of), on this thread's CPU time, files in a temporary folder.
"""

from __future__ import annotations

import io
import shutil
import tarfile
import tempfile
import time
from pathlib import Path

import msgpack
import numpy as np

from charles.dataset import DatasetWriter, samples, shards
from charles.proto import Frame, Sample, decode, encode
from charles.sim.world import SimWorld

from _common import args, report

GOAL = 0.8


def messages(n: int) -> list[list]:
    world = SimWorld()
    rng = np.random.default_rng(0)
    out = []
    for k in range(n):
        if k % 30 == 0:  # a new picture every second of driving (encoding is not what is measured)
            for _ in range(30):
                world.step(float(rng.uniform(-0.3, 0.3)), 0.6)
            frame = Frame.encode(world.hood_frame()[::3, ::3].copy(), "jpeg", 90)
        history = rng.standard_normal((60, 5)).astype(np.float32)
        s = Sample("collector-1", k, k / 30, frame, float(rng.uniform(-1, 1)), 0.5, 9.0, (0.2, 80.0), history)
        out.append(encode("sample.collector-1", s, "collector-1"))
    return out


def record_ours(root: Path, msgs: list[list], envs: list) -> None:
    with DatasetWriter(root, shard_bytes=64 * 2**20) as w:
        for frames, env in zip(msgs, envs, strict=True):
            w.write(frames, env)


def record_bare(root: Path, msgs: list[list]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / "bare.tar", "w") as t:
        for k, frames in enumerate(msgs):
            meta = msgpack.packb({"topic": bytes(frames[0]).decode(), "blobs": len(frames) - 2})
            parts = [("meta.msgpack", meta), ("header.msgpack", bytes(frames[1]))]
            parts += [(f"{i}.jpg", bytes(b)) for i, b in enumerate(frames[2:])]
            for name, data in parts:
                info = tarfile.TarInfo(f"{k:010d}.{name}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def replay_ours(root: Path) -> int:
    return sum(1 for _ in samples(root))


def replay_bare(root: Path) -> int:
    n = 0
    for path in shards(root):
        with tarfile.open(path) as t:
            for m in t:
                data = t.extractfile(m).read()
                if m.name.endswith(".header.msgpack"):
                    msgpack.unpackb(data)
                    n += 1
    return n


def best_of(fns: dict, rounds: int) -> dict[str, float]:
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.thread_time()
            fn()
            best[k] = min(best[k], time.thread_time() - t0)
    return best


def main() -> None:
    a = args(__doc__)
    n, rounds = (2_000, 3) if a.quick else (20_000, 5)
    msgs = messages(n)
    envs = [decode(m) for m in msgs]
    tmp = Path(tempfile.mkdtemp(prefix="charles-bench-dataset-"))
    try:
        k = iter(range(10**6))

        def fresh(name: str) -> Path:
            return tmp / f"{name}-{next(k)}"

        rec = best_of(
            {
                "ours": lambda: record_ours(fresh("ours"), msgs, envs),
                "bare": lambda: record_bare(fresh("bare"), msgs),
            },
            rounds,
        )
        data = tmp / "ours-0"
        assert replay_ours(data) == n and replay_bare(data) == n
        rep = best_of({"ours": lambda: replay_ours(data), "bare": lambda: replay_bare(data)}, rounds)
        size = sum(p.stat().st_size for p in shards(data))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    figures = {
        "samples": n,
        "bytes_per_sample": round(size / n),
        "record_sps": round(n / rec["ours"]),
        "bare_record_sps": round(n / rec["bare"]),
        "record_ratio": round(rec["bare"] / rec["ours"], 3),
        "replay_sps": round(n / rep["ours"]),
        "bare_replay_sps": round(n / rep["bare"]),
        "replay_ratio": round(rep["bare"] / rep["ours"], 3),
        "goal": GOAL,
    }
    figures["meets_goal"] = figures["record_ratio"] >= GOAL and figures["replay_ratio"] >= GOAL
    print(
        f"{n} samples, {figures['bytes_per_sample']} B each on disk: record {figures['record_sps']}/s "
        f"(bare tarfile {figures['bare_record_sps']}/s, {figures['record_ratio']:.2f}x); replay "
        f"{figures['replay_sps']}/s (bare tarfile + msgpack {figures['bare_replay_sps']}/s, "
        f"{figures['replay_ratio']:.2f}x)"
    )
    report(figures)


if __name__ == "__main__":
    main()
