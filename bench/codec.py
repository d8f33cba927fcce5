"""Decode cost of a sample: our validated decode of header + zero-copy frame vs bare msgpack.

Three figures per decode, all on the same sample (480x270 JPEG hood frame, ~40 KB):
- ours: ``charles.proto.decode`` of ``[topic, header, frame]`` as received (zmq.Frame, copy=False),
  with every field validated and the frame kept as a view;
- bare: ``msgpack.unpackb`` of the same bytes packed as one msgpack document (header fields and the
  frame together), which is what a single-blob design pays (the frame is copied out);
- bare_header: ``msgpack.unpackb`` of our header alone plus taking the frame's buffer (no validation),
  the floor for our layout.
``overhead`` = ours / bare (goal <= 1.5); ``overhead_vs_header_only`` = ours / bare_header.
"""

from __future__ import annotations

import time

import msgpack
import numpy as np
import zmq

from charles.proto import Frame, Sample, decode, encode

from _common import args, report


def interleaved(fns: dict, n: int, rounds: int) -> dict[str, float]:
    """Best per-call time of each function, measured in alternating rounds so load spikes on a shared
    machine hit all of them alike."""
    best = {k: float("inf") for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(n):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / n)
    return best


def main() -> None:
    a = args(__doc__)
    n, rounds = (2_000, 15) if a.quick else (10_000, 40)
    rng = np.random.default_rng(0)
    img = np.clip(rng.normal(110, 50, (270, 480, 3)), 0, 255).astype(np.uint8)
    img = np.ascontiguousarray(np.repeat(np.repeat(img[::6, ::6], 6, 0), 6, 1)[:270, :480])  # some texture
    frame = Frame.encode(img, "jpeg", 90)  # ~40 KB, the broker bench's small message
    sample = Sample("collector-1", 123, 4.1, frame, -0.12, 0.8, 13.9, (0.4, 250.0), previous=(-0.1, 0.8))
    frames = encode("sample.collector-1", sample, "collector-1")

    # as a subscriber receives them: zmq.Frame objects, copy=False
    ctx = zmq.Context()
    a_, b_ = ctx.socket(zmq.PAIR), ctx.socket(zmq.PAIR)
    a_.bind("inproc://bench")
    b_.connect("inproc://bench")
    a_.send_multipart(frames, copy=False)
    got = b_.recv_multipart(copy=False)

    header = msgpack.unpackb(frames[1])
    single = msgpack.packb({**header, "frame_bytes": bytes(frame.data)})  # the same bytes as one document

    t = interleaved(
        {
            "ours": lambda: decode(got),
            "bare": lambda: msgpack.unpackb(single),
            "bare_header": lambda: (msgpack.unpackb(got[1].buffer), [f.buffer for f in got[2:]]),
        },
        n,
        rounds,
    )
    ours, bare, bare_header = t["ours"], t["bare"], t["bare_header"]
    a_.close(0)
    b_.close(0)
    ctx.term()
    print(f"frame {len(frame.data) / 1e3:.1f} KB, header {len(frames[1])} B")
    print(f"ours (validated, zero-copy): {ours * 1e6:.2f} us")
    print(f"bare unpackb, same bytes:    {bare * 1e6:.2f} us")
    print(f"bare unpackb, header only:   {bare_header * 1e6:.2f} us")
    report(
        {
            "ours_us": round(ours * 1e6, 3),
            "bare_us": round(bare * 1e6, 3),
            "bare_header_us": round(bare_header * 1e6, 3),
            "overhead": round(ours / bare, 3),
            "overhead_vs_header_only": round(ours / bare_header, 3),
            "frame_bytes": len(frame.data),
        }
    )


if __name__ == "__main__":
    main()
