"""Asynchronous writes: capture never waits on the network or on JPEG.

The capture loop hands each :class:`Pending` sample to :meth:`Sender.offer`, which never blocks: past
``collector.send_queue`` waiting samples the new one is dropped and counted
(``charles_drops_total{cause="send_queue"}``; the balancer sees the gap in ``seq`` too). The sender thread
fits each picture to the model's resolution, encodes it (each past frame of a stack once, however many
samples carry it) and publishes; the PUB socket itself never blocks either (a drop at its high-water mark
is counted by the runtime as ``hwm_sample``).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable

from charles.drive.samples import Encoder, Pending
from charles.proto import Sample

log = logging.getLogger("charles.collector")


class Sender:
    """A bounded queue and the thread that drains it onto the bus.

    ``publish(sample) -> bool`` sends one sample (True when it left); the thread is its only caller, so the
    socket behind it belongs to the thread. ``on_drop`` is called (from the capture thread) per dropped
    sample; ``on_sent`` per sample that left, with the seconds its encoding took.
    """

    def __init__(
        self,
        encoder: Encoder,
        publish: Callable[[Sample], bool],
        maxsize: int,
        on_drop: Callable[[], None] = lambda: None,
        on_sent: Callable[[Sample, float], None] = lambda s, dt: None,
    ):
        self.encoder = encoder
        self.publish = publish
        self.queue: queue.Queue[Pending | Sample] = queue.Queue(maxsize=maxsize)
        self.on_drop = on_drop
        self.on_sent = on_sent
        self.sent = 0
        self.dropped = 0
        self.failed = 0
        """Samples the sender could not encode (a broken remote frame); logged, never fatal."""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sender", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The thread still runs (it alone may touch the socket until it ends)."""
        return self._thread.is_alive()

    def offer(self, p: Pending | Sample) -> bool:
        """Queue a sample for sending (a Sample is sent as it is: a replayed dataset's); False (and counted)
        when the queue is full. Never blocks."""
        try:
            self.queue.put_nowait(p)
            return True
        except queue.Full:
            self.dropped += 1
            self.on_drop()
            return False

    def _run(self) -> None:
        while not self._stop.is_set() or not self.queue.empty():
            try:
                p = self.queue.get(timeout=0.1)
            except queue.Empty:
                continue
            self._send(p)

    def _send(self, p: Pending | Sample) -> None:
        t0 = time.perf_counter()
        try:
            sample = p if isinstance(p, Sample) else self.encoder.sample(p)
        except Exception as e:  # noqa: BLE001 - one bad frame must not stop the stream
            self.failed += 1
            log.warning(f"could not encode sample {p.seq}: {e}")
            return
        dt = time.perf_counter() - t0
        if self.publish(sample):
            self.sent += 1
            self.on_sent(sample, dt)

    def close(self, timeout_s: float = 2.0) -> int:
        """Send what is queued (up to timeout_s), stop the thread; returns how many were left unsent."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)
        return self.queue.qsize()
