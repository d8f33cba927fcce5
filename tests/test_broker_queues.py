"""A real broker process, a subscriber that stops reading and a publisher that floods it: the broker's memory
stays within ``broker.queue_bytes``, the overflow is counted, and a subscriber that reads loses nothing.

ZeroMQ bounds a queue in messages, not bytes; the broker derives each high-water mark from queue_bytes and the
largest message the queue may hold (charles.broker.broker.queue_plan). Here queue_bytes is 64 MB: the main
lane (messages up to 16 MB) gets hwm 3, so the stalled subscriber's queue holds at most 4 x 16 MB. The flood
is 60 samples of 7.8 MB (470 MB) on the main lane. Before queue_bytes the broker queued 1000 messages per
subscriber whatever their size: all of the flood stayed in its memory (RSS +470 MB) and no drop was counted.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import zmq

from charles.proto import Frame, Sample, decode, encode
from charles.runtime import SeqGaps

from conftest import missing_tool
from survive_support import (
    healthz,
    rss_mb,
    scrape,
    start_broker,
    stop,
    wait_for,
)

QUEUE_BYTES = 64_000_000
N = 60
"""Flood messages: 470 MB, seven times what the stalled subscriber's queue may hold."""
WINDOW = 1
"""Messages the publisher runs ahead of the subscriber that reads: the flood goes at that one's pace, so
what it loses would be the broker's doing, not its own slowness. (libzmq tells the broker what a reader
has taken every (hwm + 1) // 2 messages: a queue of hwm 3 may look full with 2 in it.)"""
ALLOCATOR_MB = 16.0
"""RSS the broker may gain beyond the queues' bytes: malloc's arenas, page rounding."""


def _sub(ctx: zmq.Context, port: int, **opts: int) -> zmq.Socket:
    s = ctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    for k, v in opts.items():
        s.setsockopt(getattr(zmq, k), v)
    s.setsockopt(zmq.SUBSCRIBE, b"sample.")
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


class Reader:
    """A subscriber that reads and decodes everything, on its own thread: seqs of the flood, in order."""

    def __init__(self, sock: zmq.Socket):
        self.sock = sock
        self.seqs: list[int] = []
        self.probes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self.sock.poll(50):
                env = decode(self.sock.recv_multipart(copy=False))
                if env.msg.collector == "flood":
                    self.seqs.append(env.msg.seq)
                else:
                    self.probes += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


