"""CharlesNet: timm backbone(s), an optional history encoder, a common dense part and one head per output.

Reads like a timm model file: the blocks, the model, then the builder. Presets live in
charles.model.presets (plain data, no torch); inputs are made by charles.model.inputs.prepare_batch.

Shape of the network (``backbone_per_output=False``)::

    image [B, 3*frames, H, W] -> backbone (timm, pooled) --+
    history [B, T, F] -> history encoder -> post dense ----+-> concat -> common dense -> head per output
    scalars [B, S] (speed, purpose, previous action) -------+

With ``backbone_per_output`` (the seed's "tcb" lines) each output gets its own backbone and its own common
dense part; the history encoder is shared.

State-dict prefixes are the *parts* that ``load_parts`` and ``freeze`` name: ``backbones`` (``backbones.0``,
``backbones.1``), ``history`` (``history.dense``, ``history.lstm``, ``history.post``), ``trunks``,
``heads`` (``heads.steering``...).

Why channel-stacked frames and not a shared backbone per frame: one backbone pass per sample keeps the player
at 30 predictions per second and training throughput unchanged (a per-frame backbone costs ``frames`` passes
in training), timm adapts ImageNet first-conv weights to any ``in_chans`` by itself, and it is what the seed's
model_0006 did. Frame order is not lost — each of the 3*frames input channels has its own first-conv weights —
so the network can tell the current frame from the past ones; the frames are packed oldest first, current last.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import timm
import torch
from torch import Tensor, nn

from charles.model.config import ModelConfig
from charles.outputs import OutputSpec

_ACTIVATIONS: dict[str, type[nn.Module]] = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "elu": nn.ELU}


# --- blocks ---------------------------------------------------------------------------------------------


class DenseStack(nn.Sequential):
    """Linear + activation (+ dropout) per width. Works on [B, F] and, per step, on [B, T, F] — which is all
    a Keras ``TimeDistributed(Dense)`` is."""

    def __init__(
        self, in_features: int, widths: Sequence[int], activation: str = "relu", dropout: float = 0.0
    ):
        layers: list[nn.Module] = []
        for w in widths:
            layers += [nn.Linear(in_features, w), _ACTIVATIONS[activation]()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            in_features = w
        super().__init__(*layers)
        self.out_features = in_features


class Backbone(nn.Module):
    """A timm network without its classifier: ``forward`` gives pooled features, ``forward_features`` the last
    feature map (what the Convcam shows by default)."""

    def __init__(self, name: str, in_chans: int, pretrained_file: str | Path | None = None):
        super().__init__()
        kwargs: dict = {}
        if pretrained_file is not None:
            path = Path(pretrained_file)
            if not path.is_file():
                raise FileNotFoundError(f"pretrained weights for {name!r} not found at {path}")
            # A local file only: timm's file source wins over every hub source, and adapts the first conv
            # to in_chans and drops the classifier for num_classes=0 itself.
            kwargs = dict(pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
        try:
            self.net = timm.create_model(name, num_classes=0, in_chans=in_chans, **kwargs)
        except RuntimeError as e:
            if "Unknown model" in str(e):
                raise ValueError(f"timm has no model {name!r} (see timm.list_models())") from e
            raise
        self.out_features: int = self.net.num_features

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.net.forward_features(x)


class HistoryEncoder(nn.Module):
    """The last T rows of (steering, throttle/brake, speed, purpose) -> one vector.

    ``mlp`` flattens the rows (order is only positional, which is why the seed moved on); ``td_lstm`` runs the
    same dense layers on every row, then an LSTM reads them oldest first; ``lstm`` feeds the rows to stacked
    LSTMs directly. An LSTM hands on either its *prediction* (the last output, h_T) or its *thought vector*
    (the final hidden and cell states of the top layer, h_T and c_T: the memory it would carry forward).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mode = cfg.history
        self.thought = cfg.history_output == "thought"
        n_in = len(cfg.history_fields)
        self.dense: DenseStack | None = None
        self.lstm: nn.LSTM | None = None
        if self.mode == "mlp":
            self.dense = DenseStack(cfg.history_length * n_in, cfg.history_widths, cfg.activation)
            out = self.dense.out_features
        else:
            if self.mode == "td_lstm":
                self.dense = DenseStack(n_in, cfg.history_widths, cfg.activation)
                n_in = self.dense.out_features
            self.lstm = nn.LSTM(
                n_in, cfg.history_lstm_units, num_layers=cfg.history_lstm_layers, batch_first=True
            )
            out = cfg.history_lstm_units * (2 if self.thought else 1)
        self.post = DenseStack(out, cfg.history_post, cfg.activation)
        self.out_features = self.post.out_features

    def forward(self, history: Tensor) -> Tensor:
        if self.lstm is None:
            assert self.dense is not None
            x = self.dense(history.flatten(1))
        else:
            x = self.dense(history) if self.dense is not None else history
            seq, (h, c) = self.lstm(x)
            x = torch.cat([h[-1], c[-1]], dim=1) if self.thought else seq[:, -1]
        return self.post(x)


