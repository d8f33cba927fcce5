"""ZeroMQ multipart framing: ``[topic, header, *blobs]``.

The header is a msgpack map ``{v, kind, sender, t, wall, body}``; large payloads (frames, history arrays,
weights) are blobs of their own, referenced from the body by index, so nobody copies a 400 KB frame to read
a header. ``decode`` validates everything and raises only ``ProtocolError``, whose ``reason`` is one of
``REASONS``; the receive loops count rejects by that reason (proto/README.md lists what each means).
"""

from __future__ import annotations

import hashlib
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import numpy as np
import zmq

from charles.proto.frames import Frame, FrameError
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

REASONS = (
    "truncated",  # fewer than two frames
    "oversize",  # message larger than its topic's max_bytes, or a huge header
    "unknown_topic",  # topic family not in the registry
    "bad_header",  # header is not a msgpack map with the envelope fields
    "bad_version",  # schema version we do not speak
    "unknown_kind",  # kind not known
    "kind_mismatch",  # kind differs from what the registry says the topic carries
    "missing_field",
    "bad_field",  # wrong type
    "nan",  # NaN or infinity where a number must be finite
    "out_of_range",  # a number outside its documented range
    "bad_blob",  # blob index missing or blob count wrong
    "bad_shape",
    "bad_codec",
    "size_mismatch",  # blob length disagrees with shape
    "bad_checksum",  # weights digest mismatch
)


class ProtocolError(ValueError):
    """A message that fails validation; ``reason`` is one of REASONS (a metric label)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(slots=True)
class Envelope:
    topic: str
    kind: str
    sender: str
    t: float
    """Sender's time.monotonic() (comparable between processes on one host)."""
    wall: float
    msg: Any
    nbytes: int


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


