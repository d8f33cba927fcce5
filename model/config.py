"""What a Charles model is: one frozen dataclass that the trainer, the player and the wire agree on.

A ``ModelConfig`` is plain data. It round-trips through a plain dict (JSON/msgpack friendly: only
str, int, float, bool, lists and dicts) so it can ride in a checkpoint's metadata and in the run
configuration that collectors and players acquire at start. It deliberately imports neither torch nor
timm: a collector needs to know the resolution, the frame stack and the history length of the model line
it feeds without paying for a deep-learning import.

Fields marked ``identity=False`` in their metadata change how a model is *initialised or trained*
(ImageNet start, transfer of parts, freezing, dropout, the Convcam layer) but not which weights it has or
what it predicts; two configs that differ only there describe the same weights (``same_weights``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from charles.outputs import OutputKind, OutputSpec, default_bins, default_outputs

HISTORY_FIELDS = ("steering", "throttle_brake", "speed", "purpose_angle", "purpose_distance")
"""Columns of a sample's history array, oldest row first (mirrors charles.proto.messages, without its import)."""

HISTORY_MODES = ("none", "mlp", "td_lstm", "lstm")
"""none; mlp: flattened through dense layers (seed 0001/0007); td_lstm: time-distributed dense layers then
an LSTM (seed 0008 v1); lstm: stacked LSTMs (seed 0008 v2+, 0009)."""

HISTORY_OUTPUTS = ("prediction", "thought")
"""What the recurrent part hands on: its last output h_T, or its final state (h_T, c_T) — the seed's
"thought vector", which is what finally let history and frames train together (0008 v7)."""

ACTIVATIONS = ("relu", "gelu", "silu", "elu")

SCALAR_INPUTS = ("speed", "purpose_angle", "purpose_distance", "previous_steering", "previous_throttle_brake")
"""Every per-sample number that may join the image features; ``ModelConfig.scalar_names`` picks from these."""


def _f(default: Any, help: str, *, identity: bool = True) -> Any:
    """A dataclass field with a one-line help text (the CLI shows it) and its identity flag."""
    if isinstance(default, list | dict | set):
        raise TypeError("mutable defaults are not allowed; use a tuple")
    return field(default=default, metadata={"help": help, "identity": identity})


