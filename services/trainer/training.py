"""The training step and what surrounds it: device, optimizer, schedule, mixed precision, DDP. No sockets.

``Trainer`` owns the model (a ``charles.model`` line), the optimizer and the batch counter; ``step`` takes
one batch as ``charles.trainer.batches`` assembles it (already on the device, frames still uint8) and does
forward (bf16 autocast on CUDA), loss, backward, gradient clipping and the optimizer step at the learning
rate the schedule gives for this batch. The schedule is a pure function of the batch counter, so resuming
a checkpoint resumes the schedule with nothing else to save.

One host sync per step: the losses (and, every ``log_every`` batches, the metrics) come back to the CPU
after the backward pass is queued, together with the gradient norm. A NaN or infinite norm skips the step
(counted): the norm is the same on every rank after DDP's all-reduce, so all ranks skip together.

Multi-GPU: started by ``torchrun`` (``WORLD_SIZE`` > 1), ``Distributed.from_env`` joins the process group
(NCCL on CUDA, gloo on CPU) and the model is wrapped in DistributedDataParallel; the single-process path
is unchanged. How data is split over ranks is the service's business (see charles.trainer.service).
"""

from __future__ import annotations

import gc
import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from charles.model.config import ModelConfig
from charles.model.inputs import prepare_batch
from charles.model.losses import compute_loss, compute_metrics
from charles.model.net import build_model, optimize_for_device
from charles.model.weights import save_weights, unwrap
from charles.outputs import OutputKind
from charles.sections.trainer import TrainerConfig
from charles.trainer.batches import previous_of, targets_of
from charles.trainer.checkpoint import LoadedCheckpoint, apply_checkpoint, save_checkpoint

log = logging.getLogger(__name__)


# ---- schedule -------------------------------------------------------------------------------------------


def lr_factor(batch: int, cfg: TrainerConfig) -> float:
    """The learning rate of the step that trains batch number ``batch + 1``, as a fraction of ``cfg.lr``.

    Linear warm-up over ``warmup_batches``, then constant, cosine down to ``min_lr_ratio`` over
    ``schedule_batches`` (and flat after), or ``step_gamma`` every ``step_batches``.
    """
    if batch < cfg.warmup_batches:
        return (batch + 1) / cfg.warmup_batches
    t = batch - cfg.warmup_batches
    if cfg.schedule == "cosine":
        p = min(1.0, t / cfg.schedule_batches)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    if cfg.schedule == "step":
        return cfg.step_gamma ** (t // cfg.step_batches)
    return 1.0


# ---- device and ranks -----------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("trainer.device is cuda but CUDA is not available here")
    return torch.device("cuda", local_rank)


@dataclass
class Distributed:
    """This process's place in a torchrun job (only made when WORLD_SIZE > 1)."""

    rank: int
    world: int
    local_rank: int
    backend: str

    @classmethod
    def from_env(cls, device_name: str = "auto") -> Distributed | None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return None
        import torch.distributed as dist

        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        cuda = device_name != "cpu" and torch.cuda.is_available()
        backend = "nccl" if cuda else "gloo"
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            dist.init_process_group(backend)  # env:// rendezvous that torchrun set up
        return cls(rank, world, local_rank, backend)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def _device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" else torch.device("cpu")

    def agree(self, have_batch: bool, stop: bool) -> tuple[bool, bool]:
        """(every rank has a batch, some rank is stopping): all ranks step together or not at all."""
        import torch.distributed as dist

        t = torch.tensor([0.0 if have_batch else 1.0, 1.0 if stop else 0.0], device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        missing, stopping = t.tolist()
        return missing == 0.0, stopping == 1.0

    def broadcast_int(self, value: int) -> int:
        """Rank 0's value on every rank (the run version rank 0 chose), without pickling anything."""
        import torch.distributed as dist

        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.broadcast(t, src=0)
        return int(t.item())

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            gc.collect()  # a DDP wrapper still alive holds the group: freed after it, the exit aborts
            dist.destroy_process_group()


# ---- optimizer ------------------------------------------------------------------------------------------


def make_optimizer(
    params: list[nn.Parameter], cfg: TrainerConfig, device: torch.device
) -> torch.optim.Optimizer:
    fused = device.type == "cuda"  # one kernel for all parameters; CPU keeps the foreach default
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused or None)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0, weight_decay=cfg.weight_decay
    )


# ---- the trainer ----------------------------------------------------------------------------------------


@dataclass
class StepResult:
    loss: float
    """Total loss (sum over outputs) of the batch."""
    losses: dict[str, float]
    """Each output's loss."""
    samples: int
    """Samples in the batch on this rank."""
    grad_norm: float
    skipped: bool = False
    """True when the step was not taken (non-finite loss or gradient)."""
    metrics: dict[str, float] | None = None
    """``compute_metrics`` (MAE or accuracy per output) when asked for."""


