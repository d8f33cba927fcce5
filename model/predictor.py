"""The player's side of the model: one sample in, raw outputs (and a Convcam) out, 30+ times a second.

``Predictor`` keeps the model in eval mode and runs it under ``torch.inference_mode`` (no autograd
bookkeeping at all), with bf16 autocast and channels_last on CUDA. New weights from the trainer swap in
place through ``swap_weights``: checked against the held model's config and shapes first, so a bad or foreign
file is refused and the car keeps driving on the old weights.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from charles.model.config import ModelConfig
from charles.model.convcam import ActivationTap, convcam_image
from charles.model.inputs import prepare_batch
from charles.model.losses import decode
from charles.model.net import build_model, optimize_for_device
from charles.model.weights import LoadedWeights, Source, load_weights, model_from_weights, unwrap


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
    ):
        if not isinstance(model, nn.Module):
            model = build_model(model)
        self.cfg: ModelConfig = unwrap(model).cfg
        self.device = torch.device(device)
        self.model = optimize_for_device(
            model, self.device, channels_last=channels_last, compile=compile
        ).eval()
        # bf16 autocast pays on CUDA; on CPU it is slower than float32 for these nets, so off unless asked
        if autocast is True:
            autocast = torch.bfloat16 if self.device.type == "cuda" else None
        self.autocast: torch.dtype | None = autocast or None
        self._lock = threading.Lock()
        self._tap = (
            ActivationTap(unwrap(self.model), self.cfg.convcam_layer)
            if convcam and self.cfg.backbone
            else None
        )

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
                    out = self.model(**inputs)
            else:
                out = self.model(**inputs)
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
            return load_weights(source, self.cfg, into=self.model)

    def warmup(self, n: int = 2) -> None:
        """Run a few blank predictions (cuDNN autotuning, torch.compile) before the first real frame."""
        cfg = self.cfg
        frame = np.zeros((cfg.height, cfg.width, 3), np.uint8)
        stack = np.zeros((cfg.frames - 1, cfg.height, cfg.width, 3), np.uint8)
        history = np.zeros((cfg.history_length, 5), np.float32)
        for _ in range(n):
            self.predict(frame, history=history, stack=stack)