@dataclass(frozen=True)
class ModelConfig:
    """One model line's architecture and inputs; presets in charles.model.presets fill it in."""

    name: str = _f(
        "custom", "Model line, e.g. model_0004_inceptionresnetv2 (a run adds _v3 and its own counter)."
    )
    backbone: str = _f(
        "inception_resnet_v2", "timm model name of the CNN backbone; empty for a history-only model."
    )
    backbone_per_output: bool = _f(
        False, "One backbone (with its own dense trunk) per output: the seed's 'tcb' lines."
    )
    pretrained: bool = _f(
        False, "Start the backbone from ImageNet weights (the run's model.pretrained_file).", identity=False
    )
    width: int = _f(480, "Input frame width in pixels; frames of another size are resized on the device.")
    height: int = _f(270, "Input frame height in pixels.")
    frames: int = _f(1, "Frames the backbone sees: the current one plus frames-1 past ones, channel-stacked.")
    frame_stride: int = _f(
        1, "Collector: take every n-th past frame for the stack (1 = consecutive 30 Hz frames)."
    )
    history: str = _f(
        "none", "History encoder: none, mlp, td_lstm (time-distributed dense + LSTM) or lstm (stacked)."
    )
    history_length: int = _f(60, "Rows of history (frames before the current one) the model reads.")
    history_fields: tuple[str, ...] = _f(
        HISTORY_FIELDS, "History columns the model reads, a subset of HISTORY_FIELDS."
    )
    history_widths: tuple[int, ...] = _f(
        (256,) * 5, "Dense widths of the mlp, or of the time-distributed layers of td_lstm."
    )
    history_lstm_units: int = _f(128, "Units of each LSTM layer (td_lstm and lstm).")
    history_lstm_layers: int = _f(1, "Stacked LSTM layers (the seed's lstm lines used 5).")
    history_output: str = _f(
        "prediction", "What the LSTM hands on: prediction (last output) or thought (final h and c)."
    )
    history_post: tuple[int, ...] = _f(
        (), "Dense widths after the history encoder, before joining the image features."
    )
    use_speed: bool = _f(False, "Feed the current speed next to the image features.")
    use_purpose: bool = _f(
        False, "Feed the current purpose (angle, distance to the target) next to the image features."
    )
    use_previous: bool = _f(
        False, "Feed the previous action (steering, throttle_brake); delta outputs need it (seed 0001 v5)."
    )
    speed_scale: float = _f(30.0, "Speed in m/s that maps to 1.0 at the model's input.")
    distance_scale: float = _f(
        100.0, "Purpose distance in m where log1p scaling bends: input = log1p(d / scale)."
    )
    common_widths: tuple[int, ...] = _f(
        (1024,), "Dense widths of the common part after the features are joined."
    )
    head_layers: int = _f(3, "Dense layers per output head before its output layer.")
    head_divisor: int = _f(4, "Each head layer is this many times narrower than the one before it.")
    activation: str = _f("relu", "Activation of every dense layer: relu, gelu, silu or elu.")
    dropout: float = _f(
        0.0, "Dropout on the joined features and in the common part while training.", identity=False
    )
    outputs: tuple[OutputSpec, ...] = _f(
        tuple(default_outputs(3)), "What the model predicts: name, kind and bins per output."
    )
    freeze: tuple[str, ...] = _f(
        (), "Parameter prefixes kept frozen while training (seed 0009 v3-v5 froze the CNN).", identity=False
    )
    transfer: tuple[str, ...] = _f(
        (),
        "Parts this line starts from other runs' weights; the run names a file per part (model.transfer).",
        identity=False,
    )
    convcam_layer: str = _f(
        "", "Backbone layer the Convcam shows; empty = the last conv feature map.", identity=False
    )

    def __post_init__(self) -> None:
        # Normalise containers so a config built from lists (msgpack, YAML, kwargs) equals one built from tuples.
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "outputs":
                v = tuple(o if isinstance(o, OutputSpec) else OutputSpec.from_dict(o) for o in v)
            elif isinstance(f.default, tuple):
                if isinstance(v, str) or not isinstance(v, Sequence):
                    raise ValueError(f"{f.name} must be a list, got {v!r}")
                item = int if f.name.endswith(("widths", "post")) else str
                if not all(isinstance(x, item) and not isinstance(x, bool) for x in v):
                    raise ValueError(f"{f.name} must be a list of {item.__name__}, got {v!r}")
                v = tuple(v)
            elif isinstance(f.default, bool):
                if not isinstance(v, bool):
                    raise ValueError(f"{f.name} must be true or false, got {v!r}")
            elif isinstance(f.default, int):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError(f"{f.name} must be an integer, got {v!r}")
            elif isinstance(f.default, float):
                if isinstance(v, bool) or not isinstance(v, int | float):
                    raise ValueError(f"{f.name} must be a number, got {v!r}")
                v = float(v)
            elif isinstance(f.default, str) and not isinstance(v, str):
                raise ValueError(f"{f.name} must be a string, got {v!r}")
            object.__setattr__(self, f.name, v)
        self._validate()

    def _validate(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"model config {self.name!r}: {msg}")

        need(self.history in HISTORY_MODES, f"history must be one of {HISTORY_MODES}, got {self.history!r}")
        need(self.history_output in HISTORY_OUTPUTS, f"history_output must be one of {HISTORY_OUTPUTS}")
        need(self.activation in ACTIVATIONS, f"activation must be one of {ACTIVATIONS}")
        need(self.width >= 8 and self.height >= 8, "width and height must be at least 8 pixels")
        need(self.frames >= 1 and self.frame_stride >= 1, "frames and frame_stride must be at least 1")
        need(self.history_length >= 1, "history_length must be at least 1")
        need(
            len(set(self.history_fields)) == len(self.history_fields)
            and set(self.history_fields) <= set(HISTORY_FIELDS),
            f"history_fields must be distinct names from {HISTORY_FIELDS}",
        )
        need(
            self.history == "none" or len(self.history_fields) > 0,
            "a history encoder needs at least one field",
        )
        need(
            self.history != "mlp" or len(self.history_widths) > 0,
            "the mlp history encoder needs history_widths",
        )
        need(
            self.history_lstm_units >= 1 and self.history_lstm_layers >= 1,
            "LSTM units and layers must be at least 1",
        )
        widths = (*self.history_widths, *self.history_post, *self.common_widths)
        need(all(w >= 1 for w in widths), "every dense width must be at least 1")
        need(self.head_layers >= 0 and self.head_divisor >= 1, "head_layers >= 0 and head_divisor >= 1")
        need(0.0 <= self.dropout < 1.0, "dropout must be in [0, 1)")
        need(
            self.speed_scale > 0 and self.distance_scale > 0,
            "speed_scale and distance_scale must be positive",
        )
        need(math.isfinite(self.speed_scale) and math.isfinite(self.distance_scale), "scales must be finite")
        need(len(self.outputs) > 0, "a model needs at least one output")
        names = [o.name for o in self.outputs]
        need(len(set(names)) == len(names), f"output names must be distinct, got {names}")
        need(
            bool(self.backbone) or self.history != "none" or bool(self.scalar_names),
            "a model without a backbone needs history or scalar inputs",
        )
        need(bool(self.backbone) or not self.backbone_per_output, "backbone_per_output needs a backbone")
        need(bool(self.backbone) or self.frames == 1, "frames > 1 needs a backbone")

    # -- derived ---------------------------------------------------------------------------------------

    @property
    def scalar_names(self) -> tuple[str, ...]:
        """The per-sample numbers joined to the image features, in the order prepare_batch packs them."""
        names: list[str] = []
        if self.use_speed:
            names.append("speed")
        if self.use_purpose:
            names += ["purpose_angle", "purpose_distance"]
        if self.use_previous:
            names += ["previous_steering", "previous_throttle_brake"]
        return tuple(names)

    @property
    def in_chans(self) -> int:
        return 3 * self.frames

    @property
    def history_rows(self) -> int:
        """Rows of history the model reads: ``history_length``, or 0 for a line without history."""
        return self.history_length if self.history != "none" else 0

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs)

    def output(self, name: str) -> OutputSpec:
        for o in self.outputs:
            if o.name == name:
                return o
        raise KeyError(f"model {self.name!r} has no output {name!r}; it has {list(self.output_names)}")

    # -- plain data ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack data (lists, not tuples); ``from_dict(to_dict())`` compares equal."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name == "outputs":
                v = [o.to_dict() for o in v]
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModelConfig:
        """The inverse of to_dict; unknown keys are an error (a typo must not silently fall back to a default)."""
        if not isinstance(d, Mapping):
            raise ValueError(f"a model config is a mapping, got {type(d).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown model config keys {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**dict(d))
        except (TypeError, KeyError) as e:  # malformed outputs and the like
            raise ValueError(f"malformed model config: {e}") from e

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"model config is not valid JSON: {e}") from e
        return cls.from_dict(d)

    def replace(self, **changes: Any) -> ModelConfig:
        """A copy with some fields changed (validated like any other config)."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise ValueError(f"unknown model config fields {unknown}")
        return dataclasses.replace(self, **changes)

    # -- identity --------------------------------------------------------------------------------------

    def identity(self) -> dict[str, Any]:
        """The fields that decide which weights a model has and what it predicts from them."""
        d = self.to_dict()
        return {f.name: d[f.name] for f in dataclasses.fields(self) if f.metadata.get("identity", True)}

    def same_weights(self, other: ModelConfig) -> bool:
        return self.identity() == other.identity()

    def differences(self, other: ModelConfig) -> dict[str, tuple[Any, Any]]:
        """Identity fields that differ: name -> (self's value, other's value)."""
        a, b = self.identity(), other.identity()
        return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


def field_help() -> dict[str, str]:
    """Field name -> one-line help, for CLIs and docs."""
    return {f.name: f.metadata["help"] for f in dataclasses.fields(ModelConfig)}


def regression_outputs(names: Sequence[str], version: int) -> tuple[OutputSpec, ...]:
    """Regression outputs over the given balancing version's bins (the seed's 3-output lines use this)."""
    return tuple(OutputSpec(n, OutputKind.REGRESSION, tuple(default_bins(n, version))) for n in names)