def test_a_stalled_subscriber_costs_the_broker_its_queue_bytes_and_is_counted(tmp_path):
    log = tmp_path / "broker.log"
    proc, ports, http = start_broker(log, f"broker.queue_bytes={QUEUE_BYTES}")
    ctx = zmq.Context()
    reader = None
    try:
        # the broker is healthy once bound; its "broker up" line and queue bounds are logged just after
        wait_for(lambda: "messages up to" in log.read_text(), 10, "the broker never logged its queues")
        if "counting per topic: c\n" not in log.read_text():
            missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
        m = scrape(http)
        hwm = m.value("charles_broker_queue_hwm", queue="subscribe")
        bound = m.value("charles_broker_queue_bound_bytes", queue="subscribe")
        assert (hwm, bound) == (3, 64e6), "queue_bytes 64 MB: 3 queued and 1 on the wire, of up to 16 MB"
        assert "subscribe 64 MB (hwm 3, messages up to 16 MB)" in log.read_text(), "the bound is not logged"

        pub = ctx.socket(zmq.PUB)
        pub.setsockopt(zmq.LINGER, 0)
        pub.setsockopt(zmq.SNDHWM, 0)  # the test's own queue: the flood must reach the broker whole
        pub.connect(f"tcp://127.0.0.1:{ports['publish']}")
        stalled = _sub(ctx, ports["subscribe"], RCVHWM=1, RCVBUF=65536)  # it will stop reading
        reader = Reader(_sub(ctx, ports["subscribe"]))
        big = Frame.encode(np.full((1536, 1700, 3), 7, np.uint8), "raw")  # 7.8 MB: under sample's 8 MB
        tiny = Frame.encode(np.zeros((2, 2, 3), np.uint8), "raw")

        def sample(collector: str, seq: int, frame: Frame = big) -> list:
            msg = Sample(collector, seq, 0.0, frame, 0.0, 0.0, 1.0, (0.0, 1.0), np.zeros((8, 5), np.float32))
            return encode(f"sample.{collector}", msg, "t")

        def probe() -> bool:
            pub.send_multipart(sample("probe", 0, tiny), copy=False)
            return reader.probes > 0 and stalled.poll(50)

        wait_for(probe, 20, "the subscriptions never reached the publisher")
        seq = 0
        msg_bytes = sum(memoryview(f).nbytes for f in sample("flood", 0))

        def send_paced() -> None:
            nonlocal seq
            wait_for(lambda: len(reader.seqs) >= seq - WINDOW, 30, "the reader is stuck", 0.005)
            pub.send_multipart(sample("flood", seq), copy=False)
            seq += 1

        stalled_seqs: list[int] = []

        def read_stalled() -> None:
            while stalled.poll(500):
                env = decode(stalled.recv_multipart(copy=False))
                if env.msg.collector == "flood":
                    stalled_seqs.append(env.msg.seq)

        # warm-up: both read (the allocator grows its pools, the stalled one its socket buffers)
        for _ in range(3):
            send_paced()
        wait_for(lambda: len(reader.seqs) == 3, 10, "warm-up not read")
        read_stalled()
        time.sleep(0.3)
        rss0 = rss_mb(proc.pid)
        m0 = scrape(http)

        # the flood: the stalled subscriber reads nothing
        peak = [rss0]
        sampling = threading.Event()

        def sample_rss() -> None:
            while not sampling.is_set() and proc.poll() is None:
                peak[0] = max(peak[0], rss_mb(proc.pid))
                time.sleep(0.02)

        sampler = threading.Thread(target=sample_rss, daemon=True)
        sampler.start()
        t0 = time.monotonic()
        try:
            for _ in range(N):
                send_paced()
            wait_for(lambda: len(reader.seqs) == seq, 30, "the reader did not get the whole flood")
            time.sleep(0.5)
        finally:
            sampling.set()
            sampler.join(2)
        flood_s = time.monotonic() - t0
        m1 = scrape(http)

        # the stalled subscriber reads again: what the broker kept for it, then a last one (so that a loss at
        # the end of the flood shows as a gap too)
        read_stalled()
        send_paced()
        wait_for(lambda: stalled.poll(100), 10, "the stalled subscriber never heard again")
        read_stalled()
        gaps = SeqGaps()
        lost = sum(gaps.see("flood", s) for s in stalled_seqs)

        growth = (peak[0] - rss0) * 2**20
        limit = QUEUE_BYTES + WINDOW * msg_bytes + ALLOCATOR_MB * 2**20
        through = m1.value("charles_messages_total", direction="through", topic="sample") - m0.value(
            "charles_messages_total", direction="through", topic="sample"
        )
        overflows = m1.value("charles_drops_total", cause="queue_overflow_sample") - m0.value(
            "charles_drops_total", cause="queue_overflow_sample"
        )
        # what the broker says its main lane's queues hold (the stalled one's, before it reads again)
        held = m1.value("charles_broker_queue_held_bytes", lane="main")
        print(
            f"flood of {N} x {msg_bytes / 1e6:.1f} MB in {flood_s:.1f}s: broker RSS {rss0:.0f} MiB, peak +"
            f"{growth / 1e6:.0f} MB (limit {limit / 1e6:.0f} MB: queue_bytes {QUEUE_BYTES / 1e6:.0f} + the "
            f"reader's window of {WINDOW} + {ALLOCATOR_MB:.0f} MiB); the stalled subscriber got "
            f"{len(stalled_seqs)} of {seq}, lost {lost}; overflows counted at the broker: {overflows:.0f}; "
            f"the main lane's queues held {held / 1e6:.0f} MB"
        )
        assert growth <= limit, (
            f"the broker grew {growth / 1e6:.0f} MB for a stalled subscriber, over {limit / 1e6:.0f}"
        )
        assert 0 < held <= QUEUE_BYTES, f"the main lane's queues held {held / 1e6:.0f} MB"
        assert reader.seqs == list(range(seq)), "the subscriber that reads lost messages to the stalled one"
        assert through == N, f"the broker forwarded {through:.0f} of the {N} flood messages"
        assert overflows >= 1, "the stalled subscriber's overflow was not counted at the broker"
        assert lost > 0 and len(stalled_seqs) + lost == seq, (
            f"the stalled subscriber got {len(stalled_seqs)} and lost {lost} of {seq}: not every message accounted for"
        )
        assert healthz(http)[1]["status"] == "ok"
    finally:
        if reader is not None:
            reader.close()
        ctx.destroy(linger=0)
        stop(proc)
