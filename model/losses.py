"""Losses, metrics, targets and decoding, all chosen by each output's kind (charles.outputs.OutputKind).

=============== ============================== ============== =========== ==================================
kind            target                         loss           metric      decoded control
=============== ============================== ============== =========== ==================================
regression      the value                      MSE            MAE         the value, clipped to the range
classification  bin index of the value         cross-entropy  accuracy    centre of the arg-max bin
delta           bin index of value - previous  cross-entropy  accuracy    previous + centre of arg-max bin
=============== ============================== ============== =========== ==================================

Targets are given in raw units (``targets[name]`` float [B]); a NaN marks a missing label (Balancing v2
keeps only the balanced output's label) and a value outside every bin is ignored too — both count as no
sample for that output instead of poisoning the mean. The binning runs on the device with the exact rules of
``charles.outputs.BinIndex`` (tested against it), so the GPU path never syncs to the host to build targets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from charles.outputs import OutputKind, OutputSpec

DELTA_DECIMALS = 1e6
"""Delta targets are rounded to 1e-6 before binning (float subtraction is never exactly 0.1)."""


@lru_cache(maxsize=256)
def _bin_tables(spec: OutputSpec, device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    exact = [(b.lo, i) for i, b in enumerate(spec.bins) if b.exact]
    ranges = [(b.lo, b.hi, i) for i, b in enumerate(spec.bins) if not b.exact]

    def t(xs: list, dtype: torch.dtype) -> Tensor:
        return torch.tensor(xs, dtype=dtype, device=device)

    return (
        t([v for v, _ in exact], torch.float64),
        t([i for _, i in exact], torch.long),
        t([lo for lo, _, _ in ranges], torch.float64),
        t([hi for _, hi, _ in ranges], torch.float64),
        t([i for _, _, i in ranges], torch.long),
    )


def bin_indices(values: Tensor, spec: OutputSpec) -> Tensor:
    """Value -> bin index (long), -1 where no bin holds it (and for NaN). Same rules as BinIndex.indices."""
    # Compare in the values' own precision: a float32 label that was exactly an edge (0.1) in the balancer's
    # float64 stays on that edge instead of landing a hair above it.
    dtype = values.dtype if values.dtype in (torch.float32, torch.float64) else torch.float64
    ev, ei, lo, hi, ri = (
        t.to(dtype) if t.is_floating_point() else t for t in _bin_tables(spec, values.device)
    )
    x = values.to(dtype).unsqueeze(-1)
    out = torch.full(values.shape, -1, dtype=torch.long, device=values.device)
    if lo.numel():
        inside = (x > lo) & (x <= hi)
        hit = inside.any(-1)
        out = torch.where(hit, ri[inside.long().argmax(-1)], out)
        out = torch.where(x[..., 0] == lo[0], ri[0], out)  # the lowest edge joins the range it bounds
    if ev.numel():
        eq = x == ev
        out = torch.where(eq.any(-1), ei[eq.long().argmax(-1)], out)  # exact bins win
    return out


def encode_targets(
    targets: Mapping[str, Tensor], specs: Sequence[OutputSpec], previous: Mapping[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """Raw values -> what each output learns: float values (NaN = none) or class indices (-1 = none).

    Integer tensors for classification/delta outputs are taken as ready-made class indices.
    """
    out: dict[str, Tensor] = {}
    for spec in specs:
        if spec.name not in targets:
            raise KeyError(f"no target for output {spec.name!r}; targets have {sorted(targets)}")
        v = targets[spec.name]
        if spec.kind is OutputKind.REGRESSION:
            out[spec.name] = v.float().reshape(-1)
            continue
        if not torch.is_floating_point(v):
            out[spec.name] = v.long().reshape(-1)
            continue
        v = v.reshape(-1)
        if spec.kind is OutputKind.DELTA:
            if previous is None or spec.name not in previous:
                raise ValueError(
                    f"output {spec.name!r} is a delta output: its target needs previous[{spec.name!r}]"
                )
            v = v.to(torch.float64) - previous[spec.name].reshape(-1).to(device=v.device, dtype=torch.float64)
            # 0.3 - 0.2 is 0.09999999999999998: round so changes land in exact delta bins such as 0.1
            v = torch.round(v * DELTA_DECIMALS) / DELTA_DECIMALS
        out[spec.name] = bin_indices(v, spec)
    return out


def _masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    # no boolean indexing: on a GPU that would sync to count the selected elements
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1.0)


def compute_loss(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    specs: Sequence[OutputSpec],
    previous: Mapping[str, Tensor] | None = None,
    weights: Mapping[str, float] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Total loss (sum over outputs, optionally weighted) and each output's loss (detached, for logging).

    Losses are computed in float32 even when the forward pass ran under bf16 autocast.
    """
    enc = encode_targets(targets, specs, previous)
    total: Tensor | None = None
    per: dict[str, Tensor] = {}
    for spec in specs:
        raw = outputs[spec.name].float()
        t = enc[spec.name].to(raw.device)
        if spec.kind is OutputKind.REGRESSION:
            valid = torch.isfinite(t)
            loss = _masked_mean((raw[:, 0] - torch.where(valid, t, 0.0)) ** 2, valid)
        else:
            valid = t >= 0
            ce = F.cross_entropy(raw, t.clamp(min=0), reduction="none")
            loss = _masked_mean(ce, valid)
        per[spec.name] = loss.detach()
        w = 1.0 if weights is None else float(weights.get(spec.name, 1.0))
        total = loss * w if total is None else total + loss * w
    assert total is not None, "no outputs to compute a loss for"
    return total, per


@torch.no_grad()
def compute_metrics(
    outputs: Mapping[str, Tensor],
    targets: Mapping[str, Tensor],
    specs: Sequence[OutputSpec],
    previous: Mapping[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """``{name}_mae`` for regression outputs, ``{name}_accuracy`` for classification and delta outputs
    (0-d tensors; call ``.item()`` when logging, not every step on a GPU)."""
    enc = encode_targets(targets, specs, previous)
    out: dict[str, Tensor] = {}
    for spec in specs:
        raw = outputs[spec.name].float()
        t = enc[spec.name].to(raw.device)
        if spec.kind is OutputKind.REGRESSION:
            valid = torch.isfinite(t)
            out[f"{spec.name}_mae"] = _masked_mean((raw[:, 0] - torch.where(valid, t, 0.0)).abs(), valid)
        else:
            valid = t >= 0
            out[f"{spec.name}_accuracy"] = _masked_mean((raw.argmax(1) == t).float(), valid)
    return out


def decode(
    outputs: Mapping[str, Tensor | np.ndarray],
    specs: Sequence[OutputSpec],
    previous: Mapping[str, float | Sequence[float] | np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Raw outputs -> control values per output, float64 [B], through ``OutputSpec.decode`` (the one
    definition the balancer and player share). Delta outputs add to ``previous[name]`` (default 0)."""
    res: dict[str, np.ndarray] = {}
    for spec in specs:
        raw = outputs[spec.name]
        arr = (
            raw.detach().float().cpu().numpy()
            if isinstance(raw, Tensor)
            else np.asarray(raw, dtype=np.float64)
        )
        arr = arr.reshape(arr.shape[0], -1) if arr.ndim > 1 else arr.reshape(1, -1)
        prev = np.broadcast_to(
            np.asarray((previous or {}).get(spec.name, 0.0), dtype=np.float64), (arr.shape[0],)
        )
        res[spec.name] = np.array([spec.decode(row, float(p)) for row, p in zip(arr, prev, strict=True)])
    return res
