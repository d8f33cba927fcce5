"""ZeroMQ multipart framing: ``[topic, header, *blobs]``.

The header is a msgpack map ``{v, kind, sender, t, wall, body}``; large payloads (frames, history arrays,
weights) are blobs of their own, referenced from the body by index, so nobody copies a 400 KB frame to read
a header. The header's shape and every range in it are the structs of ``charles.proto.wire``: msgspec
decodes and validates a header in one call, typed by what the topic carries. ``decode`` raises only
``ProtocolError``, whose ``reason`` is one of ``REASONS``; the receive loops count rejects by that reason
(proto/README.md lists what each means).
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import numpy as np
import zmq
from msgspec import UNSET

from charles.proto import wire
from charles.proto.frames import Frame
from charles.proto.messages import (
    HISTORY_FIELDS,
    Action,
    Camera,
    ConfigReply,
    ConfigRequest,
    Console,
    GameFrame,
    Heartbeat,
    Sample,
    SampleSet,
    Score,
    Weights,
)
from charles.proto.registry import registry

SCHEMA_VERSION = wire.SCHEMA_VERSION
MAX_HEADER_BYTES = wire.LIMITS.max_header_bytes
_ZFrame = zmq.Frame

REASONS = (
    "truncated",  # fewer than two frames
    "oversize",  # message larger than its topic's max_bytes, or a huge header
    "unknown_topic",  # topic family not in the registry, not ASCII, or longer than max_topic_bytes
    "bad_header",  # header is not a msgpack map with the envelope fields
    "bad_version",  # schema version we do not speak (or not an integer)
    "unknown_kind",  # kind not known
    "kind_mismatch",  # kind differs from what the registry says the topic carries
    "missing_field",
    "bad_field",  # wrong type
    "nan",  # NaN or infinity where a number must be finite
    "out_of_range",  # a number outside its documented range
    "bad_blob",  # blob index missing or blob count wrong
    "bad_shape",  # a shape malformed, out of range, or not what an image's own header says
    "bad_codec",
    "size_mismatch",  # blob length disagrees with shape
    "bad_checksum",  # weights digest mismatch
    "undecodable_frame",  # a frame's bytes do not decode to pixels (counted where pixels are decoded)
)


class ProtocolError(ValueError):
    """A message that fails validation; ``reason`` is one of REASONS (a metric label)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


class Envelope(msgspec.Struct, gc=False):  # one per message received; it holds no cycle
    """A message received: ``decode`` returns the header msgspec decoded, a struct of this class per
    kind (the wire's ``body`` is ``msg``), with the topic and the message's size filled in."""

    topic: str
    kind: str
    sender: str
    t: float
    """Sender's time.monotonic() (comparable between processes on one host)."""
    wall: float
    msg: Any
    nbytes: int


# ---------------------------------------------------------------------------------------------- blobs


