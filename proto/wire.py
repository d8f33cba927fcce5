"""The wire contract as typed structs: one msgspec ``Struct`` per message body, and the envelope around it.

Every range and literal of the contract lives here, once, as a ``Meta`` constraint (the bounds that are
registry policy come from registry.yaml ``limits``). msgspec's msgpack decoder checks them while it
parses, in C, so a receiver never walks a header by hand; ``charles.proto.schema`` turns the same
structs into the JSON Schema in proto/schema.json for clients in other languages.

A field whose errors mean something more specific than the generic reasons carries it in
``Meta(extra={"reject": ..., "missing": ...})``: ``reject`` names the reason for a wrong value anywhere
under the field, ``missing`` the reason when the field is absent. ``codec.py`` reads these when it maps
a ``msgspec.ValidationError`` to one of the contract's reasons.

The structs are not tracked by the garbage collector (``gc=False``): a decoded header is a tree, it
cannot hold a cycle, and a receiver makes several per message. Optional fields that are absent decode
to ``UNSET``; the ones that also accept nil (``None``) say so in their type, because the decoder before
these structs took nil for them as absent.
"""

from __future__ import annotations

import functools
import math
import re
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import UNSET, Meta, Struct, UnsetType
from msgspec import inspect as mi

from charles.proto.registry import CONTROL_KINDS, KINDS, registry

_REG = registry()
LIMITS = _REG.limits
SCHEMA_VERSION = _REG.schema_version
ALL_KINDS = KINDS + CONTROL_KINDS[:2]  # snapshot_request/_end are control verbs without a header

_MAXF = sys.float_info.max
_PI = math.pi + 1e-6  # an angle of exactly pi, rounded on the way, must pass


def _num(lo: float = -_MAXF, hi: float = _MAXF, about: str | None = None) -> Any:
    """A finite float in [lo, hi]: NaN fails every comparison and infinity the finite bound."""
    return Annotated[float, Meta(ge=lo, le=hi, description=about)]


def _reasons(reject: str | None = None, missing: str | None = None) -> dict:
    return {k: v for k, v in (("reject", reject), ("missing", missing)) if v}


CODECS = ("raw", "jpeg", "png")
"""Frame codecs, chosen by the sender."""

Unit = _num(-1.0, 1.0)
Count = Annotated[int, Meta(ge=0, le=2**63 - 1)]
Name = Annotated[str, Meta(max_length=256)]
Short = Annotated[str, Meta(max_length=32)]
Names = Annotated[list[str], Meta(max_length=16)]
AnyMap = dict[Any, Any]
Purpose = tuple[_num(-_PI, _PI, "rad, positive left"), _num(0.0, 1e7, "m")]
Controls = tuple[Unit, Unit]
BlobIndex = Annotated[int, Meta(ge=0, le=2**31, extra=_reasons("bad_blob", "bad_blob"))]
Side = Annotated[int, Meta(ge=1, le=LIMITS.max_side)]
T = TypeVar("T")
Stack = Annotated[list[T], Meta(max_length=LIMITS.max_stack)]
"""A sample's past frames (of FrameRef on the way out, of Frame on the way in)."""
SetOf = Annotated[list[T], Meta(max_length=LIMITS.max_set)]
"""A set's samples."""


FrameCodec = Annotated[Literal[CODECS], Meta(extra=_reasons("bad_codec", "bad_codec"))]
FrameShape = Annotated[
    tuple[Side, Side, Literal[1, 3]],
    Meta(description="height, width, channels", extra=_reasons("bad_shape", "bad_shape")),
]
FrameDtype = Annotated[Literal["uint8"], Meta(extra=_reasons("bad_field"))]


class FrameHeader(Struct, gc=False, kw_only=True):
    """What a frame is, without where its bytes are (trainer storage keeps this part too)."""

    codec: FrameCodec
    shape: FrameShape
    dtype: FrameDtype = "uint8"


