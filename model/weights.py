"""Weights on disk and on the wire: safetensors with the model's identity inside, and transfer of parts.

Weights arrive from the network and from disk, so they are untrusted (DESIGN.md): only safetensors is read —
a format of raw tensors and a JSON header that cannot run code — and never ``torch.load``/pickle. Every file
carries its ``ModelConfig`` in the safetensors metadata, so a player refuses weights of a different model
instead of loading them into the wrong network. Every refusal is a ``WeightsError`` (a ValueError) with a short
``reason`` for metrics, like FrameError.

Transfer learning of parts (the seed's model_0009: the CNN from one run, the LSTMs from another) is
``load_parts``: state-dict prefixes -> source files, strict about what is missing and about shapes, with a
report of what loaded and what stayed as initialised.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from charles.model.config import ModelConfig

CONFIG_KEY = "charles.model_config"
FORMAT_KEY = "charles.weights_format"
FORMAT_VERSION = "1"
MAX_HEADER = 64 * 1024 * 1024
"""A safetensors header larger than this is hostile or broken; we do not parse it."""

PART_ALIASES = {
    "backbone": "backbones",
    "cnn": "backbones",
    "rnn": "history.lstm",
    "head": "heads",
    "trunk": "trunks",
}

Source = str | os.PathLike | bytes | bytearray | memoryview | Mapping[str, Tensor]


class WeightsError(ValueError):
    """Weights we refuse to load; ``reason`` is one short word for metrics and logs."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class LoadedWeights:
    """A parsed weights file: its tensors, the model config it claims (None for foreign files) and metadata."""

    state_dict: dict[str, Tensor]
    config: ModelConfig | None
    metadata: dict[str, str] = field(default_factory=dict)