class _Blobs:
    """Outgoing blobs: append and get the index to put in the header."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list = []

    def add(self, data: Any) -> int:
        self.items.append(data)
        return len(self.items) - 1


def _blob(blobs: Sequence, index: int) -> memoryview:
    # the struct proved index is an int >= 0; only the message knows how many blobs it has
    if index >= len(blobs):
        raise ProtocolError("bad_blob", f"blob index {index} not among {len(blobs)} blobs")
    return blobs[index]


def _frame_out(f: Frame, blobs: _Blobs) -> wire.FrameRef:
    return wire.FrameRef(f.codec, f.shape, blobs.add(f.data))


def _frame_in(f: wire.FrameRef, blobs: Sequence) -> Frame:
    """The Frame a FrameRef names (GameFrame and Console bodies; a sample's frames are bound in place)."""
    return Frame(f.codec, f.shape, _frame_bytes(f, blobs))


def _frame_bytes(f: wire.FrameRef, blobs: Sequence) -> memoryview:
    """The blob a frame reference names, checked against its codec and shape."""
    data = _blob(blobs, f.data)
    n = len(data)
    shape = f.shape
    if f.codec == "raw" and n != shape[0] * shape[1] * shape[2]:
        raise ProtocolError(
            "size_mismatch", f"raw frame {shape} needs {shape[0] * shape[1] * shape[2]} bytes, got {n}"
        )
    if n == 0:
        raise ProtocolError("size_mismatch", "empty frame")
    return data


_NFIELDS = len(HISTORY_FIELDS)


def _history_in(h: wire.HistoryRef, blobs: Sequence) -> np.ndarray:
    rows = h.shape[0]
    raw = _blob(blobs, h.blob)
    if len(raw) != rows * _NFIELDS * 4:
        raise ProtocolError(
            "size_mismatch", f"history {list(h.shape)} needs {rows * _NFIELDS * 4} bytes, got {len(raw)}"
        )
    history = np.frombuffer(raw, dtype=np.float32).reshape(rows, _NFIELDS)
    # one reduction: a NaN or an infinity anywhere makes the (float64) sum non-finite
    if rows and not math.isfinite(float(history.sum(dtype=np.float64))):
        raise ProtocolError("nan", "history holds NaN or infinity")
    return history


# ---------------------------------------------------------------------------------------------- kinds


def _sample_out(s: Sample, blobs: _Blobs) -> wire.SampleBody:
    body = wire.SampleBody(
        collector=s.collector,
        seq=s.seq,
        game_time=s.game_time,
        frame=_frame_out(s.frame, blobs),
        steering=s.steering,
        throttle_brake=s.throttle_brake,
        speed=s.speed,
        purpose=s.purpose,
        previous=s.previous,
        source=s.source,
    )
    if s.history is not None:
        h = np.ascontiguousarray(s.history, dtype=np.float32)
        body.history = wire.HistoryRef(shape=h.shape, dtype="float32", blob=blobs.add(h.data))
    if s.stack:
        body.stack = [_frame_out(f, blobs) for f in s.stack]
    return body


def _sample_in(s: Sample, blobs: Sequence) -> Sample:
    """A decoded sample made whole in place: msgspec built it, Frames included, with blob indices where
    the bytes go; each index becomes its bytes, the history's reference its array (``decode`` does the
    same for a sample alone, the one frame inline)."""
    if s.history is not None or s.stack or s.stack is None:
        _sample_extras(s, blobs)
    s.frame.data = _frame_bytes(s.frame, blobs)
    return s


def _sample_extras(s: Sample, blobs: Sequence) -> None:
    """A sample's history and stack, which most samples do not carry: in place."""
    if s.history is not None:
        s.history = _history_in(s.history, blobs)
    if s.stack:
        for f in s.stack:
            f.data = _frame_bytes(f, blobs)
    elif s.stack is None:  # nil on the wire: no stack, as absent
        s.stack = []


class _SampleSetIn(wire.SampleSetBody, gc=False):
    """A set's header as a receiver decodes it: its samples straight into Samples."""

    samples: wire.SetOf[Sample]


def _sample_set_out(s: SampleSet, blobs: _Blobs) -> wire.SampleSetBody:
    return wire.SampleSetBody(
        outputs=list(s.outputs),
        version=s.version,
        labels_kept=list(s.labels_kept),
        samples=[_sample_out(x, blobs) for x in s.samples],
        seq=UNSET if s.seq is None else s.seq,
    )


def _sample_set_in(b: _SampleSetIn, blobs: Sequence) -> SampleSet:
    return SampleSet(
        outputs=b.outputs,
        version=b.version,
        samples=[_sample_in(x, blobs) for x in b.samples],
        labels_kept=b.labels_kept,
        seq=None if b.seq is UNSET else b.seq,
    )


def _weights_out(w: Weights, blobs: _Blobs) -> wire.WeightsBody:
    return wire.WeightsBody(
        model=w.model,
        run=w.run,
        batch=w.batch,
        config=w.config,
        created=w.created,
        sha256=w.sha256 or hashlib.sha256(w.payload).hexdigest(),
        payload=blobs.add(w.payload),
        since=w.since,
    )


def _weights_in(b: wire.WeightsBody, blobs: Sequence) -> Weights:
    payload = _blob(blobs, b.payload)
    if hashlib.sha256(payload).hexdigest() != b.sha256:
        raise ProtocolError("bad_checksum", "weights payload does not match its sha256")
    return Weights(b.model, b.run, b.batch, b.config, payload, b.created, b.sha256, b.since)


def _opt(v: Any) -> Any:
    return UNSET if v is None else v


def _game_frame_out(g: GameFrame, blobs: _Blobs) -> wire.GameFrameBody:
    return wire.GameFrameBody(
        source=g.source,
        seq=g.seq,
        game_time=g.game_time,
        frame=_frame_out(g.frame, blobs),
        speed=g.speed,
        position=g.position,
        heading=_opt(g.heading),
        purpose=_opt(g.purpose),
        controls=_opt(g.controls),
        recovering=_opt(g.recovering),
        tick=_opt(g.tick),
        cinematic=UNSET if g.cinematic is None else _frame_out(g.cinematic, blobs),
        expert=_opt(g.expert),
    )


def _none(v: Any) -> Any:
    return None if v is UNSET else v


def _game_frame_in(b: wire.GameFrameBody, blobs: Sequence) -> GameFrame:
    return GameFrame(
        b.source,
        b.seq,
        b.game_time,
        _frame_in(b.frame, blobs),
        b.speed,
        b.position,
        _none(b.heading),
        _none(b.purpose),
        _none(b.controls),
        _none(b.recovering),
        _none(b.tick),
        None if b.cinematic is UNSET else _frame_in(b.cinematic, blobs),
        _none(b.expert),
    )


def _action_out(a: Action, blobs: _Blobs) -> wire.ActionBody:
    return wire.ActionBody(
        seq=a.seq,
        steering=a.steering,
        throttle=a.throttle,
        brake=a.brake,
        target=a.target,
        frame_seq=_opt(a.frame_seq),
    )


def _action_in(b: wire.ActionBody, blobs: Sequence) -> Action:
    return Action(b.seq, b.steering, b.throttle, b.brake, b.target, _none(b.frame_seq))


def _console_out(c: Console, blobs: _Blobs) -> wire.ConsoleBody:
    images = {k: _frame_out(f, blobs) for k, f in c.images.items()}
    return wire.ConsoleBody(service=c.service, state=c.state, images=images or None)


def _console_in(b: wire.ConsoleBody, blobs: Sequence) -> Console:
    images = {k: _frame_in(v, blobs) for k, v in b.images.items()} if b.images else {}
    return Console(b.service, b.state, images)


def _camera_out(c: Camera, blobs: _Blobs) -> wire.CameraBody:
    images = {k: _frame_out(f, blobs) for k, f in c.images.items()}
    return wire.CameraBody(seq=c.seq, captured=c.captured, images=images, tick=_opt(c.tick))


def _camera_in(b: wire.CameraBody, blobs: Sequence) -> Camera:
    return Camera(b.seq, b.captured, {k: _frame_in(v, blobs) for k, v in b.images.items()}, _none(b.tick))


def _as_is(msg: Any, blobs: Any) -> Any:
    """A message that is its wire body (a Score): nothing to convert either way."""
    return msg


def _heartbeat_out(h: Heartbeat, blobs: _Blobs) -> wire.HeartbeatBody:
    return wire.HeartbeatBody(
        service=h.service, instance=h.instance, state=h.state, uptime=h.uptime, info=h.info
    )


def _heartbeat_in(b: wire.HeartbeatBody, blobs: Sequence) -> Heartbeat:
    return Heartbeat(b.service, b.instance, b.state, b.uptime, {} if b.info is UNSET else b.info)


def _config_request_out(c: ConfigRequest, blobs: _Blobs) -> wire.ConfigRequestBody:
    return wire.ConfigRequestBody(role=c.role)


def _config_request_in(b: wire.ConfigRequestBody, blobs: Sequence) -> ConfigRequest:
    return ConfigRequest(b.role)


def _config_reply_out(c: ConfigReply, blobs: _Blobs) -> wire.ConfigReplyBody:
    return wire.ConfigReplyBody(config=c.config, error=c.error)


def _config_reply_in(b: wire.ConfigReplyBody, blobs: Sequence) -> ConfigReply:
    return ConfigReply(b.config, b.error)


_CODECS: dict[str, tuple[type, Callable, Callable | None]] = {
    "sample": (Sample, _sample_out, None),  # decode makes a sample whole inline (a call costs what it does)
    "sample_set": (SampleSet, _sample_set_out, _sample_set_in),
    "weights": (Weights, _weights_out, _weights_in),
    "config": (ConfigReply, _config_reply_out, _config_reply_in),
    "game_frame": (GameFrame, _game_frame_out, _game_frame_in),
    "action": (Action, _action_out, _action_in),
    "console": (Console, _console_out, _console_in),
    "camera": (Camera, _camera_out, _camera_in),
    "score": (Score, _as_is, _as_is),
    "heartbeat": (Heartbeat, _heartbeat_out, _heartbeat_in),
    "config_request": (ConfigRequest, _config_request_out, _config_request_in),
    "config_reply": (ConfigReply, _config_reply_out, _config_reply_in),
}
_KIND_OF = {cls: kind for kind, (cls, _, _) in _CODECS.items() if kind != "config"}
_DECODE_AS = {"sample": Sample, "sample_set": _SampleSetIn, "score": Score}
"""Kinds whose bodies decode into other structs with the same wire fields than the ones they are sent as."""


def _received(kind: str) -> type[Envelope]:
    """What a receiver decodes a header of ``kind`` into: the Envelope itself, its fields the wire's
    (``body`` decodes into ``msg``), so a message costs no second object. ``topic`` and ``nbytes`` are not
    on the wire, ``decode`` fills them in; a header that carries keys of those names has them skipped
    unread (``Raw``) and overwritten, as any unknown key is skipped."""
    return msgspec.defstruct(
        f"{''.join(p.title() for p in kind.split('_'))}Received",
        [
            *wire.envelope_fields(kind, _DECODE_AS.get(kind), body_attr="msg"),
            ("topic", msgspec.Raw, ""),
            ("nbytes", msgspec.Raw, 0),
        ],
        bases=(Envelope,),
        kw_only=True,
        module=__name__,
        gc=False,
    )


_DECODERS = {kind: (msgspec.msgpack.Decoder(_received(kind)), _CODECS[kind][2]) for kind in wire.ENVELOPES}
"""Kind -> (the typed decoder of a whole header of that kind, its body -> message conversion)."""


def _enc_hook(obj: Any) -> Any:
    """numpy scalars (a loss, a speed from an array) go out as the Python numbers they hold; msgpack
    took np.float64 as a float, and senders rely on that."""
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"{type(obj).__name__} cannot go on the wire")