class Head(nn.Module):
    """Per output: ``head_layers`` dense layers, each ``head_divisor`` times narrower, then the output layer
    (1 unit for regression, one logit per bin otherwise).

    A layer is never narrower than the output layer: the seed's heads were regression, and its 1024/4/16/64
    rule would put 16 units in front of 21 steering classes — a bottleneck classification would pay for.
    """

    def __init__(self, in_features: int, spec: OutputSpec, layers: int, divisor: int, activation: str):
        super().__init__()
        widths, w = [], in_features
        for _ in range(layers):
            w = max(w // divisor, spec.width, 1)
            widths.append(w)
        self.dense = DenseStack(in_features, widths, activation)
        self.out = nn.Linear(self.dense.out_features, spec.width)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.dense(x))


# --- the model ------------------------------------------------------------------------------------------


class CharlesNet(nn.Module):
    """The model of every line. ``forward`` returns raw outputs: name -> [B, spec.width] (logits or values)."""

    def __init__(self, cfg: ModelConfig, pretrained_file: str | Path | None = None):
        super().__init__()
        if cfg.pretrained and pretrained_file is None and cfg.backbone:
            raise ValueError(
                f"{cfg.name} starts from ImageNet weights: pass pretrained_file= (a local .safetensors or timm "
                "checkpoint); Charles never downloads weights at run time"
            )
        self.cfg = cfg
        n_branches = len(cfg.outputs) if cfg.backbone_per_output else 1
        self.backbones = nn.ModuleList(
            [
                Backbone(cfg.backbone, cfg.in_chans, pretrained_file if cfg.pretrained else None)
                for _ in range(n_branches)
            ]
            if cfg.backbone
            else []
        )
        self.history = HistoryEncoder(cfg) if cfg.history != "none" else None
        self.n_scalars = len(cfg.scalar_names)
        joined = (self.backbones[0].out_features if cfg.backbone else 0) + self.n_scalars
        joined += self.history.out_features if self.history is not None else 0
        self.feature_drop = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.trunks = nn.ModuleList(
            [DenseStack(joined, cfg.common_widths, cfg.activation, cfg.dropout) for _ in range(n_branches)]
        )
        trunk_out = self.trunks[0].out_features
        self.heads = nn.ModuleDict(
            {
                o.name: Head(trunk_out, o, cfg.head_layers, cfg.head_divisor, cfg.activation)
                for o in cfg.outputs
            }
        )
        # output name -> branch (backbone + trunk) that feeds it
        self._branch_of = {o.name: (i if cfg.backbone_per_output else 0) for i, o in enumerate(cfg.outputs)}
        self._frozen: tuple[str, ...] = ()
        if cfg.freeze:
            self.freeze(cfg.freeze)

    def forward(
        self, image: Tensor | None = None, history: Tensor | None = None, scalars: Tensor | None = None
    ) -> dict[str, Tensor]:
        shared: list[Tensor] = []
        if self.history is not None:
            if history is None:
                raise ValueError(f"{self.cfg.name} reads a history: pass history=[B, T, F]")
            shared.append(self.history(history))
        if self.n_scalars:
            if scalars is None:
                raise ValueError(
                    f"{self.cfg.name} reads {self.cfg.scalar_names}: pass scalars=[B, {self.n_scalars}]"
                )
            shared.append(scalars)
        if self.backbones and image is None:
            raise ValueError(f"{self.cfg.name} reads frames: pass image=[B, {self.cfg.in_chans}, H, W]")
        branches = []
        for i, trunk in enumerate(self.trunks):
            feats = [self.backbones[i](image)] if self.backbones else []
            x = torch.cat(feats + shared, dim=1) if len(feats) + len(shared) > 1 else (feats + shared)[0]
            branches.append(trunk(self.feature_drop(x)))
        return {name: head(branches[self._branch_of[name]]) for name, head in self.heads.items()}

    # -- parts -----------------------------------------------------------------------------------------

    def part_names(self) -> list[str]:
        """Every prefix that load_parts and freeze accept (top-level parts and their children)."""
        names: list[str] = []
        for top, module in self.named_children():
            if any(True for _ in module.parameters()):
                names.append(top)
                names += [
                    f"{top}.{child}"
                    for child, m in module.named_children()
                    if any(True for _ in m.parameters())
                ]
        return names

    def freeze(self, prefixes: Sequence[str]) -> list[str]:
        """Stop training the named parts: no gradients, and their batch-norm statistics stay as loaded
        (a frozen Keras layer runs batch norm in inference mode too). Returns the frozen parameter names."""
        from charles.model.weights import resolve_part

        prefixes = tuple(resolve_part(self, p) for p in prefixes)
        frozen = []
        for name, p in self.named_parameters():
            if any(name == pre or name.startswith(pre + ".") for pre in prefixes):
                p.requires_grad_(False)
                frozen.append(name)
        self._frozen = tuple(sorted(set(self._frozen) | set(prefixes)))
        self.train(self.training)
        return frozen

    def train(self, mode: bool = True) -> CharlesNet:
        super().train(mode)
        if mode:
            modules = dict(self.named_modules())
            for pre in self._frozen:
                modules[pre].eval()
        return self


