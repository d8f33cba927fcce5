"""Batch assembly: draw from the buffers, decode the frames, collate tensors, and prefetch the next batch.

A batch is a dict of tensors (``B`` samples, ``O`` outputs in ``BatchConfig.outputs`` order)::

    frame          uint8   [B, H, W, C]     NHWC, RGB; the model normalises on device
    stack          uint8   [B, S, H, W, C]  past frames, oldest first (only when stack_len > 0)
    speed          float32 [B]              m/s
    purpose        float32 [B, 2]           angle (rad), distance (m)
    history        float32 [B, T, 5]        HISTORY_FIELDS, oldest first, zero rows in front when short
                                            (only when history_len > 0)
    previous       float32 [B, 2]           (steering, throttle_brake) of the frame before, 0 when unknown
    previous_valid bool    [B]
    labels         float32 [B, O]           the outputs' signals; 0 where not valid (never NaN: 0 * NaN
                                            is NaN, so a masked loss would still be poisoned)
    label_mask     bool    [B, O]           which labels are real: a v2 set carries only its output's
                                            label, and a sample whose frame fails to decode has none
    buffer         int64   [B]              index of the buffer each sample came from (per-buffer metrics)

The keys are the ones ``charles.model.inputs.prepare_batch`` reads (plus the labels and masks the loss
reads), so a batch goes to the model as it is.

Decoding happens here, at batch time, because frames stay JPEG in the buffers (50,000 samples in ~1.3 GB).
On CUDA the JPEGs go to nvJPEG in one batched ``torchvision.io.decode_jpeg`` call; on CPU a small thread
pool runs ``cv2.imdecode`` (it releases the GIL) straight into the batch's (pinned) memory. When the model
input is smaller than the frames, JPEG's DCT-domain downscale (``IMREAD_REDUCED_*``) does the first
power-of-two step for free and ``cv2.resize`` (area) the rest, in the same decode thread.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import queue
import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch

from charles.outputs import SIGNALS, signals_from
from charles.proto.frames import Frame, FrameError, encoded_size
from charles.proto.messages import HISTORY_FIELDS
from charles.trainer.buffers import Buffers, Entry

log = logging.getLogger(__name__)

# The encoded bytes are read-only views that decode_jpeg only reads; torch warns about every one of them.
warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
# torchvision 0.29 deprecates its image codecs for TorchCodec; they remain the batched nvJPEG entry point here.
warnings.filterwarnings(
    "ignore",
    message="The image decoding and encoding capabilities of TorchVision",
    category=DeprecationWarning,
)

_RGB = getattr(cv2, "IMREAD_COLOR_RGB", None)  # OpenCV >= 4.10 decodes straight to RGB
_REDUCED = {2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4, 8: cv2.IMREAD_REDUCED_COLOR_8}
_REDUCED_GRAY = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


@dataclass
class BatchConfig:
    """What a batch looks like and how it is made."""

    batch_size: int = field(
        default=64, metadata={"help": "Samples per batch, split equally over the buffers."}
    )
    outputs: tuple[str, ...] = field(
        default=("steering", "throttle_brake"),
        metadata={"help": "Model outputs, in head order (labels columns)."},
    )
    image_size: tuple[int, int] | None = field(
        default=None,
        metadata={"help": "Model input (height, width); frames of another size are resized. None: as sent."},
    )
    channels: int = field(default=3, metadata={"help": "Frame channels the model takes (3 RGB, 1 grey)."})
    stack_len: int = field(default=0, metadata={"help": "Past frames per sample (0: no stack input)."})
    history_len: int = field(default=0, metadata={"help": "History rows per sample (0: no history input)."})
    decode_threads: int = field(
        default=min(4, os.cpu_count() or 1),
        metadata={"help": "CPU decode threads (cv2.imdecode releases the GIL)."},
    )
    gpu_decode: bool = field(
        default=True, metadata={"help": "Decode JPEGs with nvJPEG when training on CUDA."}
    )
    fast_downscale: bool = field(
        default=True,
        metadata={"help": "Let libjpeg downscale by 2/4/8 while decoding when the model input is smaller."},
    )
    pin_memory: bool = field(
        default=True, metadata={"help": "Collate into pinned memory when CUDA is available."}
    )
    prefetch: int = field(
        default=2, metadata={"help": "Batches assembled ahead of training (1-2 hides the decode)."}
    )

    def __post_init__(self) -> None:
        self.outputs = tuple(self.outputs)
        unknown = [o for o in self.outputs if o not in SIGNALS]
        if unknown or not self.outputs:
            raise ValueError(
                f"outputs must be non-empty and among {sorted(SIGNALS)}, got {list(self.outputs)}"
            )
        if self.image_size is not None:
            self.image_size = (int(self.image_size[0]), int(self.image_size[1]))
            if min(self.image_size) < 1:
                raise ValueError(f"image_size must be positive, got {self.image_size}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.batch_size < 1 or self.stack_len < 0 or self.history_len < 0:
            raise ValueError("batch_size must be >= 1 and stack_len/history_len >= 0")
        if self.decode_threads < 1 or self.prefetch < 1:
            raise ValueError("decode_threads and prefetch must be at least 1")


# ---- CPU decode ---------------------------------------------------------------------------------------


def _reduction(frame_hw: tuple[int, int], out_hw: tuple[int, int]) -> int:
    """Largest JPEG DCT scale (2, 4, 8) that still leaves at least the output size; 1 if none."""
    h, w = frame_hw
    for r in (8, 4, 2):
        if math.ceil(h / r) >= out_hw[0] and math.ceil(w / r) >= out_hw[1]:
            return r
    return 1


def decode_into(frame: Frame, out: np.ndarray, fast_downscale: bool = True) -> None:
    """Decode one frame into ``out`` (an H x W x C uint8 view into the batch), resizing if needed.

    Raises FrameError when the bytes do not decode or disagree with the frame's header.
    """
    oh, ow, oc = out.shape
    h, w, c = frame.shape
    if c != oc:
        raise FrameError("bad_shape", f"frame has {c} channels, the model takes {oc}")
    if frame.codec == "raw":
        img = frame.decode()  # checks the size; a view, no copy
    else:
        frame.check_encoded_size()  # the image's own header must say our shape before OpenCV allocates
        r = _reduction((h, w), (oh, ow)) if fast_downscale and frame.codec == "jpeg" else 1
        if c == 1:
            flags = _REDUCED_GRAY[r] if r > 1 else cv2.IMREAD_GRAYSCALE
        elif _RGB is not None:
            flags = ((_REDUCED[r] & ~cv2.IMREAD_COLOR) | _RGB) if r > 1 else _RGB
        else:
            flags = _REDUCED[r] if r > 1 else cv2.IMREAD_COLOR
        try:
            img = cv2.imdecode(np.frombuffer(frame.data, dtype=np.uint8), flags)
        except cv2.error:  # OpenCV 5 raises where 4 returned None (its pixel limit, some corrupt files)
            img = None
        if img is None:
            raise FrameError(
                "undecodable_frame", f"{frame.codec} frame of {frame.nbytes} bytes does not decode"
            )
        if img.shape[:2] != (math.ceil(h / r), math.ceil(w / r)):
            raise FrameError(
                "size_mismatch", f"header says {frame.shape}, data decodes to {img.shape} at 1/{r}"
            )
        if c == 3 and _RGB is None:
            img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[:2] == (oh, ow):
        out[...] = img
        return
    down = img.shape[0] >= oh and img.shape[1] >= ow
    dst = out[:, :, 0] if oc == 1 else out
    cv2.resize(img, (ow, oh), dst=dst, interpolation=cv2.INTER_AREA if down else cv2.INTER_LINEAR)


# ---- GPU decode ---------------------------------------------------------------------------------------


def _gpu_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 [N, C, h, w] -> uint8 [N, C, H, W] with antialiasing (close to INTER_AREA when shrinking)."""
    if tuple(x.shape[-2:]) == size:
        return x
    y = torch.nn.functional.interpolate(
        x.float(), size=size, mode="bilinear", antialias=True, align_corners=False
    )
    return y.round_().clamp_(0, 255).to(torch.uint8)


