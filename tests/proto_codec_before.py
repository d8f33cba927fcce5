"""The decoder as it was before the wire structs (issue #23): its precise path, kept only as a test oracle.

tests/test_proto_codec.py holds the typed decoder to this one: on every message that breaks one thing,
both accept the same fields or refuse for the same reason (the differences on purpose are listed there).
Frozen: it is not the contract, and nothing but that test imports it. Its frame-header check is the old
``Frame.check_header``, copied in, so the oracle does not lean on the code it judges.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from typing import Any

import msgpack
import numpy as np
import zmq

from charles.proto import ProtocolError
from charles.proto.codec import Envelope
from charles.proto.frames import Frame
from charles.proto.messages import (
    HISTORY_FIELDS,
    Action,
    ConfigReply,
    ConfigRequest,
    Console,
    GameFrame,
    Heartbeat,
    Sample,
    SampleSet,
    Weights,
)
from charles.proto.registry import registry

SCHEMA_VERSION = registry().schema_version
_ZFrame = zmq.Frame
_unpackb = msgpack.unpackb
MAX_HEADER_BYTES = 4_000_000
MAX_HISTORY = 1024
MAX_STACK = 16
MAX_SET = 4096
MAX_SIDE = 4096
CODECS = ("raw", "jpeg", "png")


class FrameError(ValueError):
    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def _check_frame_header(h: object) -> tuple[str, tuple[int, int, int]]:
    if not isinstance(h, dict):
        raise FrameError("bad_field", "a frame header is a map with codec, shape and blob")
    codec, shape = h.get("codec"), h.get("shape")
    if h.get("dtype", "uint8") != "uint8":
        raise FrameError("bad_field", f"frame dtype must be uint8, got {h.get('dtype')!r}")
    if codec not in CODECS:
        raise FrameError("bad_codec", f"unknown frame codec {codec!r}; use one of {CODECS}")
    if (
        not isinstance(shape, list | tuple)
        or len(shape) != 3
        or not all(isinstance(v, int) and not isinstance(v, bool) for v in shape)
    ):
        raise FrameError("bad_shape", f"frame shape must be [height, width, channels], got {shape!r}")
    hgt, wid, ch = shape
    if not (0 < hgt <= MAX_SIDE and 0 < wid <= MAX_SIDE and ch in (1, 3)):
        raise FrameError("bad_shape", f"frame shape {shape} out of range")
    return codec, (hgt, wid, ch)


def decode(frames: Sequence, *, control: bool = False) -> Envelope:
    try:
        return _decode(frames, control)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - as the old decoder: nothing escapes but ProtocolError
        raise ProtocolError("bad_field", f"{type(e).__name__}: {e}") from None


def _buf(f: Any) -> memoryview:
    if f.__class__ is _ZFrame:
        return f.buffer
    b = memoryview(f)
    return b if b.ndim == 1 and b.itemsize == 1 else b.cast("B")


# ---------------------------------------------------------------------------------------------- checks


def _need(d: dict, key: str) -> Any:
    try:
        return d[key]
    except KeyError:
        raise ProtocolError("missing_field", f"field {key!r} is required") from None
    except TypeError:
        raise ProtocolError("bad_field", f"expected a map holding {key!r}, got {type(d).__name__}") from None


def _num(d: dict, key: str, lo: float = -math.inf, hi: float = math.inf) -> float:
    v = _need(d, key)
    if v.__class__ is not float and (v.__class__ is not int):
        raise ProtocolError("bad_field", f"{key} must be a number, got {type(v).__name__}")
    if not math.isfinite(v):
        raise ProtocolError("nan", f"{key} is {v}")
    if not lo <= v <= hi:
        raise ProtocolError("out_of_range", f"{key}={v} outside [{lo}, {hi}]")
    return float(v)


def _int(d: dict, key: str, lo: int = 0, hi: int = 2**63 - 1) -> int:
    v = _need(d, key)
    if v.__class__ is not int:
        raise ProtocolError("bad_field", f"{key} must be an integer, got {type(v).__name__}")
    if not lo <= v <= hi:
        raise ProtocolError("out_of_range", f"{key}={v} outside [{lo}, {hi}]")
    return v


def _str(d: dict, key: str, max_len: int = 256) -> str:
    v = _need(d, key)
    if v.__class__ is not str:
        raise ProtocolError("bad_field", f"{key} must be a string, got {type(v).__name__}")
    if len(v) > max_len:
        raise ProtocolError("out_of_range", f"{key} longer than {max_len} characters")
    return v


def _map(d: dict, key: str) -> dict:
    v = _need(d, key)
    if v.__class__ is not dict:
        raise ProtocolError("bad_field", f"{key} must be a map, got {type(v).__name__}")
    return v


def _pair(d: dict, key: str, lo: tuple[float, float], hi: tuple[float, float]) -> tuple[float, float]:
    v = _need(d, key)
    if v.__class__ is not list or len(v) != 2:
        raise ProtocolError("bad_field", f"{key} must be a pair of numbers")
    return (_num({key: v[0]}, key, lo[0], hi[0]), _num({key: v[1]}, key, lo[1], hi[1]))


def _blob(blobs: Sequence, index: Any) -> memoryview:
    if index.__class__ is not int or not 0 <= index < len(blobs):
        raise ProtocolError("bad_blob", f"blob index {index!r} not among {len(blobs)} blobs")
    return blobs[index]


# ---------------------------------------------------------------------------------------------- frames


def _frame_in(h: Any, blobs: Sequence) -> Frame:
    try:
        codec, shape = _check_frame_header(h)
    except FrameError as e:
        raise ProtocolError(e.reason, str(e)) from None
    data = _blob(blobs, h.get("blob"))
    if codec == "raw" and len(data) != shape[0] * shape[1] * shape[2]:
        raise ProtocolError(
            "size_mismatch",
            f"raw frame {shape} needs {shape[0] * shape[1] * shape[2]} bytes, got {len(data)}",
        )
    if len(data) == 0:
        raise ProtocolError("size_mismatch", "empty frame")
    return Frame(codec, shape, data)


# ---------------------------------------------------------------------------------------------- kinds

_PI = math.pi + 1e-6


def _sample_in(b: dict, blobs: Sequence) -> Sample:
    if b.__class__ is not dict:
        raise ProtocolError("bad_field", "sample body must be a map")
    history = None
    h = b.get("history")
    if h is not None:
        shape = _need(h, "shape")
        if (
            shape.__class__ is not list
            or len(shape) != 2
            or not all(v.__class__ is int for v in shape)
            or shape[1] != len(HISTORY_FIELDS)
            or not 0 <= shape[0] <= MAX_HISTORY
        ):
            raise ProtocolError(
                "bad_shape",
                f"history shape must be [T<= {MAX_HISTORY}, {len(HISTORY_FIELDS)}], got {shape!r}",
            )
        if h.get("dtype") != "float32":
            raise ProtocolError("bad_field", "history dtype must be float32")
        raw = _blob(blobs, h.get("blob"))
        if len(raw) != shape[0] * shape[1] * 4:
            raise ProtocolError(
                "size_mismatch", f"history {shape} needs {shape[0] * shape[1] * 4} bytes, got {len(raw)}"
            )
        history = np.frombuffer(raw, dtype=np.float32).reshape(shape)
        if not np.isfinite(history).all():
            raise ProtocolError("nan", "history holds NaN or infinity")
    stack = []
    st = b.get("stack")
    if st is not None:
        if st.__class__ is not list or len(st) > MAX_STACK:
            raise ProtocolError("bad_field", f"stack must be a list of at most {MAX_STACK} frames")
        stack = [_frame_in(f, blobs) for f in st]
    prev = b.get("previous")
    return Sample(
        collector=_str(b, "collector"),
        seq=_int(b, "seq"),
        game_time=_num(b, "game_time", 0.0),
        frame=_frame_in(_need(b, "frame"), blobs),
        steering=_num(b, "steering", -1.0, 1.0),
        throttle_brake=_num(b, "throttle_brake", -1.0, 1.0),
        speed=_num(b, "speed", 0.0, 200.0),
        purpose=_pair(b, "purpose", (-_PI, 0.0), (_PI, 1e7)),
        history=history,
        stack=stack,
        previous=None if prev is None else _pair(b, "previous", (-1.0, -1.0), (1.0, 1.0)),
        source=_str(b, "source", 32) if "source" in b else "npc",
    )


def _str_list(b: dict, key: str) -> list[str]:
    v = _need(b, key)
    if v.__class__ is not list or not all(x.__class__ is str for x in v) or len(v) > 16:
        raise ProtocolError("bad_field", f"{key} must be a list of names")
    return v


def _sample_set_in(b: dict, blobs: Sequence) -> SampleSet:
    samples = _need(b, "samples")
    if samples.__class__ is not list or len(samples) > MAX_SET:
        raise ProtocolError("bad_field", f"samples must be a list of at most {MAX_SET}")
    return SampleSet(
        outputs=_str_list(b, "outputs"),
        version=_int(b, "version", 1, 4),
        samples=[_sample_in(x, blobs) for x in samples],
        labels_kept=_str_list(b, "labels_kept") if "labels_kept" in b else [],
        seq=_int(b, "seq") if "seq" in b else None,
    )


def _weights_in(b: dict, blobs: Sequence) -> Weights:
    payload = _blob(blobs, _need(b, "payload"))
    digest = _str(b, "sha256", 64)
    if hashlib.sha256(payload).hexdigest() != digest:
        raise ProtocolError("bad_checksum", "weights payload does not match its sha256")
    return Weights(
        model=_str(b, "model"),
        run=_str(b, "run"),
        batch=_int(b, "batch"),
        config=_map(b, "config"),
        payload=payload,
        created=_num(b, "created", 0.0),
        sha256=digest,
        since=_num(b, "since", 0.0) if "since" in b else 0.0,  # added with the versions on the wire (#16)
    )


def _game_frame_in(b: dict, blobs: Sequence) -> GameFrame:
    pos = b.get("position")
    if pos is not None:
        if pos.__class__ is not list or len(pos) != 3:
            raise ProtocolError("bad_field", "position must be [x, y, z]")
        pos = tuple(_num({"position": v}, "position", -1e7, 1e7) for v in pos)
    recovering = b.get("recovering")
    if "recovering" in b and recovering.__class__ is not bool:
        raise ProtocolError("bad_field", "recovering must be true or false")
    return GameFrame(
        source=_str(b, "source"),
        seq=_int(b, "seq"),
        game_time=_num(b, "game_time", 0.0),
        frame=_frame_in(_need(b, "frame"), blobs),
        speed=_num(b, "speed", 0.0, 200.0),
        position=pos,
        heading=_num(b, "heading", -1e3, 1e3) if "heading" in b else None,
        purpose=_pair(b, "purpose", (-_PI, 0.0), (_PI, 1e7)) if "purpose" in b else None,
        controls=_pair(b, "controls", (-1.0, -1.0), (1.0, 1.0)) if "controls" in b else None,
        recovering=recovering,
    )


def _action_in(b: dict, blobs: Sequence) -> Action:
    return Action(
        seq=_int(b, "seq"),
        steering=_num(b, "steering", -1.0, 1.0),
        throttle=_num(b, "throttle", 0.0, 1.0),
        brake=_num(b, "brake", 0.0, 1.0),
        target=_str(b, "target") if "target" in b else "",
        frame_seq=_int(b, "frame_seq") if "frame_seq" in b else None,
    )


def _console_in(b: dict, blobs: Sequence) -> Console:
    images = b.get("images") or {}
    if images.__class__ is not dict or len(images) > 16:
        raise ProtocolError("bad_field", "images must be a map of at most 16 frames")
    return Console(
        service=_str(b, "service"),
        state=_map(b, "state"),
        images={str(k): _frame_in(v, blobs) for k, v in images.items()},
    )


def _heartbeat_in(b: dict, blobs: Sequence) -> Heartbeat:
    return Heartbeat(
        service=_str(b, "service"),
        instance=_str(b, "instance"),
        state=_str(b, "state", 32),
        uptime=_num(b, "uptime", 0.0),
        info=_map(b, "info") if "info" in b else {},
    )


def _config_request_in(b: dict, blobs: Sequence) -> ConfigRequest:
    return ConfigRequest(role=_str(b, "role", 64))


def _config_reply_in(b: dict, blobs: Sequence) -> ConfigReply:
    return ConfigReply(config=_map(b, "config"), error=_str(b, "error", 4096) if "error" in b else "")


_CODECS: dict[str, tuple[type, Callable]] = {
    "sample": (Sample, _sample_in),
    "sample_set": (SampleSet, _sample_set_in),
    "weights": (Weights, _weights_in),
    "config": (ConfigReply, _config_reply_in),
    "game_frame": (GameFrame, _game_frame_in),
    "action": (Action, _action_in),
    "console": (Console, _console_in),
    "heartbeat": (Heartbeat, _heartbeat_in),
    "config_request": (ConfigRequest, _config_request_in),
    "config_reply": (ConfigReply, _config_reply_in),
}


def _decode(frames: Sequence, control: bool) -> Envelope:
    if len(frames) < 2:
        raise ProtocolError("truncated", f"{len(frames)} frame(s); a message is [topic, header, *blobs]")
    f0 = frames[0]
    topic_b = f0.bytes if f0.__class__ is _ZFrame else bytes(_buf(f0))
    try:
        topic = topic_b.decode("ascii")
    except UnicodeDecodeError:
        raise ProtocolError("unknown_topic", f"topic {topic_b[:40]!r} is not ASCII") from None
    entry = None if control else registry().topic(topic)
    if entry is None and not control:
        raise ProtocolError("unknown_topic", f"topic {topic[:64]!r} is not in the registry")
    header_b = _buf(frames[1])
    nbytes = len(topic_b) + len(header_b)
    blobs = []
    for f in frames[2:]:
        b = f.buffer if f.__class__ is _ZFrame else _buf(f)
        nbytes += len(b)
        blobs.append(b)
    limit = entry.max_bytes if entry else MAX_HEADER_BYTES
    if nbytes > limit or len(header_b) > MAX_HEADER_BYTES:
        raise ProtocolError("oversize", f"{nbytes} bytes on {topic[:64]!r}; the limit is {limit}")
    try:
        header = _unpackb(header_b)  # msgpack >= 1.0 defaults: raw=False, strict_map_key=True
    except Exception as e:  # noqa: BLE001 - msgpack raises many types on garbage
        raise ProtocolError("bad_header", f"header is not msgpack ({type(e).__name__})") from None
    if header.__class__ is not dict:
        raise ProtocolError("bad_header", f"header must be a map, got {type(header).__name__}")
    v = header.get("v")
    if v != SCHEMA_VERSION:
        raise ProtocolError(
            "bad_version",
            f"schema version {v!r}; this build speaks {SCHEMA_VERSION} (upgrade the sender or the receiver together)",
        )
    kind = header.get("kind")
    codec = _CODECS.get(kind) if kind.__class__ is str else None
    if codec is None:
        raise ProtocolError("unknown_kind", f"kind {kind!r}")
    if entry is not None and entry.kind != kind:
        raise ProtocolError("kind_mismatch", f"topic {entry.family!r} carries {entry.kind}, got {kind}")
    sender, t, wall, body = (
        _str(header, "sender"),
        _num(header, "t"),
        _num(header, "wall"),
        _map(header, "body"),
    )
    msg = codec[1](body, blobs)
    return Envelope(topic, kind, sender, t, wall, msg, nbytes)
