"""From samples to network inputs: the one place where raw units become what CharlesNet reads.

``prepare_batch`` takes uint8 NHWC frames (as they come out of the frame decoder) and moves them to the
device *as uint8* — a quarter of the bytes of float32 over PCIe — then stacks, resizes if needed and
normalises there. The permute of NHWC to NCHW is a view with channels_last strides, so the network gets
channels_last input without a copy. History and scalars are scaled to roughly [-1, 1] here too, so the trainer
and the player can never disagree about units.

Batch keys (numpy arrays or tensors; B samples):

- ``frame``   uint8 [B, H, W, 3] — the current hood frame
- ``stack``   uint8 [B, frames-1, H, W, 3] — past frames, oldest first (only when cfg.frames > 1)
- ``history`` float [B, T, 5] — HISTORY_FIELDS of the T frames before, oldest first (T >= history_length)
- ``speed``   float [B] (m/s); ``purpose`` float [B, 2] (angle rad, distance m); ``previous`` float [B, 2]
  (steering, throttle_brake of the frame before) — only those the config uses
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np
import timm
import torch
import torch.nn.functional as F
from torch import Tensor

from charles.model.config import HISTORY_FIELDS, ModelConfig

_IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


@lru_cache(maxsize=64)
def image_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Mean and std the backbone's weights expect (0.5/0.5 for Xception and IRv2, ImageNet's for most)."""
    try:
        pcfg = timm.models.get_pretrained_cfg(backbone)
    except Exception:  # unknown names fail later, in build_model, with a clearer message
        pcfg = None
    mean = tuple(getattr(pcfg, "mean", None) or _IMAGENET[0])
    std = tuple(getattr(pcfg, "std", None) or _IMAGENET[1])
    return mean, std  # type: ignore[return-value]