# ---- the assembler ------------------------------------------------------------------------------------


class BatchAssembler:
    """Draw -> remove -> decode -> collate, on the thread that calls it (the prefetcher's thread).

    On CUDA the returned tensors are already on the device, made on a side stream that is synchronised
    before return and recorded on the consumer's stream, so the training loop can use them at once.
    """

    def __init__(
        self, buffers: Buffers, config: BatchConfig | None = None, device: str | torch.device = "cpu"
    ):
        self.buffers = buffers
        self.config = config or BatchConfig()
        n = len(buffers.names)
        if self.config.batch_size % n:
            raise ValueError(
                f"batch_size {self.config.batch_size} must split equally over the {n} buffers {buffers.names}"
            )
        self.per_buffer = self.config.batch_size // n
        if self.per_buffer > buffers.config.capacity:
            raise ValueError(
                f"{self.per_buffer} samples per buffer per batch exceed the capacity {buffers.config.capacity}"
            )
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.pin = self.config.pin_memory and torch.cuda.is_available()
        self._pool = ThreadPoolExecutor(self.config.decode_threads, thread_name_prefix="decode")
        if self.cuda:
            # Captured on the consumer's thread: the stream its training step runs on.
            self._consumer_stream = torch.cuda.current_stream(self.device)
            self._stream = torch.cuda.Stream(self.device)
        # counters (monotonic, for metrics)
        self.batches = 0
        self.images = 0
        self.bad_frames = 0
        self.bad_history = 0
        self.seconds = 0.0
        """Time spent assembling (draw + decode + collate)."""

    # ---- public ----

    def next_batch(self, timeout: float | None = None) -> dict[str, torch.Tensor] | None:
        """Wait up to timeout for the buffers to be ready, then draw and assemble one batch."""
        drawn = self.buffers.wait_draw(self.per_buffer, timeout)
        return None if drawn is None else self.assemble(drawn)

    def assemble(self, drawn: dict[str, list[Entry]]) -> dict[str, torch.Tensor]:
        """Collate drawn entries (already removed from the buffers) into a batch."""
        t0 = time.perf_counter()
        names = self.buffers.names
        entries = [e for name in names for e in drawn.get(name, [])]
        buffer_idx = [i for i, name in enumerate(names) for _ in drawn.get(name, [])]
        cfg = self.config
        size = cfg.image_size or entries[0].sample.frame.shape[:2]
        # current frames first, then every sample's stack: both slices stay contiguous in one decode buffer
        frames: list[Frame] = [e.sample.frame for e in entries]
        if cfg.stack_len:
            frames.extend(f for e in entries for f in self._stack_of(e))
        if self.cuda:
            with torch.cuda.stream(self._stream):
                pixels, failed = self._decode_gpu(frames, size)
        else:
            pixels, failed = self._decode_cpu(frames, size)
        b = len(entries)
        bad = {i if i < b else (i - b) // cfg.stack_len for i in failed}
        # a sample whose frame (or stack) does not decode is masked here and leaves the buffers and the
        # storage: it would fail every time it is drawn. The service counts it (undecodable_frame).
        for i in bad:
            self.buffers.discard(names[buffer_idx[i]], [entries[i].key])
        batch = self._collate(entries, bad)
        batch["buffer"] = torch.tensor(buffer_idx, dtype=torch.int64)
        batch["frame"] = pixels[:b]
        if cfg.stack_len:
            batch["stack"] = pixels[b:].view(b, cfg.stack_len, *pixels.shape[1:])
        if self.pin:
            batch = {k: v if v.is_cuda or v.is_pinned() else v.pin_memory() for k, v in batch.items()}
        if self.cuda:
            with torch.cuda.stream(self._stream):
                batch = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            self._stream.synchronize()
            # the allocator must not hand this memory out again while the training step still reads it
            for v in batch.values():
                v.record_stream(self._consumer_stream)
        self.bad_frames += len(bad)
        self.batches += 1
        self.images += len(frames)
        self.seconds += time.perf_counter() - t0
        return batch

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    def stats(self) -> dict:
        return {
            "batches": self.batches,
            "images": self.images,
            "bad_frames": self.bad_frames,
            "bad_history": self.bad_history,
            "assembly_s": self.seconds,
        }

    # ---- pieces ----

    def _stack_of(self, e: Entry) -> list[Frame]:
        """The last stack_len past frames, oldest first; short stacks repeat their oldest (or the frame)."""
        s = self.config.stack_len
        past = e.sample.stack[-s:]
        pad = past[0] if past else e.sample.frame
        return [pad] * (s - len(past)) + past

    def _alloc(self, n: int, size: tuple[int, int]) -> torch.Tensor:
        return torch.empty(
            (n, size[0], size[1], self.config.channels), dtype=torch.uint8, pin_memory=self.pin
        )

    def _decode_cpu(self, frames: Sequence[Frame], size: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
        """Decode on the thread pool into one (pinned) tensor; returns it and the indices that failed."""
        out = self._alloc(len(frames), size)
        arr = out.numpy()
        fast = self.config.fast_downscale

        def work(lo: int, hi: int) -> list[int]:
            failed = []
            for i in range(lo, hi):
                try:
                    decode_into(frames[i], arr[i], fast)
                except Exception as e:  # noqa: BLE001 - one bad frame must not end the batch thread
                    log.debug("frame %d does not decode: %s", i, e)
                    arr[i] = 0
                    failed.append(i)
            return failed

        # contiguous chunks, one per thread: a future per frame would cost more than a small decode
        k = min(self.config.decode_threads, len(frames))
        bounds = [round(j * len(frames) / k) for j in range(k + 1)]
        futures = [self._pool.submit(work, lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:], strict=True)]
        return out, [i for f in futures for i in f.result()]

    def _decode_gpu(self, frames: Sequence[Frame], size: tuple[int, int]) -> tuple[torch.Tensor, list[int]]:
        """nvJPEG for the JPEGs in one batched call; the rest (raw, PNG, failures) on the CPU path."""
        from torchvision.io import ImageReadMode, decode_jpeg

        c = self.config.channels
        out = torch.empty((len(frames), size[0], size[1], c), dtype=torch.uint8, device=self.device)
        jpeg = (
            # only JPEGs whose own header says their shape: nvJPEG would allocate whatever the bytes claim
            [
                i
                for i, f in enumerate(frames)
                if f.codec == "jpeg" and f.shape[2] == c and encoded_size("jpeg", f.data) == f.shape[:2]
            ]
            if self.config.gpu_decode
            else []
        )
        rest = sorted(set(range(len(frames))) - set(jpeg))
        if jpeg:
            data = [torch.frombuffer(frames[i].data, dtype=torch.uint8) for i in jpeg]  # views, no copy
            mode = ImageReadMode.RGB if c == 3 else ImageReadMode.GRAY
            try:
                images = decode_jpeg(data, mode=mode, device=self.device)
            except (RuntimeError, ValueError) as e:  # one bad JPEG fails the whole call: find it on the CPU
                log.debug("batched GPU decode failed (%s); decoding this batch on the CPU", e)
                rest, images = sorted(range(len(frames))), []
            good = [
                (i, img)
                for i, img in zip(jpeg, images, strict=False)
                if tuple(img.shape[1:]) == frames[i].shape[:2]
            ]
            rest = sorted(set(rest) | (set(jpeg[: len(images)]) - {i for i, _ in good}))
            by_shape: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
            for i, img in good:
                by_shape.setdefault(tuple(img.shape), []).append((i, img))
            for group in by_shape.values():  # usually one group: every collector sends one size
                idx = torch.tensor([i for i, _ in group], device=self.device)
                stacked = _gpu_resize(torch.stack([img for _, img in group]), size)
                out.index_copy_(0, idx, stacked.permute(0, 2, 3, 1))
        failed: list[int] = []
        if rest:
            cpu, bad = self._decode_cpu([frames[i] for i in rest], size)
            out[torch.tensor(rest, device=self.device)] = cpu.to(self.device, non_blocking=self.pin)
            failed = [rest[j] for j in bad]
        return out, failed

    def _collate(self, entries: Sequence[Entry], bad: set[int]) -> dict[str, torch.Tensor]:
        cfg = self.config
        b, o = len(entries), len(cfg.outputs)
        speed = np.empty(b, np.float32)
        purpose = np.empty((b, 2), np.float32)
        previous = np.zeros((b, 2), np.float32)
        previous_valid = np.zeros(b, np.bool_)
        labels = np.zeros((b, o), np.float32)
        mask = np.zeros((b, o), np.bool_)
        history = np.zeros((b, cfg.history_len, len(HISTORY_FIELDS)), np.float32) if cfg.history_len else None
        for i, e in enumerate(entries):
            s = e.sample
            speed[i] = s.speed
            purpose[i] = s.purpose
            if s.previous is not None:
                previous[i] = s.previous
                previous_valid[i] = True
            if i not in bad:
                signals = signals_from(s.steering, s.throttle_brake)
                for j, name in enumerate(cfg.outputs):
                    v = signals[name]
                    if name in e.valid and math.isfinite(v):
                        labels[i, j] = v
                        mask[i, j] = True
            if history is not None and s.history is not None:
                h = np.asarray(s.history)
                if h.ndim == 2 and h.shape[1] == len(HISTORY_FIELDS):
                    t = min(len(h), cfg.history_len)
                    if t:
                        history[i, cfg.history_len - t :] = h[len(h) - t :]
                else:
                    self.bad_history += 1
        batch = {
            "speed": torch.from_numpy(speed),
            "purpose": torch.from_numpy(purpose),
            "previous": torch.from_numpy(previous),
            "previous_valid": torch.from_numpy(previous_valid),
            "labels": torch.from_numpy(labels),
            "label_mask": torch.from_numpy(mask),
        }
        if history is not None:
            batch["history"] = torch.from_numpy(np.nan_to_num(history, nan=0.0, posinf=0.0, neginf=0.0))
        return batch


def targets_of(batch: dict[str, torch.Tensor], outputs: Sequence[str]) -> dict[str, torch.Tensor]:
    """Per-output targets in the form ``charles.model.losses`` takes: float [B], NaN where no label."""
    labels = torch.where(batch["label_mask"], batch["labels"], torch.nan)
    return {name: labels[:, j] for j, name in enumerate(outputs)}


def previous_of(batch: dict[str, torch.Tensor], outputs: Sequence[str]) -> dict[str, torch.Tensor]:
    """The previous action per output signal (delta outputs bin the change from it); NaN where unknown."""
    prev = torch.where(batch["previous_valid"][:, None], batch["previous"], torch.nan)
    steering, tb = prev[:, 0], prev[:, 1]
    signals = {
        "steering": steering,
        "throttle_brake": tb,
        "throttle": tb.clamp(min=0),
        "brake": (-tb).clamp(min=0),
    }
    return {name: signals[name] for name in outputs}


# ---- the prefetcher -----------------------------------------------------------------------------------


class Prefetcher:
    """Assembles the next batches on a background thread while the current one trains.

    ``get`` returns the next batch and measures how long the training loop waited for it: that wait is
    the data-wait time (``wait_fraction`` near 0 means the GPU never starves). The queue holds
    ``config.prefetch`` batches; batches drawn but not delivered at ``close`` are lost (already removed
    from the buffers, at most prefetch + 1 of them).
    """

    _DONE = object()

    def __init__(self, assembler: BatchAssembler, depth: int | None = None, poll: float = 0.1):
        self.assembler = assembler
        self._queue: queue.Queue = queue.Queue(maxsize=depth or assembler.config.prefetch)
        self._poll = poll
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self.delivered = 0
        self.wait_s = 0.0
        """Time get() waited since the first batch: decode too slow, or collectors too slow (buffers < 90 %)."""
        self.startup_wait_s = 0.0
        self.last_wait_s = 0.0
        self._t_first: float | None = None
        self._thread = threading.Thread(target=self._run, name="prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self.assembler.next_batch(timeout=self._poll)  # waits for every buffer to be ready
                if batch is None:
                    continue
                while not self._stop.is_set():
                    try:
                        self._queue.put(batch, timeout=self._poll)
                        break
                    except queue.Full:
                        continue
        except BaseException as e:  # surfaced to the training loop by get()
            self._error = e
            log.exception("batch prefetch failed")
        finally:
            while True:  # leave room for the end marker so a waiting get() wakes up
                try:
                    self._queue.put_nowait(self._DONE)
                    break
                except queue.Full:
                    with contextlib.suppress(queue.Empty):
                        self._queue.get_nowait()

    def get(self, timeout: float | None = None) -> dict[str, torch.Tensor] | None:
        """The next batch; None on timeout or after close. Re-raises an error of the prefetch thread."""
        t0 = time.perf_counter()
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            item = None
        now = time.perf_counter()
        self.last_wait_s = now - t0
        if self._t_first is None:  # filling the buffers the first time is start-up, not starvation
            self.startup_wait_s += self.last_wait_s
            if item is not None and item is not self._DONE:
                self._t_first = now
        else:
            self.wait_s += self.last_wait_s
        if item is self._DONE:
            self._queue.put(self._DONE)  # later calls see the end too
            if self._error is not None:
                raise RuntimeError("batch prefetch thread failed") from self._error
            return None
        if item is not None:
            self.delivered += 1
        return item

    @property
    def wait_fraction(self) -> float:
        """Share of the time since the first batch that the training loop spent waiting for the next."""
        if self._t_first is None:
            return 0.0
        return self.wait_s / max(time.perf_counter() - self._t_first, 1e-9)

    def close(self, timeout: float = 5.0) -> None:
        """Stop the thread and drop undelivered batches; the assembler stays open (it may be shared)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("prefetch thread did not stop within %.1f s", timeout)
            return
        while True:  # drop undelivered batches so their memory goes now and get() reports the end
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._queue.put_nowait(self._DONE)

    def __enter__(self) -> Prefetcher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def stats(self) -> dict:
        return {
            "delivered": self.delivered,
            "data_wait_s": self.wait_s,
            "startup_wait_s": self.startup_wait_s,
            "data_wait_fraction": self.wait_fraction,
        }