class FrameRef(Struct, gc=False):
    """A frame in a body: its bytes are blob number ``blob`` (0 = the message's third ZeroMQ frame)."""

    # ``data`` in Python, ``blob`` on the wire: charles.proto.Frame is this struct with its methods, so a
    # sample's frames decode straight into Frames and the codec swaps each index for the bytes it names.
    codec: FrameCodec
    shape: FrameShape
    data: BlobIndex = msgspec.field(name="blob")
    dtype: FrameDtype = "uint8"


class HistoryRef(Struct, gc=False, kw_only=True):
    """float32 [T, 5] of steering, throttle_brake, speed, purpose_angle, purpose_distance, oldest first."""

    shape: Annotated[
        tuple[Annotated[int, Meta(ge=0, le=LIMITS.max_history)], Literal[5]],
        Meta(extra=_reasons("bad_shape")),
    ]
    dtype: Annotated[Literal["float32"], Meta(extra=_reasons("bad_field", "bad_field"))]
    blob: BlobIndex


class SampleBody(Struct, gc=False, omit_defaults=True):
    # charles.proto.Sample is this struct with Frames for FrameRefs, decoded in one call; the codec then
    # swaps each frame's blob index for its bytes and the HistoryRef for the array. Positional, in the
    # order Sample's callers use.

    collector: Name
    seq: Count
    game_time: _num(0.0, about="s since the collector started")
    frame: FrameRef
    steering: Unit
    throttle_brake: Unit
    speed: _num(0.0, 200.0, "m/s")
    purpose: Purpose
    history: HistoryRef | None = None
    stack: Stack[FrameRef] | None = None
    previous: Controls | None = None
    source: Short = "npc"


class SampleSetBody(Struct, gc=False, omit_defaults=True):
    outputs: Names
    version: Annotated[int, Meta(ge=1, le=4)]
    samples: SetOf[SampleBody]
    labels_kept: Names = []
    seq: Count | UnsetType = UNSET


class WeightsBody(Struct, gc=False, kw_only=True):
    model: Name
    run: Name
    batch: Count
    config: AnyMap
    created: _num(0.0, about="Unix time")
    sha256: Annotated[str, Meta(max_length=64, description="hex digest of the payload blob")]
    payload: Annotated[int, Meta(ge=0, le=2**31, extra=_reasons("bad_blob"))]
    since: _num(0.0, about="Unix time this stream of the version started (0: not said)") = 0.0


class ConfigReplyBody(Struct, gc=False, kw_only=True):
    config: AnyMap
    error: Annotated[str, Meta(max_length=4096)] = ""


class ConfigRequestBody(Struct, gc=False, kw_only=True):
    role: Annotated[str, Meta(max_length=64)]


class GameFrameBody(Struct, gc=False, kw_only=True, omit_defaults=True):
    source: Name
    seq: Count
    game_time: _num(0.0)
    frame: FrameRef
    speed: _num(0.0, 200.0)
    position: tuple[_num(-1e7, 1e7), _num(-1e7, 1e7), _num(-1e7, 1e7)] | None = None
    heading: _num(-1e3, 1e3, "rad, counter-clockwise from +x") | UnsetType = UNSET
    purpose: Purpose | UnsetType = UNSET
    controls: Controls | UnsetType = UNSET
    recovering: bool | UnsetType = UNSET
    tick: Count | UnsetType = UNSET
    cinematic: FrameRef | UnsetType = UNSET
    expert: Controls | UnsetType = UNSET


class ActionBody(Struct, gc=False, kw_only=True, omit_defaults=True):
    seq: Count
    steering: Unit
    throttle: _num(0.0, 1.0)
    brake: _num(0.0, 1.0)
    target: Name = ""
    frame_seq: Count | UnsetType = UNSET


class ConsoleBody(Struct, gc=False, kw_only=True, omit_defaults=True):
    service: Name
    state: AnyMap
    images: Annotated[dict[str, FrameRef], Meta(max_length=LIMITS.max_images)] | None = None