class Trainer:
    """A model line being trained: model, optimizer, schedule and batch counter."""

    def __init__(
        self,
        model_cfg: ModelConfig,
        cfg: TrainerConfig,
        device: str | torch.device = "cpu",
        dist: Distributed | None = None,
        model: nn.Module | None = None,
        compile_backend: str = "inductor",
    ):
        """``compile_backend``: torch.compile's backend when ``cfg.compile`` is on (benches take aot_eager
        to smoke-test the compiled step on a CPU, where inductor's C++ build of a model takes minutes)."""
        self.mcfg = model_cfg
        self.cfg = cfg
        self.device = torch.device(device)
        self.dist = dist
        self.world = dist.world if dist else 1
        self.outputs = list(model_cfg.output_names)
        self._deltas = any(o.kind is OutputKind.DELTA for o in model_cfg.outputs)
        cuda = self.device.type == "cuda"
        channels_last = {"auto": cuda, "on": True, "off": False}[cfg.channels_last]
        # Random init: a fresh run's files (ImageNet, transferred parts) are loaded by the service once it
        # knows there is no checkpoint to resume (charles.trainer.initial), so none is needed to build it.
        net = model if model is not None else build_model(model_cfg.replace(pretrained=False))
        self.module: nn.Module = optimize_for_device(
            net, self.device, channels_last=channels_last, compile=False
        )
        self.model: nn.Module = self.module
        if dist is not None:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if cuda else None
            # grads live in the all-reduce buckets: no copy, and no stride mismatch for 1x1 conv weights
            self.model = DDP(self.module, device_ids=ids, gradient_as_bucket_view=True)
        if cfg.compile:
            self.model = torch.compile(self.model, backend=compile_backend)
        self.params = [p for p in self.module.parameters() if p.requires_grad]
        self.optimizer = make_optimizer(self.params, cfg, self.device)
        self.autocast = cuda and cfg.bf16
        self.batch = 0
        """Optimizer steps taken in this run (the run's batch counter)."""
        self.samples = 0
        """Samples trained in this run, all ranks together."""
        self.skipped = 0

    @property
    def lr(self) -> float:
        """The rate of the next step."""
        return self.cfg.lr * lr_factor(self.batch, self.cfg)

    def step(self, batch: dict[str, Tensor], with_metrics: bool = False) -> StepResult:
        """Train one batch; returns its losses (one host sync, after the backward pass is queued)."""
        self.model.train()
        inputs = prepare_batch(batch, self.mcfg, self.device, non_blocking=True)
        targets = targets_of(batch, self.outputs)
        previous = previous_of(batch, self.outputs) if self._deltas else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            out = self.model(**inputs)
        loss, per = compute_loss(out, targets, self.mcfg.outputs, previous)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in self.params if p.grad is not None]
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
        metrics = compute_metrics(out, targets, self.mcfg.outputs, previous) if with_metrics else {}
        values = torch.stack(
            [
                loss.detach().float(),
                norm.float(),
                *(v.float() for v in per.values()),
                *(v.float() for v in metrics.values()),
            ]
        ).tolist()
        total, grad_norm = values[0], values[1]
        losses = dict(zip(per, values[2 : 2 + len(per)], strict=True))
        mvals = dict(zip(metrics, values[2 + len(per) :], strict=True)) if with_metrics else None
        n = int(batch["labels"].shape[0])
        if self.cfg.skip_nonfinite and not math.isfinite(grad_norm):
            self.optimizer.zero_grad(set_to_none=True)
            self.skipped += 1
            return StepResult(total, losses, n, grad_norm, skipped=True, metrics=mvals)
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        self.optimizer.step()
        self.batch += 1
        self.samples += n * self.world
        return StepResult(total, losses, n, grad_norm, metrics=mvals)

    # -- weights and checkpoints -------------------------------------------------------------------------

    def weights_payload(self, half: bool = False, metadata: dict[str, str] | None = None) -> bytes:
        """The model as safetensors bytes (what players receive); float16 when ``half``."""
        data = save_weights(self.module, self.mcfg, half=half, metadata=metadata)
        assert data is not None
        return data

    def save(self, directory: str | os.PathLike, extra: dict[str, Any] | None = None) -> Path:
        state = {
            "samples": self.samples,
            "skipped": self.skipped,
            "lr": self.lr,
            "schedule": {
                "kind": self.cfg.schedule,
                "warmup_batches": self.cfg.warmup_batches,
                "lr": self.cfg.lr,
                "factor": lr_factor(self.batch, self.cfg),
            },
            "world": self.world,
            **(extra or {}),
        }
        return save_checkpoint(directory, self.module, self.mcfg, self.optimizer, self.batch, state=state)

    def restore(self, loaded: LoadedCheckpoint) -> None:
        """Continue from a checked checkpoint: weights, optimizer state, batch and sample counters."""
        apply_checkpoint(loaded, self.module, self.optimizer)
        self.batch = loaded.batch
        self.samples = loaded.samples
        self.skipped = int(loaded.state.get("skipped", 0))

    def unwrapped(self) -> nn.Module:
        return unwrap(self.model)

    def close(self) -> None:
        """Let go of the DistributedDataParallel wrapper before ``Distributed.close``: its reducer holds the
        process group, and a group destroyed under a live reducer aborts the process at exit (seen 1 run in
        5 with gloo). The plain module stays, for a last checkpoint or weights."""
        self.model = self.module
