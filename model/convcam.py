"""Convcam: the activations of a backbone layer, one small map per kernel, tiled into one image.

By default the layer is the backbone's last feature map — the input of timm's global pool (IRv2's
``conv2d_7b``, the seed's ``conv_7b_ac``) — captured with a forward *pre*-hook on the pool, so it works for
every timm model without knowing its layer names. Any other module can be named (``repeat_2``,
``block12``...); ``convcam_layers`` lists them. The player captures during its normal prediction
(``ActivationTap``), so the Convcam costs no second forward pass.

With two backbones (the "tcb" lines) both maps share one tile grid, each in its own colour, added — as on the
seed's stream.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor, nn

from charles.model.weights import unwrap

PALETTE: tuple[tuple[int, int, int], ...] = ((255, 140, 0), (0, 170, 255), (90, 255, 90), (255, 60, 200))
"""Colours per backbone when there are several (orange, sky blue, green, pink); one backbone is grey."""


def _backbone_nets(model: nn.Module) -> list[nn.Module]:
    model = unwrap(model)
    backbones = getattr(model, "backbones", None)
    if backbones is None:
        return [model]  # a bare timm model
    if len(backbones) == 0:
        raise ValueError("this model has no backbone, so no Convcam")
    return [b.net for b in backbones]


def _pool_of(net: nn.Module) -> nn.Module:
    for name in ("global_pool", "head.global_pool"):
        m = net.get_submodule(name) if _has(net, name) else None
        if m is not None:
            return m
    for _, m in net.named_modules():
        if type(m).__name__ == "SelectAdaptivePool2d":
            return m
    raise ValueError(f"{type(net).__name__} has no global pool to tap; name a layer for the Convcam")


def _has(net: nn.Module, name: str) -> bool:
    try:
        net.get_submodule(name)
        return True
    except AttributeError:
        return False


def convcam_layers(model: nn.Module) -> list[str]:
    """Layers of the (first) backbone a Convcam can show: modules up to two levels deep that hold weights,
    in definition order (roughly input to output), without the pool and classifier."""
    net = _backbone_nets(model)[0]
    skip = ("global_pool", "head", "fc", "classif", "classifier", "head_drop")
    return [
        n
        for n, m in net.named_modules()
        if n and n.count(".") < 2 and n.split(".")[0] not in skip and any(True for _ in m.parameters())
    ]


class ActivationTap:
    """Captures one layer's activations of every backbone on each forward pass, until ``close()``.

    ``layer=""`` taps the last feature map. ``maps`` holds the newest [B, C, h, w] per backbone (detached).
    """

    def __init__(self, model: nn.Module, layer: str = ""):
        self.maps: list[Tensor | None] = []
        self._handles = []
        for i, net in enumerate(_backbone_nets(model)):
            self.maps.append(None)
            if layer:
                if not _has(net, layer):
                    sample = [n for n, _ in net.named_children()]
                    raise ValueError(f"backbone has no layer {layer!r}; top-level layers: {sample}")
                h = net.get_submodule(layer).register_forward_hook(self._post(i))
            else:
                h = _pool_of(net).register_forward_pre_hook(self._pre(i))
            self._handles.append(h)

    def _pre(self, i: int):
        def hook(_m: nn.Module, args: tuple) -> None:
            self.maps[i] = args[0].detach()

        return hook

    def _post(self, i: int):
        def hook(_m: nn.Module, _args: tuple, out: Tensor | tuple) -> None:
            t = out[0] if isinstance(out, tuple | list) else out
            self.maps[i] = t.detach()

        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> ActivationTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@torch.inference_mode()
def feature_maps(model: nn.Module, inputs: dict[str, Tensor], layer: str = "") -> list[Tensor]:
    """Run the model once and return the chosen layer's activations per backbone ([B, C, h, w] each)."""
    with ActivationTap(model, layer) as tap:
        model(**inputs)
    if any(m is None for m in tap.maps):
        raise ValueError(f"layer {layer or 'last feature map'!r} did not run in the forward pass")
    return [m for m in tap.maps if m is not None]


def _grid(c: int, h: int, w: int, aspect: float) -> tuple[int, int]:
    """Columns and rows for c tiles of h x w so the whole image is close to ``aspect`` (width / height)."""
    cols = max(1, min(c, round(math.sqrt(c * aspect * h / w))))
    return cols, math.ceil(c / cols)


def _normalise(a: np.ndarray) -> np.ndarray:
    # one scale per backbone (not per tile), so strong and dead kernels look different; the top 0.5 %
    # saturate instead of one hot pixel darkening everything
    lo = float(a.min())
    hi = float(np.percentile(a, 99.5))
    if hi <= lo:
        hi = float(a.max())
    if hi <= lo:
        return np.zeros_like(a, dtype=np.float32)
    return np.clip((a - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


def convcam_image(
    activations: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    *,
    aspect: float = 16 / 9,
    colors: Sequence[tuple[int, int, int]] | None = None,
    scale: int = 1,
    sample: int = 0,
) -> np.ndarray:
    """Tile every kernel's map side by side into one uint8 RGB image [H, W, 3].

    ``activations`` is one [C, h, w] / [B, C, h, w] map or a list of them (one per backbone; ``sample``
    picks the batch row). One map is drawn in grey; several are drawn in ``colors`` (default ``PALETTE``)
    and added into the same grid when their shapes agree, else placed side by side. ``scale`` enlarges
    each pixel (nearest neighbour) for display.
    """
    maps = [activations] if isinstance(activations, Tensor | np.ndarray) else list(activations)
    if not maps:
        raise ValueError("no activations to draw")
    arrs = []
    for m in maps:
        a = m.detach().float().cpu().numpy() if isinstance(m, Tensor) else np.asarray(m, dtype=np.float32)
        if a.ndim == 4:
            a = a[sample]
        if a.ndim != 3:
            raise ValueError(f"activations are [C, h, w] or [B, C, h, w], got shape {a.shape}")
        arrs.append(_normalise(a))
    tiles = []
    for a in arrs:
        c, h, w = a.shape
        cols, rows = _grid(c, h, w, aspect)
        pad = np.zeros((rows * cols - c, h, w), dtype=np.float32)
        t = (
            np.concatenate([a, pad])
            .reshape(rows, cols, h, w)
            .transpose(0, 2, 1, 3)
            .reshape(rows * h, cols * w)
        )
        tiles.append(t)
    if len(tiles) == 1:
        img = np.repeat(tiles[0][:, :, None], 3, axis=2) * 255.0
    else:
        colors = list(colors or PALETTE)
        if len(colors) < len(tiles):
            raise ValueError(f"{len(tiles)} backbones need {len(tiles)} colours, got {len(colors)}")
        if len({t.shape for t in tiles}) == 1:
            img = sum(
                t[:, :, None] * np.asarray(col, np.float32) for t, col in zip(tiles, colors, strict=False)
            )
        else:
            hmax = max(t.shape[0] for t in tiles)
            img = np.concatenate(
                [
                    np.pad(
                        t[:, :, None] * np.asarray(col, np.float32), ((0, hmax - t.shape[0]), (0, 0), (0, 0))
                    )
                    for t, col in zip(tiles, colors, strict=False)
                ],
                axis=1,
            )
    out = np.clip(img, 0, 255).astype(np.uint8)
    if scale > 1:
        out = out.repeat(scale, axis=0).repeat(scale, axis=1)
    return np.ascontiguousarray(out)