class _Blobs:
    """Outgoing blobs: append and get the index to put in the header."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: list = []

    def add(self, data: Any) -> int:
        self.items.append(data)
        return len(self.items) - 1


def _blob(blobs: Sequence, index: Any) -> memoryview:
    if index.__class__ is not int or not 0 <= index < len(blobs):
        raise ProtocolError("bad_blob", f"blob index {index!r} not among {len(blobs)} blobs")
    return blobs[index]


# ---------------------------------------------------------------------------------------------- frames


def _frame_out(f: Frame, blobs: _Blobs) -> dict:
    return {"codec": f.codec, "shape": list(f.shape), "dtype": "uint8", "blob": blobs.add(f.data)}


def _frame_in(h: Any, blobs: Sequence) -> Frame:
    try:
        codec, shape = Frame.check_header(h)
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


def _sample_out(s: Sample, blobs: _Blobs) -> dict:
    body = {
        "collector": s.collector,
        "seq": s.seq,
        "game_time": s.game_time,
        "frame": _frame_out(s.frame, blobs),
        "steering": s.steering,
        "throttle_brake": s.throttle_brake,
        "speed": s.speed,
        "purpose": list(s.purpose),
        "source": s.source,
    }
    if s.previous is not None:
        body["previous"] = list(s.previous)
    if s.history is not None:
        h = np.ascontiguousarray(s.history, dtype=np.float32)
        body["history"] = {"shape": list(h.shape), "dtype": "float32", "blob": blobs.add(h.data)}
    if s.stack:
        body["stack"] = [_frame_out(f, blobs) for f in s.stack]
    return body


_NFIELDS = len(HISTORY_FIELDS)
_CODEC_NAMES = frozenset(("raw", "jpeg", "png"))


def _history_of(blob: Any, rows: int) -> np.ndarray | None:
    """A history blob as a [rows, 5] float32 view, or None when it holds NaN or infinity (one reduction:
    a NaN or an infinity anywhere makes the sum non-finite)."""
    history = np.frombuffer(blob, dtype=np.float32).reshape(rows, _NFIELDS)
    if rows and not math.isfinite(float(history.sum(dtype=np.float64))):
        return None
    return history


def _sample_in_fast(b: dict, blobs: Sequence) -> Sample | None:
    """The common sample (float fields, frame, optional history, no stack) checked in one pass; None
    sends it to the precise path.

    Chained comparisons reject NaN (every comparison with NaN is false) and infinity (bounded ranges),
    so one expression checks range and finiteness. Numbers must be floats here (what every sender
    writes), so nothing needs converting; an integer, like anything else unusual, falls back to
    ``_sample_in``, which accepts it or names the reason.
    """
    try:
        f = b["frame"]
        st = b["steering"]
        tb = b["throttle_brake"]
        sp = b["speed"]
        gt = b["game_time"]
        pa, pd = b["purpose"]
        col = b["collector"]
        seq = b["seq"]
        codec = f["codec"]
        h, w, c = f["shape"]
        i = f["blob"]
    except (KeyError, TypeError, ValueError):
        return None
    if len(b) > 11 or "stack" in b:
        return None
    pv = b.get("previous")
    src = b.get("source", "npc")
    if not (
        st.__class__ is float
        and tb.__class__ is float
        and sp.__class__ is float
        and gt.__class__ is float
        and pa.__class__ is float
        and pd.__class__ is float
        and seq.__class__ is int
        and col.__class__ is str
        and src.__class__ is str
        and -1.0 <= st <= 1.0
        and -1.0 <= tb <= 1.0
        and 0.0 <= sp <= 200.0
        and 0.0 <= gt <= 1e12
        and -_PI <= pa <= _PI
        and 0.0 <= pd <= 1e7
        and 0 <= seq < 2**63
        and len(col) <= 256
        and len(src) <= 32
        and codec.__class__ is str
        and codec in _CODEC_NAMES
        and h.__class__ is int
        and w.__class__ is int
        and i.__class__ is int
        and 0 < h <= 4096
        and 0 < w <= 4096
        and c.__class__ is int
        and (c == 3 or c == 1)
        and 0 <= i < len(blobs)
        and f.get("dtype", "uint8") == "uint8"
    ):
        return None
    if pv is not None:
        if pv.__class__ is not list or len(pv) != 2:
            return None
        p0, p1 = pv
        if not (p0.__class__ is float and p1.__class__ is float and -1.0 <= p0 <= 1.0 and -1.0 <= p1 <= 1.0):
            return None
        pv = (p0, p1)
    data = blobs[i]
    n = len(data)
    if n == 0 or (codec == "raw" and n != h * w * c):
        return None
    history = None
    hd = b.get("history")
    if hd is not None:
        try:
            rows, cols = hd["shape"]
            hb = hd["blob"]
        except (KeyError, TypeError, ValueError):
            return None
        if (
            rows.__class__ is not int
            or cols.__class__ is not int
            or cols != _NFIELDS
            or not 0 <= rows <= MAX_HISTORY
            or hd.get("dtype") != "float32"
            or hb.__class__ is not int
            or not 0 <= hb < len(blobs)
            or len(blobs[hb]) != rows * _NFIELDS * 4
        ):
            return None
        history = _history_of(blobs[hb], rows)
        if history is None:
            return None
    return Sample(col, seq, gt, Frame(codec, (h, w, c), data), st, tb, sp, (pa, pd), history, [], pv, src)


def _sample_in(b: dict, blobs: Sequence) -> Sample:
    if b.__class__ is dict:
        fast = _sample_in_fast(b, blobs)
        if fast is not None:
            return fast
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


def _sample_set_out(s: SampleSet, blobs: _Blobs) -> dict:
    body = {
        "outputs": list(s.outputs),
        "version": s.version,
        "labels_kept": list(s.labels_kept),
        "samples": [_sample_out(x, blobs) for x in s.samples],
    }
    if s.seq is not None:
        body["seq"] = s.seq
    return body


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


def _weights_out(w: Weights, blobs: _Blobs) -> dict:
    digest = w.sha256 or hashlib.sha256(w.payload).hexdigest()
    return {
        "model": w.model,
        "run": w.run,
        "batch": w.batch,
        "config": w.config,
        "created": w.created,
        "sha256": digest,
        "payload": blobs.add(w.payload),
    }


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
    )


def _game_frame_out(g: GameFrame, blobs: _Blobs) -> dict:
    body = {
        "source": g.source,
        "seq": g.seq,
        "game_time": g.game_time,
        "frame": _frame_out(g.frame, blobs),
        "speed": g.speed,
    }
    if g.position is not None:
        body["position"] = list(g.position)
    if g.heading is not None:
        body["heading"] = g.heading
    if g.purpose is not None:
        body["purpose"] = list(g.purpose)
    if g.controls is not None:
        body["controls"] = list(g.controls)
    if g.recovering is not None:
        body["recovering"] = g.recovering
    return body


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


def _action_out(a: Action, blobs: _Blobs) -> dict:
    out = {
        "seq": a.seq,
        "steering": a.steering,
        "throttle": a.throttle,
        "brake": a.brake,
        "target": a.target,
    }
    if a.frame_seq is not None:
        out["frame_seq"] = a.frame_seq
    return out


def _action_in(b: dict, blobs: Sequence) -> Action:
    return Action(
        seq=_int(b, "seq"),
        steering=_num(b, "steering", -1.0, 1.0),
        throttle=_num(b, "throttle", 0.0, 1.0),
        brake=_num(b, "brake", 0.0, 1.0),
        target=_str(b, "target") if "target" in b else "",
        frame_seq=_int(b, "frame_seq") if "frame_seq" in b else None,
    )


def _console_out(c: Console, blobs: _Blobs) -> dict:
    return {
        "service": c.service,
        "state": c.state,
        "images": {k: _frame_out(f, blobs) for k, f in c.images.items()},
    }


def _console_in(b: dict, blobs: Sequence) -> Console:
    images = b.get("images") or {}
    if images.__class__ is not dict or len(images) > 16:
        raise ProtocolError("bad_field", "images must be a map of at most 16 frames")
    return Console(
        service=_str(b, "service"),
        state=_map(b, "state"),
        images={str(k): _frame_in(v, blobs) for k, v in images.items()},
    )


def _heartbeat_out(h: Heartbeat, blobs: _Blobs) -> dict:
    return {
        "service": h.service,
        "instance": h.instance,
        "state": h.state,
        "uptime": h.uptime,
        "info": h.info,
    }


def _heartbeat_in(b: dict, blobs: Sequence) -> Heartbeat:
    return Heartbeat(
        service=_str(b, "service"),
        instance=_str(b, "instance"),
        state=_str(b, "state", 32),
        uptime=_num(b, "uptime", 0.0),
        info=_map(b, "info") if "info" in b else {},
    )


def _config_request_out(c: ConfigRequest, blobs: _Blobs) -> dict:
    return {"role": c.role}


def _config_request_in(b: dict, blobs: Sequence) -> ConfigRequest:
    return ConfigRequest(role=_str(b, "role", 64))


def _config_reply_out(c: ConfigReply, blobs: _Blobs) -> dict:
    return {"config": c.config, "error": c.error}


def _config_reply_in(b: dict, blobs: Sequence) -> ConfigReply:
    return ConfigReply(config=_map(b, "config"), error=_str(b, "error", 4096) if "error" in b else "")


_CODECS: dict[str, tuple[type, Callable, Callable]] = {
    "sample": (Sample, _sample_out, _sample_in),
    "sample_set": (SampleSet, _sample_set_out, _sample_set_in),
    "weights": (Weights, _weights_out, _weights_in),
    "config": (ConfigReply, _config_reply_out, _config_reply_in),
    "game_frame": (GameFrame, _game_frame_out, _game_frame_in),
    "action": (Action, _action_out, _action_in),
    "console": (Console, _console_out, _console_in),
    "heartbeat": (Heartbeat, _heartbeat_out, _heartbeat_in),
    "config_request": (ConfigRequest, _config_request_out, _config_request_in),
    "config_reply": (ConfigReply, _config_reply_out, _config_reply_in),
}
_KIND_OF = {cls: kind for kind, (cls, _, _) in _CODECS.items() if kind != "config"}


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
    header = msgpack.packb(
        {
            "v": SCHEMA_VERSION,
            "kind": kind,
            "sender": sender,
            "t": time.monotonic(),
            "wall": time.time(),
            "body": body,
        },
        use_bin_type=True,
    )
    return [topic.encode("ascii"), header, *blobs.items]


def _buf(f: Any) -> memoryview:
    # zmq.Frame (recv copy=False) exposes .buffer, already flat bytes; bytes and memoryviews pass through.
    if f.__class__ is _ZFrame:
        return f.buffer
    b = memoryview(f)
    # lengths below are byte counts: flatten multi-dimensional views (a numpy array's .data)
    return b if b.ndim == 1 and b.itemsize == 1 else b.cast("B")


def decode(frames: Sequence, *, control: bool = False) -> Envelope:
    """Validate and decode one multipart message. Raises ProtocolError and nothing else.

    ``control`` decodes the broker's control-port messages, whose first frame is a verb, not a topic.
    """
    try:
        if not control:
            # the common message, checked in one pass (in C where it compiled): what it does not take,
            # the precise path does, or names why not
            env = _fast(frames)
            if env is not None:
                return env
        return _decode(frames, control)
    except ProtocolError:
        raise
    except Exception as e:  # noqa: BLE001 - the contract: a hostile message never escapes as anything else
        raise ProtocolError("bad_field", f"{type(e).__name__}: {e}") from None


_TOPIC_CACHE = 4096
_TOPICS: dict[bytes, tuple[str, Any, str, int]] = {}
"""Known topic bytes -> (name, registry entry, its kind, its max_bytes); bounded so a flood of made-up
topics cannot grow it. Read by the C fast path too."""


def _decode_fast(frames: Sequence) -> Envelope | None:
    """A well-formed message on a known topic from zmq.Frames, or None: ``_decode`` then says why not.

    Nothing is rejected here; anything unusual (an unseen topic, plain bytes, a bad envelope) goes the
    precise way, so the two paths cannot disagree on what is valid, only on how fast they say so.
    """
    n = len(frames)
    if n < 3:
        return None
    f0 = frames[0]
    f1 = frames[1]
    if f0.__class__ is not _ZFrame or f1.__class__ is not _ZFrame:
        return None
    known = _TOPICS.get(f0.bytes)
    if known is None:
        return None
    topic, _, topic_kind, max_bytes = known
    header_b = f1.buffer
    hn = len(header_b)
    nbytes = len(f0.bytes) + hn
    blobs = []
    for f in frames[2:]:
        if f.__class__ is not _ZFrame:
            return None
        b = f.buffer
        nbytes += len(b)
        blobs.append(b)
    if nbytes > max_bytes or hn > MAX_HEADER_BYTES:
        return None
    try:
        header = _unpackb(header_b)
        v = header["v"]
        kind = header["kind"]
        sender = header["sender"]
        t = header["t"]
        wall = header["wall"]
        body = header["body"]
    except Exception:  # noqa: BLE001 - the precise path names it
        return None
    if not (
        v == SCHEMA_VERSION
        and v.__class__ is int
        and kind == topic_kind
        and sender.__class__ is str
        and len(sender) <= 256
        and t.__class__ is float
        and wall.__class__ is float
        and body.__class__ is dict
        and -1e15 < t < 1e15
        and -1e15 < wall < 1e15
    ):
        return None
    if kind == "sample":
        msg = _sample_in_fast(body, blobs)
        if msg is None:
            return None
    else:
        codec = _CODECS.get(kind)
        if codec is None:
            return None
        msg = codec[2](body, blobs)
    return Envelope(topic, kind, sender, t, wall, msg, nbytes)


def _decode(frames: Sequence, control: bool) -> Envelope:
    if len(frames) < 2:
        raise ProtocolError("truncated", f"{len(frames)} frame(s); a message is [topic, header, *blobs]")
    f0 = frames[0]
    topic_b = f0.bytes if f0.__class__ is _ZFrame else bytes(_buf(f0))
    # a control verb is not a topic (b"config" is both): never looked up in nor added to the topics' cache
    known = None if control else _TOPICS.get(topic_b)
    if known is None:
        try:
            topic = topic_b.decode("ascii")
        except UnicodeDecodeError:
            raise ProtocolError("unknown_topic", f"topic {topic_b[:40]!r} is not ASCII") from None
        entry = None if control else registry().topic(topic)
        if entry is None and not control:
            raise ProtocolError("unknown_topic", f"topic {topic[:64]!r} is not in the registry")
        if not control and len(_TOPICS) < _TOPIC_CACHE:
            _TOPICS[topic_b] = (topic, entry, entry.kind, entry.max_bytes)
    else:
        topic, entry, _, _ = known
    header_b = _buf(frames[1])
    nbytes = len(topic_b) + len(header_b)
    blobs = []
    for f in frames[2:]:  # a plain loop: this is the per-message hot path (a generator costs ~0.6 us)
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
    msg = codec[2](body, blobs)
    return Envelope(topic, kind, sender, t, wall, msg, nbytes)


def _use_c(enabled: bool = True) -> bool:
    """Take the C fast path when it is built and ``enabled`` (CHARLES_PURE_PYTHON=1 turns it off at import);
    returns whether it is now in use. Tests switch between the two to hold both to the precise path."""
    global _fast
    if enabled and _fastcodec is not None:
        _fastcodec.configure(
            _TOPICS,
            _unpackb,
            _ZFrame,
            Sample,
            Frame,
            Envelope,
            _CODECS,
            _history_of,
            SCHEMA_VERSION,
            MAX_HEADER_BYTES,
        )
        _fast = _fastcodec.decode
        return True
    _fast = _decode_fast
    return False


try:
    from charles.proto import _fastcodec
except ImportError:  # not compiled here (no C compiler): the same checks, in Python
    _fastcodec = None
_fast: Callable[[Sequence], Envelope | None] = _decode_fast
FAST_PATH = "c" if _use_c(os.environ.get("CHARLES_PURE_PYTHON", "") in ("", "0")) else "python"
"""Which fast path decodes received samples: ``c`` or ``python``."""