_ENCODER = msgspec.msgpack.Encoder(enc_hook=_enc_hook)


def kind_of(msg: Any) -> str:
    try:
        return _KIND_OF[type(msg)]
    except KeyError:
        raise TypeError(f"{type(msg).__name__} is not a Charles message") from None


# ---------------------------------------------------------------------------------------------- envelope


def encode(topic: str, msg: Any, sender: str, kind: str | None = None) -> list:
    """Frames for ``socket.send_multipart(frames, copy=False)``. Blobs are passed through, not copied."""
    kind = kind or kind_of(msg)
    if kind == "config_reply" and topic.startswith("config"):
        kind = "config"
    blobs = _Blobs()
    body = _CODECS[kind][1](msg, blobs)
    header = wire.ENVELOPES[kind](
        v=SCHEMA_VERSION, kind=kind, sender=sender, t=time.monotonic(), wall=time.time(), body=body
    )
    return [topic.encode("ascii"), _ENCODER.encode(header), *blobs.items]


def _buf(f: Any) -> memoryview:
    b = memoryview(f)
    # lengths below are byte counts: flatten multi-dimensional views (a numpy array's .data)
    return b if b.ndim == 1 and b.itemsize == 1 else b.cast("B")


_TOPIC_CACHE = 4096
_TOPICS: dict[bytes, tuple] = {}
"""Topic bytes of messages that decoded -> (name, its max_bytes, its kind, decoder, conversion); bounded
so a flood of made-up topics cannot grow it, and filled only by messages that passed, so a topic alone
never earns a place."""
_MAX_TOPIC = wire.LIMITS.max_topic_bytes