class CameraBody(Struct, gc=False, kw_only=True):
    seq: Count
    captured: _num(0.0, about="Unix time the picture was taken, s")
    images: Annotated[dict[Name, FrameRef], Meta(max_length=LIMITS.max_images)]
    tick: Count | UnsetType = UNSET


Km = _num(0.0, 1e7, "km")
MAX_SCORE_POINTS = 1024
"""Points of a score's curve in one message (the judge keeps ``judge.history`` of them, thinned)."""


class ScoreFigures(Struct, gc=False, kw_only=True):
    """How one driver drove on the judge's towns, pooled over them (charles.evaluate.pool)."""

    km: Km
    km_between_unstucks: Km
    on_road_fraction: _num(0.0, 1.0)
    collisions_per_km: _num(0.0, 1e9)
    mean_speed_kmh: _num(0.0, 1e4)
    unstucks: Count


ScorePoint = tuple[
    Count,
    _num(0.0, about="Unix time judged"),
    Km,
    _num(0.0, 1.0),
]
"""One point of a version's curve: batch, when it was judged, km between Unstucks, on-road fraction."""


class ScoreBody(Struct, gc=False, kw_only=True, omit_defaults=True):
    model: Name
    run: Name
    version: Name = ""
    batch: Count
    created: _num(0.0, about="Unix time the weights were taken")
    seeds: Annotated[list[Annotated[int, Meta(ge=0, le=2**31)]], Meta(max_length=64)]
    minutes: _num(0.0, 1e4, "game minutes driven per seed")
    figures: ScoreFigures
    reference: ScoreFigures | None = None
    wall_s: _num(0.0, about="s the judging took")
    curve: Annotated[list[ScorePoint], Meta(max_length=MAX_SCORE_POINTS)] = []


class HeartbeatBody(Struct, gc=False, kw_only=True, omit_defaults=True):
    service: Name
    instance: Name
    state: Annotated[str, Meta(max_length=32, description="ok, starting, waiting, degraded, stopping")]
    uptime: _num(0.0)
    info: AnyMap | UnsetType = UNSET


BODIES: dict[str, type[Struct]] = {
    "sample": SampleBody,
    "sample_set": SampleSetBody,
    "weights": WeightsBody,
    "config": ConfigReplyBody,
    "game_frame": GameFrameBody,
    "action": ActionBody,
    "console": ConsoleBody,
    "camera": CameraBody,
    "score": ScoreBody,
    "heartbeat": HeartbeatBody,
    "config_request": ConfigRequestBody,
    "config_reply": ConfigReplyBody,
}

Version = Annotated[
    Literal[SCHEMA_VERSION],
    Meta(extra_json_schema={"type": "integer"}, extra=_reasons("bad_version", "bad_version")),
]
KindName = Annotated[Literal[ALL_KINDS], Meta(extra=_reasons("unknown_kind", "unknown_kind"))]


def envelope_fields(kind: str, body: type[Struct] | None = None, body_attr: str = "body") -> list[tuple]:
    """The fields of a header of one kind, ``{v, kind, sender, t, wall, body}``, as ``msgspec.defstruct``
    takes them; ``body`` replaces the kind's body struct by one with the same wire fields, ``body_attr``
    names the body's attribute (the receive side's ``Envelope.msg``: it is ``body`` on the wire alike)."""
    return [
        ("v", Version),
        ("kind", Literal[kind]),
        ("sender", Name),
        ("t", Annotated[float, Meta(ge=-_MAXF, le=_MAXF, description="sender's monotonic clock, s")]),
        ("wall", Annotated[float, Meta(ge=-_MAXF, le=_MAXF, description="sender's Unix time, s")]),
        (body_attr, body or BODIES[kind], msgspec.field(name="body")),
    ]