def unwrap(model: nn.Module) -> nn.Module:
    """The module behind torch.compile / DDP wrappers (their state-dict keys carry extra prefixes)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if inner is None and isinstance(model, nn.DataParallel | nn.parallel.DistributedDataParallel):
            inner = model.module
        if not isinstance(inner, nn.Module):
            return model
        model = inner


# --- save -----------------------------------------------------------------------------------------------


def save_weights(
    model: nn.Module,
    cfg: ModelConfig | None = None,
    path: str | os.PathLike | None = None,
    *,
    half: bool = False,
    metadata: Mapping[str, str] | None = None,
) -> bytes | None:
    """Serialise the model's state dict as safetensors with ``cfg`` in the metadata.

    With ``path`` the file is written atomically (temp file + rename, so a reader never sees half a file)
    and None is returned; without it the bytes are returned (for the wire). ``half`` stores floating tensors
    as float16: half the bytes for streaming weights to players; they load back into float32 models.
    """
    model = unwrap(model)
    cfg = cfg or getattr(model, "cfg", None)
    if not isinstance(cfg, ModelConfig):
        raise ValueError("save_weights needs the model's ModelConfig (pass cfg=)")
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().to("cpu")
        if half and v.is_floating_point():
            v = v.half()
        tensors[k] = v.contiguous()
    meta = {"format": "pt", CONFIG_KEY: cfg.to_json(), FORMAT_KEY: FORMAT_VERSION}
    for k, v in (metadata or {}).items():
        if k in meta:
            raise ValueError(f"metadata key {k!r} is reserved")
        meta[str(k)] = str(v)
    if path is None:
        return safetensors.torch.save(tensors, metadata=meta)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        safetensors.torch.save_file(tensors, tmp, metadata=meta)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return None


# --- load -----------------------------------------------------------------------------------------------


def _check_header(head: bytes, size: int, label: str) -> tuple[int, dict[str, str]]:
    """Validate the safetensors framing from the first bytes; returns (header length, metadata).

    safetensors starts with a little-endian u64 header length and a JSON object. Only when that framing
    fails do we look for pickle signatures (a length of 0x0580 also starts with the bytes 0x80 0x05), to say
    *why* a file is refused.
    """
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else 0
    framed = 2 <= n <= MAX_HEADER and 8 + n <= size and len(head) >= 8 + n and head[8:9] == b"{"
    if not framed:
        if head[:4] == b"PK\x03\x04":
            raise WeightsError(
                "pickle",
                f"{label} is a zip archive (torch.save's format) holding a pickle, which "
                "can run code when loaded; Charles only loads safetensors",
            )
        if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:
            raise WeightsError(
                "pickle",
                f"{label} is a pickle, which can run code when loaded; Charles only loads safetensors",
            )
        raise WeightsError(
            "not_safetensors", f"{label} ({size} bytes) does not start with a safetensors header"
        )
    try:
        header = json.loads(head[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise WeightsError("not_safetensors", f"{label}: header is not JSON ({type(e).__name__})") from None
    if not isinstance(header, dict):
        raise WeightsError("not_safetensors", f"{label}: header is not a JSON object")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in meta.items()
    ):
        raise WeightsError("not_safetensors", f"{label}: metadata must map strings to strings")
    return n, meta


def read_weights(
    source: Source, expected_cfg: ModelConfig | None = None, *, check_finite: bool = True
) -> LoadedWeights:
    """Parse safetensors bytes or a file; refuse pickles, corrupt data, non-finite weights and — when
    ``expected_cfg`` is given — files without a config or claiming a different model (compared by
    ``ModelConfig.identity``, so training-only fields such as dropout or freeze may differ)."""
    if isinstance(source, Mapping):
        return LoadedWeights(dict(source), None, {})
    if isinstance(source, bytes | bytearray | memoryview):
        data = bytes(source)
        label = f"weights ({len(data)} bytes)"
        _, meta = _check_header(data[: 8 + min(len(data), MAX_HEADER)], len(data), label)
        load = lambda: safetensors.torch.load(data)  # noqa: E731
    elif isinstance(source, str | os.PathLike):
        path = Path(source)
        label = str(path)
        if not path.is_file():
            raise WeightsError("missing", f"no weights file at {path}")
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            head += f.read(min(n, MAX_HEADER)) if 0 < n <= MAX_HEADER else f.read(8)
        _, meta = _check_header(head, size, label)
        load = lambda: safetensors.torch.load_file(path)  # noqa: E731
    else:
        raise TypeError(f"weights come as bytes, a path or a state dict, not {type(source).__name__}")

    cfg = None
    if CONFIG_KEY in meta:
        try:
            cfg = ModelConfig.from_json(meta[CONFIG_KEY])
        except ValueError as e:
            raise WeightsError("bad_config", f"{label} carries a model config we cannot read: {e}") from None
    if expected_cfg is not None:
        if cfg is None:
            raise WeightsError(
                "no_config", f"{label} does not say which model it belongs to (no {CONFIG_KEY} metadata)"
            )
        diff = expected_cfg.differences(cfg)
        if diff:
            shown = ", ".join(f"{k}: expected {a!r}, file has {b!r}" for k, (a, b) in list(diff.items())[:4])
            raise WeightsError("config_mismatch", f"{label} is for a different model ({shown})")
    try:
        state = load()
    except Exception as e:  # safetensors raises its own error types for every kind of corruption
        raise WeightsError("corrupt", f"{label} is not valid safetensors: {e}") from None
    if check_finite:
        bad = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if bad:
            raise WeightsError("non_finite", f"{label} has NaN or infinite values in {bad[:3]}")
    return LoadedWeights(state, cfg, dict(meta))


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], label: str = "weights") -> None:
    """Every tensor present with the model's shape and nothing extra — checked before any is copied, so a
    refused file leaves the model untouched."""
    own = unwrap(model).state_dict()
    missing = [k for k in own if k not in state]
    extra = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
        for k, v in own.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or extra or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if extra:
            parts.append(f"{len(extra)} unexpected (e.g. {extra[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} with other shapes (e.g. {shapes[:3]})")
        raise WeightsError("tensor_mismatch", f"{label} does not fit the model: " + "; ".join(parts))


def load_weights(
    source: Source,
    expected_cfg: ModelConfig | None = None,
    *,
    into: nn.Module | None = None,
    check_finite: bool = True,
) -> LoadedWeights:
    """``read_weights``, and with ``into`` also load them into that model (strict: all or nothing).

    When ``into`` is a CharlesNet and no ``expected_cfg`` is given, the model's own config is expected.
    """
    if into is not None and expected_cfg is None:
        expected_cfg = getattr(unwrap(into), "cfg", None)
    w = read_weights(source, expected_cfg, check_finite=check_finite)
    if into is not None:
        target = unwrap(into)
        check_state_dict(target, w.state_dict)
        with torch.no_grad():
            target.load_state_dict(w.state_dict, strict=True)
    return w


def model_from_weights(
    source: Source, expected_cfg: ModelConfig | None = None
) -> tuple[nn.Module, LoadedWeights]:
    """Build the model a weights file describes and load it (a fresh player, a resumed trainer)."""
    from charles.model.net import build_model

    w = read_weights(source, expected_cfg)
    if w.config is None:
        raise WeightsError("no_config", "the weights do not say which model they belong to")
    # The file's own config, minus ImageNet init: its weights replace the backbone's anyway.
    model = build_model(w.config.replace(pretrained=False))
    check_state_dict(model, w.state_dict)
    with torch.no_grad():
        model.load_state_dict(w.state_dict, strict=True)
    return model, w


# --- transfer of parts ----------------------------------------------------------------------------------


def resolve_part(model: nn.Module, part: str) -> str:
    """A part name (a module prefix of the state dict, or an alias like ``backbone``) -> the module prefix."""
    model = unwrap(model)
    name = PART_ALIASES.get(part, part)
    modules = dict(model.named_modules())
    if not name or name not in modules:
        known = (
            model.part_names()
            if hasattr(model, "part_names")
            else sorted(k for k in modules if k.count(".") < 2)
        )
        raise ValueError(f"model has no part {part!r}; parts: {', '.join(known)} (aliases: {PART_ALIASES})")
    return name


@dataclass
class PartLoad:
    part: str
    source: str
    source_prefix: str
    tensors: int
    values: int


@dataclass
class LoadReport:
    """What ``load_parts`` did; ``str()`` is the log line a person reads."""

    loaded: list[PartLoad] = field(default_factory=list)
    unused: dict[str, list[str]] = field(default_factory=dict)
    """source label -> keys under the source prefix that nothing took (e.g. an ImageNet classifier)."""
    untouched: list[str] = field(default_factory=list)
    """Top-level parts of the model that kept their initial weights."""

    def __str__(self) -> str:
        lines = [f"loaded {len(self.loaded)} part(s), {sum(p.values for p in self.loaded):,} values:"]
        for p in self.loaded:
            src = f"{p.source}[{p.source_prefix or '*'}]"
            lines.append(f"  {p.part} <- {src}: {p.tensors} tensors, {p.values:,} values")
        for label, keys in self.unused.items():
            lines.append(f"  unused in {label}: {len(keys)} tensors (e.g. {', '.join(keys[:3])})")
        lines.append(f"  kept as initialised: {', '.join(self.untouched) or 'nothing'}")
        return "\n".join(lines)


def _label(source: Any) -> str:
    if isinstance(source, str | os.PathLike):
        return Path(source).name
    if isinstance(source, Mapping):
        return "state dict"
    return f"{len(source)} bytes"


def load_parts(
    model: nn.Module, sources: Mapping[str, Source | tuple[Source, str]], *, check_finite: bool = True
) -> LoadReport:
    """Load only the named parts, each from its own source: ``{"backbone": run_a, "history.lstm": run_b}``.

    A source is a path, bytes or a state dict, optionally with the key prefix to read from it:
    ``{"backbones.0.net": ("imagenet.safetensors", "")}`` takes a plain timm file. Without a prefix the same
    prefix as the part is read. Strict: every tensor of a named part must be found with the same shape (a
    missing ``num_batches_tracked`` counter is tolerated), parts may not overlap, and nothing is copied unless
    everything fits. Source files must be safetensors; their model config is not checked (different lines
    are the point of transfer learning).
    """
    target = unwrap(model)
    own = target.state_dict()
    cache: dict[int, LoadedWeights] = {}
    plan: list[tuple[str, str, str, dict[str, Tensor], list[str]]] = []
    used: dict[str, set[str]] = {}
    prefixes: list[str] = []
    problems: list[str] = []
    for part, spec in sources.items():
        src, src_prefix = spec if isinstance(spec, tuple) else (spec, None)
        prefix = resolve_part(target, part)
        for other in prefixes:
            if prefix == other or prefix.startswith(other + ".") or other.startswith(prefix + "."):
                raise ValueError(f"parts {other!r} and {prefix!r} overlap; name each tensor once")
        prefixes.append(prefix)
        src_prefix = prefix if src_prefix is None else src_prefix
        label = _label(src)
        if id(src) not in cache:
            cache[id(src)] = read_weights(src, check_finite=check_finite)
        state = cache[id(src)].state_dict
        keys = [k for k in own if k.startswith(prefix + ".")]
        mapping: dict[str, Tensor] = {}
        for k in keys:
            sk = (src_prefix + "." if src_prefix else "") + k[len(prefix) + 1 :]
            if sk not in state:
                if not k.endswith("num_batches_tracked"):
                    problems.append(f"{part}: {sk} missing in {label}")
                continue
            if state[sk].shape != own[k].shape:
                problems.append(
                    f"{part}: {sk} is {tuple(state[sk].shape)} in {label}, the model has {tuple(own[k].shape)}"
                )
                continue
            mapping[k] = state[sk]
            used.setdefault(label, set()).add(sk)
        readable = [k for k in state if not src_prefix or k.startswith(src_prefix + ".")]
        plan.append((prefix, label, src_prefix, mapping, readable))
    if problems:
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise WeightsError("part_mismatch", "; ".join(problems[:8]) + more)

    report = LoadReport()
    with torch.no_grad():
        for prefix, label, src_prefix, mapping, _ in plan:
            for k, v in mapping.items():
                own[k].copy_(v.to(own[k].dtype))
            report.loaded.append(
                PartLoad(prefix, label, src_prefix, len(mapping), sum(v.numel() for v in mapping.values()))
            )
    for _, label, _, _, candidates in plan:
        rest = sorted(set(candidates) - used.get(label, set()))
        if rest:
            report.unused.setdefault(label, [])
            report.unused[label] = sorted(set(report.unused[label]) | set(rest))
    tops = [name for name, m in target.named_children() if any(True for _ in m.parameters())]
    report.untouched = [t for t in tops if not any(p == t or p.startswith(t + ".") for p in prefixes)]
    # a top-level part partly loaded is reported by its loaded children; list the rest of it too
    for t in tops:
        if t not in report.untouched and t not in prefixes:
            for child, m in getattr(target, t).named_children():
                full = f"{t}.{child}"
                if any(True for _ in m.parameters()) and not any(
                    p == full or p.startswith(full + ".") or full.startswith(p + ".") for p in prefixes
                ):
                    report.untouched.append(full)
    return report