def decode(frames: Sequence, control: bool = False) -> Envelope:
    """Validate and decode one multipart message. Raises ProtocolError and nothing else.

    ``control`` decodes the broker's control-port messages, whose first frame is a verb, not a topic.
    One function on purpose: this is every receiver's per-message path, and a call costs what the
    checks of a whole field do (``control`` is not keyword-only for the same reason: a keyword-only
    default doubles the cost of calling a function).
    """
    try:
        n = len(frames)
        if n < 2:
            raise ProtocolError("truncated", f"{n} frame(s); a message is [topic, header, *blobs]")
        f0 = frames[0]
        topic_b = f0.bytes if type(f0) is _ZFrame else bytes(_buf(f0))
        # a control verb is not a topic (b"config" is both): never looked up in nor added to the cache
        known = None if control else _TOPICS.get(topic_b)
        topic, limit, kind, decoder, to_msg = known or _uncached(topic_b, control)
        # a received zmq.Frame goes to msgspec as it is (its buffer protocol)
        f1 = frames[1]
        header_b = f1 if type(f1) is _ZFrame else _buf(f1)
        hn = len(header_b)
        if n == 3:  # one blob, as samples and game frames come: no slice, no loop
            f = frames[2]
            b = memoryview(f) if type(f) is _ZFrame else _buf(f)
            blobs = [b]
            nbytes = len(topic_b) + hn + len(b)
        else:
            blobs = []
            nbytes = len(topic_b) + hn
            for f in frames[2:]:  # a plain loop: a comprehension is a call, ~0.3 us with none
                b = _buf(f)
                nbytes += len(b)
                blobs.append(b)
        if nbytes > limit or hn > MAX_HEADER_BYTES:
            raise ProtocolError("oversize", f"{nbytes} bytes on {topic[:64]!r}; the limit is {limit}")
        if decoder is None:  # a control request is the kind its header says
            kind = _control_kind(header_b)
            decoder, to_msg = _DECODERS[kind]
        try:
            env = decoder.decode(header_b)  # the Envelope itself, its msg the body as the wire has it
        except msgspec.DecodeError as e:  # ValidationError is one too
            raise _rejection(e, header_b, kind) from None
        if to_msg is None:  # a sample, the hot kind: _sample_in, its one frame inline
            s = env.msg
            if s.history is not None or s.stack or s.stack is None:
                _sample_extras(s, blobs)
            f = s.frame
            try:
                data = blobs[f.data]  # the struct proved the index >= 0
            except IndexError:
                raise ProtocolError("bad_blob", f"blob index {f.data} not among {len(blobs)} blobs") from None
            if not data or (f.codec == "raw" and len(data) != f.shape[0] * f.shape[1] * f.shape[2]):
                _frame_bytes(f, blobs)  # names the reason
            f.data = data
        else:
            env.msg = to_msg(env.msg, blobs)
        env.topic = topic
        env.nbytes = nbytes
        if known is None and not control and len(_TOPICS) < _TOPIC_CACHE:
            _TOPICS[topic_b] = (topic, limit, kind, decoder, to_msg)
        return env
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract: a hostile message never escapes as anything else
        raise ProtocolError("bad_field", f"{type(e).__name__}: {e}") from None


