"""The player's side of the model: one sample in, raw outputs (and a Convcam) out, 30+ times a second.

``Predictor`` keeps the model in eval mode and runs it under ``torch.inference_mode`` (no autograd
bookkeeping at all), with bf16 autocast and channels_last on CUDA. New weights from the trainer swap in
place through ``swap_weights``: checked against the held model's config and shapes first, so a bad or foreign
file is refused and the car keeps driving on the old weights.
"""

from __future__ import annotations

import copy
import json
import logging
import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from charles.model.config import ModelConfig
from charles.model.convcam import ActivationTap, convcam_image
from charles.model.inputs import example_batch, prepare_batch
from charles.model.losses import decode
from charles.model.net import build_model, fold_batchnorm, optimize_for_device
from charles.model.weights import LoadedWeights, Source, load_weights, model_from_weights, unwrap

log = logging.getLogger(__name__)
_FOLD_CHECKED: dict[tuple[str, str], bool] = {}


class Predictor:
    """Inference for one sample at a time; ``predict`` returns name -> raw output (float32 [width])."""

    def __init__(
        self,
        model: nn.Module | ModelConfig | str,
        device: str | torch.device = "cpu",
        *,
        channels_last: bool | None = None,
        compile: bool | str = False,
        autocast: torch.dtype | None | bool = True,
        convcam: bool = False,
        fold_bn: bool = True,
    ):
        if not isinstance(model, nn.Module):
            model = build_model(model)
        self.cfg: ModelConfig = unwrap(model).cfg
        self.device = torch.device(device)
        self.model = optimize_for_device(
            model, self.device, channels_last=channels_last, compile=compile
        ).eval()
        """The network as the trainer saves it: what ``swap_weights`` loads into and ``save_weights`` reads."""
        # bf16 autocast pays on CUDA; on CPU it is slower than float32 for these nets, so off unless asked
        if autocast is True:
            autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.autocast: torch.dtype | None = autocast or None
        self._lock = threading.Lock()
        # torch.compile does its own fusing; otherwise batch norm is folded into the convolutions
        self.fold_bn = bool(fold_bn) and not compile and self._folding_checked()
        self.net: nn.Module = self._inference_net()
        """What ``predict`` runs: ``model`` with its batch norms folded (same outputs, less work), or
        ``model`` itself."""
        self._convcam = convcam and bool(self.cfg.backbone)
        self._tap = ActivationTap(unwrap(self.net), self.cfg.convcam_layer) if self._convcam else None

    @classmethod
    def from_weights(cls, source: Source, expected_cfg: ModelConfig | None = None, **kwargs) -> Predictor:
        model, _ = model_from_weights(source, expected_cfg)
        return cls(model, **kwargs)

    def predict(
        self,
        frame: np.ndarray | None,
        speed: float = 0.0,
        purpose: Sequence[float] = (0.0, 0.0),
        history: np.ndarray | None = None,
        stack: np.ndarray | Sequence[np.ndarray] | None = None,
        previous: Sequence[float] = (0.0, 0.0),
    ) -> dict[str, np.ndarray]:
        """One sample in raw units: frame uint8 [H, W, 3], speed m/s, purpose (angle rad, distance m),
        history float [T, 5] oldest first, stack of frames-1 past frames oldest first, previous action."""
        batch: dict[str, np.ndarray | torch.Tensor] = {}
        cfg = self.cfg
        if cfg.backbone:
            if frame is None:
                raise ValueError(f"{cfg.name} needs a frame")
            batch["frame"] = torch.from_numpy(np.ascontiguousarray(frame))[None]
            if cfg.frames > 1:
                if stack is None:
                    raise ValueError(
                        f"{cfg.name} stacks {cfg.frames} frames: pass stack= ({cfg.frames - 1} past frames)"
                    )
                batch["stack"] = torch.from_numpy(np.ascontiguousarray(np.asarray(stack, dtype=np.uint8)))[
                    None
                ]
        if cfg.history != "none":
            if history is None:
                raise ValueError(f"{cfg.name} reads a history: pass history= float [T, 5]")
            batch["history"] = np.asarray(history, dtype=np.float32)[None]
        batch["speed"] = np.array([speed], dtype=np.float32)
        batch["purpose"] = np.asarray(purpose, dtype=np.float32).reshape(1, 2)
        batch["previous"] = np.asarray(previous, dtype=np.float32).reshape(1, 2)
        with self._lock, torch.inference_mode():
            inputs = prepare_batch(batch, cfg, self.device)
            if self.autocast is not None:
                with torch.autocast(self.device.type, dtype=self.autocast):
                    out = self.net(**inputs)
            else:
                out = self.net(**inputs)
            return {k: v[0].float().cpu().numpy() for k, v in out.items()}

    def controls(
        self, raw: Mapping[str, np.ndarray], previous: Mapping[str, float] | None = None
    ) -> dict[str, float]:
        """Raw outputs -> control values (delta outputs add to ``previous[name]``)."""
        dec = decode({k: np.asarray(v)[None] for k, v in raw.items()}, self.cfg.outputs, previous)
        return {k: float(v[0]) for k, v in dec.items()}

    def convcam(self, **kwargs) -> np.ndarray | None:
        """The Convcam of the last prediction (None before the first one or when not enabled)."""
        if self._tap is None or any(m is None for m in self._tap.maps):
            return None
        return convcam_image([m for m in self._tap.maps if m is not None], **kwargs)

    def swap_weights(self, source: Source) -> LoadedWeights:
        """Load new weights of the same model in place (all or nothing); raises WeightsError otherwise."""
        with self._lock:
            loaded = load_weights(source, self.cfg, into=self.model)
            if self.fold_bn:
                self.net = self._inference_net()
                if self._tap is not None:
                    self._tap.close()
                    self._tap = ActivationTap(unwrap(self.net), self.cfg.convcam_layer)
            return loaded

    # -- batch norm folding ------------------------------------------------------------------------------

    def _inference_net(self) -> nn.Module:
        if not self.fold_bn:
            return self.model
        net = copy.deepcopy(self.model)
        fold_batchnorm(net)
        return net.eval()

    def _folding_checked(self) -> bool:
        key = (json.dumps(self.cfg.identity(), sort_keys=True, default=str), self.device.type)  # once per net
        if key not in _FOLD_CHECKED:
            _FOLD_CHECKED[key] = self._folding_is_exact()
        return _FOLD_CHECKED[key]

    def _folding_is_exact(self) -> bool:
        """Fold a copy whose norms have random statistics and compare it with the unfolded one on a random
        batch: folding goes by layer names, and a norm that runs *before* its conv (pre-activation nets) would
        be folded wrongly. Fresh norms (mean 0, var 1) would hide that, hence the random statistics."""
        probe = copy.deepcopy(self.model)
        gen = torch.Generator().manual_seed(0)
        for m in probe.modules():
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None:
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
                if m.affine:
                    with torch.no_grad():
                        m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                        m.bias.copy_(torch.rand(n, generator=gen) - 0.5)
        folded = copy.deepcopy(probe)
        if fold_batchnorm(folded) == 0:
            return False  # nothing to fold: predict runs the model itself
        with torch.inference_mode():
            inputs = prepare_batch(example_batch(self.cfg, 2), self.cfg, self.device)
            want, got = probe(**inputs), folded.eval()(**inputs)
        worst = max(float((want[k].float() - got[k].float()).abs().max()) for k in want)
        scale = max(float(want[k].float().abs().max()) for k in want)
        if worst <= 1e-3 * (1.0 + scale):
            return True
        log.warning(f"{self.cfg.name}: folding batch norm changed the outputs by {worst:.2g}; not folding")
        return False

    def warmup(self, n: int = 2) -> None:
        """Run a few blank predictions (cuDNN autotuning, torch.compile) before the first real frame."""
        cfg = self.cfg
        frame = np.zeros((cfg.height, cfg.width, 3), np.uint8)
        stack = np.zeros((cfg.frames - 1, cfg.height, cfg.width, 3), np.uint8)
        history = np.zeros((cfg.history_length, 5), np.float32)
        for _ in range(n):
            self.predict(frame, history=history, stack=stack)
