"""The balancer's configuration: which version, which outputs over which bins, and how much it may hold.

Every field carries a one-line ``help`` in its metadata so the CLI and the config docs can be generated
from this one place (cleanrl style). Bins default to the seed's sets from :mod:`charles.outputs`; a
delta output defaults to :data:`DELTA_BINS`, because ``charles.outputs.default_bins`` only knows value
bins and a per-frame *change* lives on a different scale.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any

from charles.outputs import SIGNALS, OutputKind, OutputSpec, default_bins, parse_bins

VERSIONS = (1, 2, 3, 4)
TIMEOUT_POLICIES = ("flush", "drop")

# Bins over the per-frame change of a control (discrete-delta outputs). At 30 Hz an NPC's stick moves a
# few hundredths per frame; "no change" is by far the most common value and gets an exact bin of its own,
# and the outer ranges reach +-2 because a control can swing from one end of [-1, 1] to the other.
DELTA_BINS: list[float | tuple[float, float]] = [
    (-2.0, -0.5),
    (-0.5, -0.2),
    (-0.2, -0.05),
    (-0.05, 0.0),
    0.0,
    (0.0, 0.05),
    (0.05, 0.2),
    (0.2, 0.5),
    (0.5, 2.0),
]


def _help(text: str, default: Any = MISSING, factory: Any = MISSING) -> Any:
    """A dataclass field with its one-line help, so every field documents itself the same way."""
    if factory is not MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


@dataclass
class BalancerConfig:
    """How the balancer bins the stream and when it lets a balanced set go."""

    version: int = _help(
        "Balancing version: 1 joint bins, 2 per output alone, 3 per output keeping all labels, 4 as 3 plus sub-balancing.",
        3,
    )
    outputs: tuple[str, ...] = _help(
        "Outputs to balance, by signal name: steering, throttle_brake, throttle, brake.",
        factory=lambda: ("steering", "throttle_brake"),
    )
    keep_labels: tuple[str, ...] = _help(
        "v3/v4: labels every set carries besides the balanced outputs' (outputs the model learns on the "
        "balanced images without balancing them, e.g. throttle_brake while only steering is balanced).",
        factory=tuple,
    )
    kinds: dict[str, str] = _help(
        "Per-output type (regression, classification, delta); unnamed outputs follow the model line's outputs, else regression.",
        factory=dict,
    )
    bins: dict[str, list] = _help(
        "Per-output bins as [exact, [lo, hi], ...]; unnamed outputs get the model line's classes, else the seed's bins for the version.",
        factory=dict,
    )
    cap_per_bin: int = _help(
        "Samples held per bin (per cell in v1); the oldest is evicted past it, bounding memory.", 32
    )
    set_timeout_s: float = _help(
        "Seconds a set may wait for its missing bins before the timeout policy applies.", 30.0
    )
    timeout_policy: str = _help(
        "What a timed-out set does: flush (emit what it has, one per filled bin) or drop (discard it).",
        "flush",
    )
    picture_s: float = _help(
        "Seconds between histogram pictures for the viewer (console.<instance>, /histogram.png); 0: none.",
        10.0,
    )

    def __post_init__(self) -> None:
        # Values arrive from YAML, environment variables and msgpack: normalise types before checking.
        self.version = int(self.version)
        if isinstance(self.outputs, str):
            self.outputs = tuple(s.strip() for s in self.outputs.split(",") if s.strip())
        self.outputs = tuple(self.outputs)
        if isinstance(self.keep_labels, str):
            self.keep_labels = tuple(s.strip() for s in self.keep_labels.split(",") if s.strip())
        self.keep_labels = tuple(self.keep_labels)
        self.kinds = {str(k): str(v) for k, v in dict(self.kinds).items()}
        self.bins = {str(k): list(v) for k, v in dict(self.bins).items()}
        self.cap_per_bin = int(self.cap_per_bin)
        self.set_timeout_s = float(self.set_timeout_s)
        self.picture_s = float(self.picture_s)
        self.validate()

    def validate(self) -> None:
        """Fail at start with a message that names the field, never later in the hot path."""
        if self.version not in VERSIONS:
            raise ValueError(f"version must be one of {VERSIONS}, got {self.version}")
        if not self.outputs:
            raise ValueError("outputs: name at least one output to balance")
        if len(set(self.outputs)) != len(self.outputs):
            raise ValueError(f"outputs: each output may appear once, got {list(self.outputs)}")
        for name in self.outputs:
            if name not in SIGNALS:
                raise ValueError(f"outputs: unknown output {name!r}; choose from {sorted(SIGNALS)}")
        for name in self.keep_labels:
            if name not in SIGNALS:
                raise ValueError(f"keep_labels: unknown label {name!r}; choose from {sorted(SIGNALS)}")
            if name in self.outputs:
                raise ValueError(f"keep_labels: {name!r} is balanced already (it is in outputs)")
        if self.keep_labels and self.version not in (3, 4):
            raise ValueError(
                "keep_labels needs version 3 or 4 (v1 keeps its joint outputs, v2 one label per set)"
            )
        for name, kind in self.kinds.items():
            if name not in self.outputs:
                raise ValueError(f"kinds: {name!r} is not one of the balanced outputs {list(self.outputs)}")
            OutputKind(kind)  # raises with the list of valid kinds
        for name in self.bins:
            if name not in self.outputs:
                raise ValueError(f"bins: {name!r} is not one of the balanced outputs {list(self.outputs)}")
        if self.cap_per_bin < 1:
            raise ValueError(f"cap_per_bin must be at least 1, got {self.cap_per_bin}")
        if not (math.isfinite(self.set_timeout_s) and self.set_timeout_s > 0):
            raise ValueError(f"set_timeout_s must be a positive number of seconds, got {self.set_timeout_s}")
        if not (math.isfinite(self.picture_s) and self.picture_s >= 0):
            raise ValueError(f"picture_s must be 0 (no pictures) or seconds, got {self.picture_s}")
        if self.timeout_policy not in TIMEOUT_POLICIES:
            raise ValueError(f"timeout_policy must be one of {TIMEOUT_POLICIES}, got {self.timeout_policy!r}")
        self.output_specs()  # bins parse and match their kinds

    def output_specs(self, model: Sequence[OutputSpec] = ()) -> list[OutputSpec]:
        """The balanced outputs as :class:`OutputSpec`: what the balancer bins by.

        ``model`` is the model line's outputs (``ModelConfig.outputs``). Where the line learns an output as
        classification or delta, its kind and bins are the balancer's too (the bins are its classes), so
        ``balancer.kinds``/``bins`` need not repeat them; given anyway they must agree, or this raises.
        Elsewhere the configured kind (regression by default) and bins (the version's) apply.
        """
        learned = {s.name: s for s in model}
        specs = []
        for name in self.outputs:
            line = learned.get(name)
            if line is not None and line.kind is not OutputKind.REGRESSION:
                specs.append(self._agreed(line))
                continue
            kind = OutputKind(self.kinds.get(name, OutputKind.REGRESSION.value))
            if name in self.bins:
                bins = parse_bins(self.bins[name])
            elif kind is OutputKind.DELTA:
                bins = parse_bins(DELTA_BINS)
            else:
                bins = default_bins(name, self.version)
            specs.append(OutputSpec(name, kind, tuple(bins)))
        return specs

    def _agreed(self, line: OutputSpec) -> OutputSpec:
        """The model line's classification/delta output, after checking what this config says of it."""
        name = line.name
        kind = self.kinds.get(name)
        if kind is not None and OutputKind(kind) is not line.kind:
            raise ValueError(
                f"kinds: {name} is balanced as {kind}, but the model line learns it as {line.kind.value} "
                f"(leave balancer.kinds.{name} unset: it follows model.outputs)"
            )
        if name in self.bins and tuple(parse_bins(self.bins[name])) != line.bins:
            raise ValueError(
                f"bins: {name}'s bins differ from the model line's {line.kind.value} bins "
                f"{[b.to_spec() for b in line.bins]} (they are its classes; leave balancer.bins.{name} unset)"
            )
        return line

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON/msgpack-able values (saved with checkpoints, served by the broker)."""
        d = asdict(self)
        d["outputs"] = list(self.outputs)
        d["keep_labels"] = list(self.keep_labels)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BalancerConfig:
        """Build from a mapping, refusing unknown keys so a typo in a config file is an error, not a no-op."""
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown balancer config keys {sorted(unknown)}; known: {sorted(known)}")
        return cls(**dict(d))

    @classmethod
    def from_specs(cls, specs: Sequence[OutputSpec], **kw: Any) -> BalancerConfig:
        """A config that balances exactly these outputs (e.g. the model's, so classes and bins agree)."""
        return cls(
            outputs=tuple(s.name for s in specs),
            kinds={s.name: s.kind.value for s in specs},
            bins={s.name: [b.to_spec() for b in s.bins] for s in specs},
            **kw,
        )


def help_lines() -> list[tuple[str, str, Any]]:
    """``(name, help, default)`` for each field: what a CLI or a docs generator prints."""
    out = []
    for f in fields(BalancerConfig):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        out.append((f.name, f.metadata["help"], default))
    return out