def _uncached(topic_b: bytes, control: bool) -> tuple:
    """A topic not seen in a message that decoded: (its name, its max_bytes, its kind, decoder,
    conversion) as the cache holds them, or unknown_topic. A control verb's kind is what its header says
    (None here), its limit a header's."""
    if len(topic_b) > _MAX_TOPIC:
        raise ProtocolError("unknown_topic", f"topic of {len(topic_b)} bytes; the limit is {_MAX_TOPIC}")
    try:
        topic = topic_b.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("unknown_topic", f"topic {topic_b[:40]!r} is not ASCII") from None
    if control:
        return topic, MAX_HEADER_BYTES, None, None, None
    entry = registry().topic(topic)
    if entry is None:
        raise ProtocolError("unknown_topic", f"topic {topic[:64]!r} is not in the registry")
    return topic, entry.max_bytes, entry.kind, *_DECODERS[entry.kind]


# ---------------------------------------------------------------------------------------------- rejects

_VERSION_ONLY = msgspec.msgpack.Decoder(msgspec.defstruct("VersionOnly", [("v", wire.Version)]))
_KIND_ONLY = msgspec.msgpack.Decoder(msgspec.defstruct("KindOnly", [("kind", wire.KindName)]))


def _control_kind(header_b: Any) -> str:
    """The kind a control request says it is (the verb does not say), refused in the envelope's order."""
    try:
        _VERSION_ONLY.decode(header_b)
        return _KIND_ONLY.decode(header_b).kind
    except msgspec.DecodeError as e:
        raise _rejection(e, header_b, None) from None


def _rejection(e: msgspec.DecodeError, header_b: Any, kind: str | None) -> ProtocolError:
    """The contract's reason for a header the typed decoder refused.

    The envelope is judged in a fixed order whatever order its keys came in (version, then kind, then
    whether the topic carries that kind), then the decoder's own error is named by ``wire.reason_of``.
    """
    if not isinstance(e, msgspec.ValidationError):
        return ProtocolError("bad_header", f"header is not msgpack ({e})")
    for only in (_VERSION_ONLY, _KIND_ONLY):
        try:
            got = only.decode(header_b)
        except msgspec.ValidationError as he:
            return ProtocolError(
                wire.reason_of(str(he), only.type, lambda p: _value_at(header_b, p)), _detail(he)
            )
    if kind is not None and got.kind != kind:
        return ProtocolError("kind_mismatch", f"the topic carries {kind}, the header says {got.kind}")
    top = _DECODERS[kind or got.kind][0].type
    return ProtocolError(wire.reason_of(str(e), top, lambda p: _value_at(header_b, p)), _detail(e))


def _detail(e: Exception) -> str:
    text = str(e)
    if "`$.v`" in text or "field `v`" in text:
        return f"{text}; this build speaks schema version {SCHEMA_VERSION} (upgrade sender and receiver together)"
    return text


def _value_at(header_b: Any, path: list[str]) -> Any:
    """The raw value a refused path points at (only to tell NaN from out-of-range), or None."""
    try:
        cur = msgspec.msgpack.decode(header_b)
        for step in path:
            cur = cur[int(step)] if isinstance(cur, list) else cur[step]
    except Exception:  # noqa: BLE001 - only a hint for the reason; the message is refused anyway
        return None
    return cur
