"""Where a new run's weights come from: random init, ImageNet weights for the backbone(s), parts of our runs.

Read only when a run starts: a resumed run continues its checkpoint and ignores all of this. Two settings
of the ``model`` section, both local safetensors files (``read_weights`` refuses pickles and corrupt files;
nothing is ever downloaded)::

    model.pretrained_file   a timm ImageNet file (timm's key names) -> every backbone; its first conv is
                            adapted to stacked frames the way timm does it (adapt_input_conv)
    model.transfer          part -> our weights file or checkpoint folder (the seed's model_0009: the CNN
                            from one run, the LSTMs from another); strict about missing tensors and shapes

A preset that asks for either (``pretrained``, ``transfer``) and a run that names no file is refused with
a ``ConfigError`` naming the setting: a run that silently trains from scratch costs days before anyone
notices. What loaded is returned as text for the log; the run configuration saved beside every checkpoint
keeps which files the run started from.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from timm.models import adapt_input_conv
from torch import Tensor, nn

from charles.config import ConfigError
from charles.model.config import ModelConfig
from charles.model.weights import WeightsError, load_parts, read_weights, resolve_part, unwrap

WEIGHTS_FILE = "weights.safetensors"
"""What a checkpoint folder holds the model in (charles.trainer.checkpoint.WEIGHTS)."""


def _covers(prefixes: list[str], part: str) -> bool:
    return any(part == p or part.startswith(p + ".") for p in prefixes)


def _transfer_sources(model: nn.Module, transfer: Mapping[str, str]) -> dict[str, Path]:
    """Part prefix -> weights file, each checked to exist (before anything is loaded)."""
    out: dict[str, Path] = {}
    for part, where in transfer.items():
        try:
            prefix = resolve_part(model, part)
        except ValueError as e:
            raise ConfigError(f"model.transfer: {e}") from None
        path = Path(where).expanduser()
        path = path / WEIGHTS_FILE if path.is_dir() else path
        if not path.is_file():
            raise ConfigError(f"model.transfer.{part}: no weights file at {path}")
        if _covers(list(out), prefix) or any(p.startswith(prefix + ".") for p in out):
            raise ConfigError(f"model.transfer: {part!r} overlaps another part; name each tensor once")
        out[prefix] = path
    return out


def _imagenet_state(model: nn.Module, path: Path) -> dict[str, Tensor]:
    """The file's tensors, its first conv adapted to the model's input channels (stacked frames)."""
    try:
        state = dict(read_weights(path).state_dict)
    except WeightsError as e:
        raise ConfigError(f"model.pretrained_file: {e}") from None
    net = model.backbones[0].net
    first = net.pretrained_cfg.get("first_conv")
    for name in (first,) if isinstance(first, str) else first or ():
        key, own = f"{name}.weight", net.get_submodule(name).weight
        if key in state and state[key].shape[1] != own.shape[1]:
            state[key] = adapt_input_conv(own.shape[1], state[key])
    return state


def fresh_start(
    model: nn.Module, mcfg: ModelConfig, pretrained_file: str = "", transfer: Mapping[str, str] | None = None
) -> str:
    """Load the configured files into a freshly built model; returns what was loaded, for the log."""
    model = unwrap(model)
    sources = _transfer_sources(model, transfer or {})
    given = list(sources)
    missing = [p for p in mcfg.transfer if not _covers(given, resolve_part(model, p))]
    if missing:
        raise ConfigError(
            f"model.transfer: {mcfg.name} starts {', '.join(mcfg.transfer)} from other runs, and no file is "
            f"given for {', '.join(missing)}; set model.transfer to {{part: weights file or checkpoint "
            "folder}, or model.overrides {transfer: []} to train them from scratch"
        )
    backbones = len(getattr(model, "backbones", ()))
    if mcfg.pretrained and backbones and not pretrained_file and not _covers(given, "backbones"):
        raise ConfigError(
            f"model.pretrained_file: {mcfg.name} starts its backbone from ImageNet weights and no file is "
            f"given; set model.pretrained_file to a local timm .safetensors file of {mcfg.backbone} "
            "(Charles never downloads weights), or model.overrides {pretrained: false} for random init"
        )
    lines: list[str] = []
    if pretrained_file:
        if not backbones:
            raise ConfigError(f"model.pretrained_file: {mcfg.name} has no backbone to load it into")
        if any(_covers(["backbones"], p) for p in given):
            raise ConfigError(
                "model.pretrained_file and model.transfer both set the backbones; keep one of them"
            )
        path = Path(pretrained_file).expanduser()
        state = _imagenet_state(model, path)
        parts = {f"backbones.{i}.net": (state, "") for i in range(backbones)}
        try:
            report = load_parts(model, parts)
        except WeightsError as e:
            raise ConfigError(f"model.pretrained_file: {path} does not fit {mcfg.backbone}: {e}") from None
        lines.append(f"ImageNet weights for {backbones} backbone(s) from {path}:")
        lines += [f"  {p.part}: {p.tensors} tensors, {p.values:,} values" for p in report.loaded]
        lines += [f"  unused: {', '.join(keys)}" for keys in report.unused.values()]
    if sources:
        try:
            report = load_parts(model, sources)
        except WeightsError as e:
            raise ConfigError(f"model.transfer: {e}") from None
        lines.append("transferred parts:")
        lines += [
            f"  {p.part} <- {sources[p.part]}: {p.tensors} tensors, {p.values:,} values"
            for p in report.loaded
        ]
    if not lines:
        return "random init (no model.pretrained_file, no model.transfer)"
    random = [t for t in report.untouched if not (pretrained_file and _covers(["backbones"], t))]
    lines.append(f"random init: {', '.join(random) or 'nothing'}")
    return "\n".join(lines)
