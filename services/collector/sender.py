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

import numpy as np

from charles.collector.capture import Image, Pending, SampleShape, fit_frame
from charles.proto import Frame, Sample

log = logging.getLogger("charles.collector")


class Encoder:
    """Pending -> Sample: fit, encode, and remember the last few encoded frames for the stack."""

    def __init__(self, collector: str, shape: SampleShape, codec: str = "jpeg", quality: int = 90):
        self.collector = collector
        self.shape = shape
        self.codec = codec
        self.quality = quality
        self._cache: dict[int, Frame] = {}
        self._keep = shape.span + 1

    def frame(self, image: Image) -> Frame:
        w, h = self.shape.width, self.shape.height
        if isinstance(image, Frame):
            if image.shape == (h, w, 3) and image.codec == self.codec:
                return image  # already what the wire wants: pass the bytes through untouched
            image = image.decode()
        if image.ndim == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return Frame.encode(fit_frame(image, w, h), self.codec, self.quality)

    def _cached(self, tick: int, image: Image) -> Frame:
        f = self._cache.get(tick)
        if f is None:
            f = self._cache[tick] = self.frame(image)
        return f

    def sample(self, p: Pending) -> Sample:
        stack = [self._cached(t, img) for t, img in p.stack]
        frame = self._cached(p.tick, p.image) if self.shape.frames > 1 else self.frame(p.image)
        if len(self._cache) > self._keep:
            for t in sorted(self._cache)[: len(self._cache) - self._keep]:
                del self._cache[t]
        return Sample(
            collector=self.collector,
            seq=p.seq,
            game_time=p.game_time,
            frame=frame,
            steering=p.label[0],
            throttle_brake=p.label[1],
            speed=p.speed,
            purpose=p.purpose,
            history=p.history,
            stack=stack,
            previous=p.previous,
            source=p.source,
        )


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
        self.queue: queue.Queue[Pending] = queue.Queue(maxsize=maxsize)
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

    def offer(self, p: Pending) -> bool:
        """Queue a sample for sending; False (and counted) when the queue is full. Never blocks."""
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

    def _send(self, p: Pending) -> None:
        t0 = time.perf_counter()
        try:
            sample = self.encoder.sample(p)
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