# --- the builder ----------------------------------------------------------------------------------------


def build_model(cfg: ModelConfig | str, pretrained_file: str | Path | None = None) -> CharlesNet:
    """A fresh model for a config or a preset name. Random init unless the config asks for ImageNet weights,
    which come from ``pretrained_file`` (never from a hub). Our own checkpoints load with load_weights/load_parts."""
    if isinstance(cfg, str):
        from charles.model.presets import get_config

        cfg = get_config(cfg)
    return CharlesNet(cfg, pretrained_file=pretrained_file)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def optimize_for_device(
    model: nn.Module,
    device: str | torch.device = "cpu",
    *,
    channels_last: bool | None = None,
    compile: bool | str = False,
) -> nn.Module:
    """Move a model for speed: channels_last (default on CUDA, where cuDNN's NHWC kernels pay; prepare_batch
    makes channels_last inputs for free) and optionally torch.compile (worth it for long training runs and
    the player, not for tests: compiling IRv2 takes minutes). ``compile`` may name a backend ("inductor" when
    True). save_weights and load_weights see through the compiled wrapper."""
    device = torch.device(device)
    if channels_last is None:
        channels_last = device.type == "cuda"
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model, backend="inductor" if compile is True else compile)
    return model


# --- inference: batch norm folded into the convolutions --------------------------------------------------


def _foldable(conv: nn.Module | None, bn: nn.Module | None) -> bool:
    return (
        isinstance(conv, nn.Conv2d)
        and isinstance(bn, nn.BatchNorm2d)
        and bn.track_running_stats
        and bn.running_mean is not None
        and bn.num_features == conv.out_channels
    )


def _fold_pair(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """conv' = bn(conv(x)) for eval-mode statistics: per output channel, w' = w * g and b' = (b - mean) * g +
    beta with g = gamma / sqrt(var + eps). Done in float64 so the folded weights round once."""
    with torch.no_grad():
        var, mean = bn.running_var.double(), bn.running_mean.double()
        g = (bn.weight.double() if bn.affine else torch.ones_like(var)) / torch.sqrt(var + bn.eps)
        beta = bn.bias.double() if bn.affine else torch.zeros_like(var)
        b = conv.bias.double() if conv.bias is not None else torch.zeros_like(mean)
        w = conv.weight
        conv.weight = nn.Parameter(
            (w.double() * g.view(-1, *([1] * (w.dim() - 1)))).to(w.dtype), requires_grad=False
        )  # an elementwise op keeps the weight's memory format (channels_last stays channels_last)
        conv.bias = nn.Parameter(((b - mean) * g + beta).to(w.dtype), requires_grad=False)


def _after_fold(bn: nn.BatchNorm2d) -> nn.Module:
    """What stays of a folded norm layer: nothing, or the activation timm's BatchNormAct2d applies after it."""
    act, drop = getattr(bn, "act", None), getattr(bn, "drop", None)
    if isinstance(act, nn.Module):
        return nn.Sequential(drop, act) if isinstance(drop, nn.Module) else act
    return nn.Identity()


def fold_batchnorm(model: nn.Module) -> int:
    """Inference only, in place: every BatchNorm2d applied right after a Conv2d becomes part of that conv's
    weights and bias, so conv -> bn -> act runs as conv' -> act (one op and one pass over the activations less
    per layer; ~10-20 % of a batch-1 CPU forward for RegNet/ResNet-style backbones).

    Pairs found by structure: ``conv``/``bn`` and ``convN``/``bnN`` children (timm's ConvNormAct, IRv2's
    BasicConv2d, ResNet blocks) and consecutive Conv2d, BatchNorm2d in a Sequential. The names do not prove the
    order of the forward pass: check the folded model against the original before using it (the Predictor
    does, and keeps the original where they differ). Returns how many norms were folded."""
    n = 0
    for parent in list(model.modules()):
        kids = dict(parent.named_children())
        pairs: list[tuple[str, str]] = []
        if isinstance(parent, nn.Sequential):
            names = list(kids)
            pairs += list(zip(names, names[1:], strict=False))
        for name in kids:
            if name.startswith("conv") and (name[4:] == "" or name[4:].isdigit()):
                pairs.append((name, "bn" + name[4:]))
        for conv_name, bn_name in pairs:
            conv, bn = kids.get(conv_name), kids.get(bn_name)
            if _foldable(conv, bn):
                _fold_pair(conv, bn)  # type: ignore[arg-type]
                kids[bn_name] = _after_fold(bn)  # type: ignore[arg-type]
                setattr(parent, bn_name, kids[bn_name])
                n += 1
    return n


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run with ``n`` intra-op CPU threads, then restore. On a CPU shared with other busy processes, OpenMP
    threads spin-wait for each other: on a loaded 2-core machine one thread ran our tests 10x faster than two."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