@lru_cache(maxsize=64)
def _affine(backbone: str, frames: int, device: torch.device, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(scale, shift) so that normalised = uint8 * scale + shift, one fused op, cached per device."""
    mean, std = image_stats(backbone)
    m = torch.tensor(mean * frames, dtype=torch.float64)
    s = torch.tensor(std * frames, dtype=torch.float64)
    scale = (1.0 / (255.0 * s)).view(1, -1, 1, 1)
    shift = (-m / s).view(1, -1, 1, 1)
    return scale.to(device=device, dtype=dtype), shift.to(device=device, dtype=dtype)


def _tensor(x: Any, device: torch.device, non_blocking: bool, dtype: torch.dtype | None = None) -> Tensor:
    t = x if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x))
    if dtype is not None and t.dtype not in (dtype, torch.uint8):
        t = t.to(dtype)
    return t.to(device, non_blocking=non_blocking)


def frames_to_input(
    frame: Tensor, stack: Tensor | None, cfg: ModelConfig, dtype: torch.dtype = torch.float32
) -> Tensor:
    """uint8 [B,H,W,3] (+ [B,K,H,W,3] past frames) on the device -> normalised [B, 3*frames, h, w]."""
    if frame.dtype != torch.uint8 or frame.dim() != 4 or frame.shape[-1] != 3:
        raise ValueError(f"frames are uint8 [B, H, W, 3], got {frame.dtype} {tuple(frame.shape)}")
    if cfg.frames > 1:
        want = (frame.shape[0], cfg.frames - 1, *frame.shape[1:])
        if stack is None or tuple(stack.shape) != want:
            got = None if stack is None else tuple(stack.shape)
            raise ValueError(f"{cfg.name} stacks {cfg.frames} frames: stack must be uint8 {want}, got {got}")
        # oldest first, current last: [B, K, H, W, 3] -> [B, H, W, K*3] -> NCHW view (channels_last strides)
        x = torch.cat([stack, frame.unsqueeze(1)], dim=1).permute(0, 2, 3, 1, 4).flatten(3)
    else:
        x = frame
    x = x.permute(0, 3, 1, 2)
    scale, shift = _affine(cfg.backbone, cfg.frames, x.device, dtype)
    if (x.shape[2], x.shape[3]) != (cfg.height, cfg.width):
        # On CPU, resize while still uint8: its antialiased channels_last kernel is ~20x faster than the float
        # one. CUDA has no uint8 kernel, and there the float resize is cheap anyway.
        x = x if x.device.type == "cpu" else x.to(dtype)
        x = F.interpolate(
            x, size=(cfg.height, cfg.width), mode="bilinear", antialias=True, align_corners=False
        )
    return torch.addcmul(shift, x.to(dtype), scale)


def history_to_input(history: Tensor, cfg: ModelConfig) -> Tensor:
    """[B, T, 5] raw history -> [B, history_length, len(history_fields)] scaled (the newest rows are kept)."""
    if history.dim() != 3 or history.shape[2] != len(HISTORY_FIELDS):
        raise ValueError(
            f"history is [B, T, {len(HISTORY_FIELDS)}] ({', '.join(HISTORY_FIELDS)}), got {tuple(history.shape)}"
        )
    if history.shape[1] < cfg.history_length:
        raise ValueError(
            f"{cfg.name} reads {cfg.history_length} history rows, the batch has {history.shape[1]}"
        )
    h = history[:, history.shape[1] - cfg.history_length :]
    cols = [_scale_column(h[..., HISTORY_FIELDS.index(f)], f, cfg) for f in cfg.history_fields]
    return torch.stack(cols, dim=-1)


def _scale_column(x: Tensor, field: str, cfg: ModelConfig) -> Tensor:
    x = torch.nan_to_num(x.float(), nan=0.0, posinf=0.0, neginf=0.0)
    if field == "speed":
        return x / cfg.speed_scale
    if field == "purpose_angle":
        return x / math.pi
    if field == "purpose_distance":
        return torch.log1p(x.clamp(min=0.0) / cfg.distance_scale)
    return x  # steering and throttle/brake are already in [-1, 1]


def scalars_to_input(batch: Mapping[str, Tensor], cfg: ModelConfig, n: int) -> Tensor:
    cols: list[Tensor] = []
    for name in cfg.scalar_names:
        if name == "speed":
            v = batch["speed"].reshape(n)
        elif name.startswith("purpose_"):
            v = batch["purpose"].reshape(n, 2)[:, 0 if name == "purpose_angle" else 1]
        else:
            v = batch["previous"].reshape(n, 2)[:, 0 if name == "previous_steering" else 1]
        cols.append(_scale_column(v, name.removeprefix("previous_"), cfg))
    return torch.stack(cols, dim=1)


def prepare_batch(
    batch: Mapping[str, Any],
    cfg: ModelConfig,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype = torch.float32,
    non_blocking: bool = True,
) -> dict[str, Tensor]:
    """Samples in raw units -> keyword arguments for ``CharlesNet.forward`` on ``device``.

    Pin the host arrays (``torch.from_numpy(a).pin_memory()``) to make the uint8 upload asynchronous.
    """
    device = torch.device(device)
    needed = {"frame"} if cfg.backbone else set()
    if cfg.frames > 1:
        needed.add("stack")
    if cfg.history != "none":
        needed.add("history")
    if cfg.use_speed:
        needed.add("speed")
    if cfg.use_purpose:
        needed.add("purpose")
    if cfg.use_previous:
        needed.add("previous")
    missing = sorted(needed - set(batch))
    if missing:
        raise ValueError(f"{cfg.name} needs batch keys {sorted(needed)}; missing {missing}")
    t = {k: _tensor(batch[k], device, non_blocking, torch.float32) for k in needed}
    out: dict[str, Tensor] = {}
    n = None
    if cfg.backbone:
        out["image"] = frames_to_input(t["frame"], t.get("stack"), cfg, dtype)
        n = out["image"].shape[0]
    if cfg.history != "none":
        out["history"] = history_to_input(t["history"], cfg).to(dtype)
        n = out["history"].shape[0]
    if cfg.scalar_names:
        if n is None:
            first = t[sorted(needed)[0]]
            n = first.shape[0]
        out["scalars"] = scalars_to_input(t, cfg, n).to(dtype)
    return out


def example_batch(
    cfg: ModelConfig, batch_size: int = 2, *, seed: int = 0, history_rows: int | None = None
) -> dict[str, np.ndarray]:
    """Random raw samples shaped for ``cfg`` (tests, benchmarks, warm-up passes)."""
    rng = np.random.default_rng(seed)
    h, w, b = cfg.height, cfg.width, batch_size
    t = history_rows or cfg.history_length
    hist = np.stack(
        [
            rng.uniform(-1, 1, (b, t)),
            rng.uniform(-1, 1, (b, t)),
            rng.uniform(0, 30, (b, t)),
            rng.uniform(-math.pi, math.pi, (b, t)),
            rng.uniform(0, 500, (b, t)),
        ],
        axis=-1,
    ).astype(np.float32)
    return {
        "frame": rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8),
        "stack": rng.integers(0, 256, (b, max(cfg.frames - 1, 0), h, w, 3), dtype=np.uint8),
        "history": hist,
        "speed": rng.uniform(0, 30, b).astype(np.float32),
        "purpose": np.stack([rng.uniform(-math.pi, math.pi, b), rng.uniform(0, 500, b)], axis=1).astype(
            np.float32
        ),
        "previous": rng.uniform(-1, 1, (b, 2)).astype(np.float32),
    }