def envelope(kind: str, body: type[Struct] | None = None) -> type[Struct]:
    """The header of one kind as senders encode it (``envelope_fields``)."""
    return msgspec.defstruct(
        f"{''.join(p.title() for p in kind.split('_'))}Message",
        envelope_fields(kind, body),
        module=__name__,
        gc=False,
    )


ENVELOPES: dict[str, type[Struct]] = {kind: envelope(kind) for kind in BODIES}
"""Kind -> the struct of a whole header of that kind, as senders encode it and schema.json states it (a
receiver decodes each kind with ``envelope_fields`` into charles.proto's Envelope: the same wire fields)."""


# ---------------------------------------------------------------------------------------------- reasons

_AT = re.compile(r"^(?P<text>.*?)(?: - at `(?P<at>[^`]*)`(?: in `(?P<inside>[^`]*)`)?)?$", re.S)
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+|\.\.\.)\]")
_BOUND = re.compile(r"^Expected `(float|int)` [<>]=")


def reason_of(text: str, top: type, value_at: Callable[[list[str]], Any], root: str = "bad_header") -> str:
    """Map a msgspec error ("Expected `float` <= 1.0 - at `$.body.steering`") to one of REASONS.

    A field's own reasons (``Meta(extra=...)`` in charles.proto.wire) win; otherwise: absent ->
    missing_field, a number past its bound -> nan when it is not finite, else out_of_range, a string too
    long -> out_of_range, anything else (wrong type, unknown literal, a list too long) -> bad_field.
    ``value_at`` fetches the raw value at a path (None if it cannot); ``root`` names an error at ``$``.
    """
    m = _AT.match(text)
    msg, at, inside = m["text"], m["at"], m["inside"]
    path = [a or b for a, b in _STEP.findall(inside or at or "")]
    if msg.startswith("Object missing required field"):
        field = msg.split("`")[1]
        return _overrides(top, [*path, field], missing=True) or "missing_field"
    if inside is not None:  # a map's key: the names of images, say
        return _overrides(top, path, missing=False) or "bad_field"
    if at is None:
        return root  # the value itself is not a map
    own = _overrides(top, path, missing=False)
    if own:
        return own
    if _BOUND.match(msg):
        value = value_at(path)
        return "nan" if isinstance(value, float) and not math.isfinite(value) else "out_of_range"
    if msg.startswith("Expected `str` of length"):
        return "out_of_range"
    return "bad_field"


_type_info = functools.cache(mi.type_info)  # a few struct types, asked again on every reject


def _overrides(top: type, path: list[str], *, missing: bool) -> str | None:
    """The innermost reason a field along ``path`` names for itself (``missing``: the last field's)."""
    t: Any = _type_info(top)
    found = None
    for i, step in enumerate(path):
        t, _ = _unwrap(t)
        if isinstance(t, mi.StructType):
            field = next((f for f in t.fields if f.encode_name == step), None)
            if field is None:
                return found
            t, extra = _unwrap(field.type)
            last = i == len(path) - 1
            if missing and last:
                return extra.get("missing")
            found = extra.get("reject", found)
        elif isinstance(t, mi.ListType | mi.VarTupleType | mi.DictType):
            t = t.value_type if isinstance(t, mi.DictType) else t.item_type
        elif isinstance(t, mi.TupleType) and step.isdigit() and int(step) < len(t.item_types):
            t = t.item_types[int(step)]
        else:
            return found
    return found


def _unwrap(t: Any) -> tuple[Any, dict]:
    """A field's type without its constraints and without None/UNSET, and the reasons its Meta names."""
    extra: dict = {}
    while True:
        if isinstance(t, mi.Metadata):
            extra = {**extra, **(t.extra or {})}
            t = t.type
        elif isinstance(t, mi.UnionType):
            rest = [x for x in t.types if not isinstance(x, mi.NoneType)]
            if len(rest) != 1:
                return t, extra
            t = rest[0]
        else:
            return t, extra
