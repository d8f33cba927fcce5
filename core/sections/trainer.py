"""The trainer's section of the run configuration (``trainer:`` in the YAML, ``CHARLES__TRAINER__*``).

The buffers' and the storage's own dataclasses (``BufferConfig``, ``StorageConfig``) are embedded as
sub-sections, so one file says everything about a training run and every checkpoint saves it whole:
``trainer.buffer.capacity``, ``trainer.storage.synchronous`` (``CHARLES__TRAINER__BUFFER__CAPACITY=...``).
What a batch looks like beyond its size (resolution, stacked frames, history rows, output order) is not
configured here: it follows from the model line (``model:`` section), so trainer and model cannot disagree.

Deliberately free of torch: every service imports the config sections.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Literal

from charles.config import knob

EVICTION_POLICIES = ("oldest", "random")
SYNC_MODES = ("OFF", "NORMAL", "FULL")


@dataclass
class BufferConfig:
    """How big the buffers are and when and how they give samples to training."""

    capacity: int = field(
        default=25_000, metadata={"help": "Samples per buffer (one buffer per balanced output)."}
    )
    start_fraction: float = field(
        default=0.9, metadata={"help": "Every buffer must be at least this full before a batch is drawn."}
    )
    samples_per_insert: float = field(
        default=1.0,
        metadata={
            "help": "Draws allowed per inserted sample: 1 consumes once, r>1 reuses each up to ceil(r) times."
        },
    )
    max_bytes: int = field(
        default=8 << 30,
        metadata={
            "help": "Bytes per buffer (frames and stacks as they arrive): past it the buffer evicts as when "
            "full, counted (drops{cause=buffer_bytes}); a buffer this close to full (start_fraction) may start "
            "training too. Sets of 8 MB samples must not fill memory before capacity is reached."
        },
    )
    eviction: str = field(default="oldest", metadata={"help": "What a full buffer drops: oldest or random."})
    seed: int | None = field(default=None, metadata={"help": "Seed of the draw/eviction RNG (None: fresh)."})

    def __post_init__(self) -> None:
        if self.capacity < 1:
            raise ValueError(f"buffer capacity must be at least 1, got {self.capacity}")
        if self.max_bytes < 1:
            raise ValueError(f"buffer max_bytes must be at least 1, got {self.max_bytes}")
        if not 0.0 < self.start_fraction <= 1.0:
            raise ValueError(f"start_fraction must be in (0, 1], got {self.start_fraction}")
        if not (math.isfinite(self.samples_per_insert) and self.samples_per_insert >= 1.0):
            raise ValueError(
                f"samples_per_insert must be a finite number >= 1, got {self.samples_per_insert}"
            )
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"eviction must be one of {EVICTION_POLICIES}, got {self.eviction!r}")

    @property
    def max_uses(self) -> int:
        """How many batches one sample may appear in before it leaves the buffer."""
        return math.ceil(self.samples_per_insert)

    @property
    def start_size(self) -> int:
        """Samples a buffer needs before training may draw from it."""
        return max(1, math.ceil(self.start_fraction * self.capacity))


@dataclass
class StorageConfig:
    """Where and how the buffers are mirrored to disk."""

    path: str = field(
        default="data/trainer/buffers.sqlite3", metadata={"help": "SQLite file of the mirrored buffers."}
    )
    enabled: bool = field(
        default=True,
        metadata={"help": "Mirror the buffers to disk and refill from it on start (open_buffers)."},
    )
    queue_samples: int = field(
        default=2048,
        metadata={"help": "Samples waiting for the writer at most; more are dropped and counted."},
    )
    batch_samples: int = field(default=256, metadata={"help": "Samples written per transaction at most."})
    synchronous: str = field(
        default="NORMAL",
        metadata={
            "help": "SQLite synchronous: NORMAL survives kill -9 fully, FULL also fsyncs every commit."
        },
    )
    mirror_removals: bool = field(
        default=True,
        metadata={"help": "Delete consumed samples on disk too, so a restart never retrains on them."},
    )
    page_size: int = field(
        default=16384,
        metadata={"help": "SQLite page size of a new store (25 KB frames: fewer overflow pages)."},
    )

    def __post_init__(self) -> None:
        if self.queue_samples < 1 or self.batch_samples < 1:
            raise ValueError("queue_samples and batch_samples must be at least 1")
        self.synchronous = self.synchronous.upper()
        if self.synchronous not in SYNC_MODES:
            raise ValueError(f"synchronous must be one of {SYNC_MODES}, got {self.synchronous!r}")
        if self.page_size < 512 or self.page_size > 65536 or self.page_size & (self.page_size - 1):
            raise ValueError(f"page_size must be a power of two in 512..65536, got {self.page_size}")


OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("constant", "cosine", "step")


@dataclass
class TrainerConfig:
    """How the trainer batches, optimises, checkpoints and publishes the model it trains."""

    # -- batches ---------------------------------------------------------------------------------------
    batch_size: int = knob(64, "Samples per batch (per rank), split equally over the buffers", min=1)
    per_buffer: int = knob(
        0,
        "Samples drawn from each buffer per batch; 0: batch_size / buffers (else it sets the batch size)",
        min=0,
    )
    decode_threads: int = knob(0, "CPU JPEG decode threads; 0: min(4, cores)", min=0)
    prefetch: int = knob(2, "Batches assembled ahead of the training step", min=1)
    gpu_decode: bool = knob(True, "Decode JPEGs with nvJPEG when training on CUDA")
    # -- optimisation ----------------------------------------------------------------------------------
    optimizer: Literal["adamw", "adam", "sgd"] = knob("adamw", "adamw, adam or sgd")
    lr: float = knob(1e-4, "Peak learning rate (after warm-up)", min=0.0)
    weight_decay: float = knob(0.01, "Weight decay (decoupled for adamw, L2 for adam and sgd)", min=0.0)
    momentum: float = knob(0.9, "SGD momentum (Nesterov)", min=0.0, max=1.0)
    schedule: Literal["constant", "cosine", "step"] = knob(
        "constant", "Learning-rate schedule after warm-up: constant, cosine or step"
    )
    warmup_batches: int = knob(0, "Linear warm-up from 0 to lr over this many batches", min=0)
    schedule_batches: int = knob(
        200_000, "cosine: batches after warm-up until the rate reaches min_lr_ratio", min=1
    )
    min_lr_ratio: float = knob(0.01, "cosine: the final rate as a fraction of lr", min=0.0, max=1.0)
    step_batches: int = knob(50_000, "step: multiply the rate by step_gamma every this many batches", min=1)
    step_gamma: float = knob(0.5, "step: the factor applied every step_batches", min=0.0, max=1.0)
    grad_clip: float = knob(1.0, "Clip the global gradient norm to this; 0: no clipping", min=0.0)
    skip_nonfinite: bool = knob(
        True, "Skip (and count) a batch whose loss is NaN or infinite instead of stepping"
    )
    # -- device ----------------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda"] = knob("auto", "auto (CUDA when available), cpu or cuda")
    bf16: bool = knob(True, "bf16 autocast of the forward pass on CUDA (ignored on the CPU)")
    channels_last: Literal["auto", "on", "off"] = knob(
        "auto", "channels_last memory format: auto is on for CUDA"
    )
    compile: bool = knob(False, "torch.compile the model: minutes of compiling that pay on long GPU runs")
    torch_threads: int = knob(0, "CPU intra-op threads; 0: torch's default", min=0)
    procs: int = knob(
        1,
        "Training processes on this machine, one per GPU: above 1 `charles trainer` starts itself under "
        "torchrun --nproc_per_node=N (DDP, each rank its share of the sets); 0: one per GPU it sees",
        min=0,
    )
    # -- checkpoints, publishing, logging --------------------------------------------------------------
    checkpoint_every: int = knob(
        250, "Checkpoint every N batches (and at shutdown); the seed's counters step by 250", min=1
    )
    keep_checkpoints: int = knob(5, "Checkpoints kept per run (the newest K)", min=1)
    publish: Literal["live", "off"] = knob(
        "live",
        "live: stream the weights to players on weights.<line>.v<N> while training (a new stream starts with "
        "each training period); off: train off-stream (checkpoints only; `charles stream` publishes one later)",
    )
    publish_every: int = knob(
        50, "Publish the weights to players every M batches (and at start and shutdown)", min=1
    )
    publish_half: bool = knob(True, "Publish float16 weights: half the bytes; players load them into float32")
    publish_on_start: bool = knob(True, "Publish the resumed (or initial) weights before the first batch")
    log_every: int = knob(10, "Losses to metrics, TensorBoard and the console every N batches", min=1)
    console_hz: float = knob(2.0, "Console updates per second (viewer and --console)", min=0.1, max=30.0)
    loss_history: int = knob(
        500, "Points of the console's loss plot at most (older ones are thinned)", min=10
    )
    # -- data ------------------------------------------------------------------------------------------
    flow_reuse: float = knob(
        4.0,
        "Flow control: the draws per inserted sample the trainer aims at (at most buffer.samples_per_insert); "
        "its heartbeat asks self-paced collectors for more data when it reuses more or waits, for less when "
        "it reuses less (charles.flow). 0: asks for nothing",
        min=0.0,
    )
    buffer: BufferConfig = knob(BufferConfig(), "The buffers (one per balanced output)")
    storage: StorageConfig = knob(
        StorageConfig(path=""), "The on-disk mirror of the buffers; path empty: <run>/storage/buffers.sqlite3"
    )

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.publish not in ("live", "off"):
            raise ValueError(f"publish must be live or off, got {self.publish!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        for name in (
            "batch_size",
            "checkpoint_every",
            "keep_checkpoints",
            "publish_every",
            "log_every",
            "prefetch",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.per_buffer < 0 or self.decode_threads < 0 or self.warmup_batches < 0:
            raise ValueError("per_buffer, decode_threads and warmup_batches must not be negative")

    def batch_for(self, buffers: int) -> tuple[int, int]:
        """(batch size, samples per buffer) for a run with this many buffers; the batch splits equally."""
        if self.per_buffer:
            return self.per_buffer * buffers, self.per_buffer
        if self.batch_size % buffers:
            raise ValueError(
                f"trainer.batch_size {self.batch_size} does not split equally over {buffers} buffers; "
                f"use a multiple of {buffers} or set trainer.per_buffer"
            )
        return self.batch_size, self.batch_size // buffers

    @property
    def threads_for_decode(self) -> int:
        return self.decode_threads or min(4, os.cpu_count() or 1)
