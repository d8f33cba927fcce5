"""Codec round trips for every message kind, one test per reject reason, and fuzzing of the decoder."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import msgpack
import numpy as np
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charles.proto import (
    REASONS,
    SCHEMA_VERSION,
    Action,
    Camera,
    ConfigReply,
    Console,
    Frame,
    GameFrame,
    Heartbeat,
    ProtocolError,
    Sample,
    SampleSet,
    Weights,
    decode,
    encode,
)
from charles.proto.frames import FrameError

import proto_codec_before

RNG = np.random.default_rng(0)
# smooth, with a pure red block, so JPEG stays close and a swapped channel order would show
IMG = np.zeros((27, 48, 3), dtype=np.uint8)
IMG[..., 1] = np.linspace(0, 200, 48, dtype=np.uint8)[None, :]
IMG[:, :16] = (230, 0, 0)


def sample(codec: str = "jpeg", history: bool = True, stack: int = 2) -> Sample:
    return Sample(
        collector="collector-1",
        seq=7,
        game_time=1.25,
        frame=Frame.encode(IMG, codec),
        steering=-0.25,
        throttle_brake=0.5,
        speed=12.5,
        purpose=(0.3, 120.0),
        history=RNG.normal(size=(60, 5)).astype(np.float32) if history else None,
        stack=[Frame.encode(IMG, codec) for _ in range(stack)],
        previous=(-0.2, 0.4),
        source="npc",
    )


def roundtrip(topic: str, msg, kind: str | None = None):
    frames = encode(topic, msg, "tester", kind)
    # as they arrive off a socket: plain bytes
    return decode([bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in frames])


@pytest.mark.parametrize("codec", ["raw", "jpeg", "png"])
def test_sample_round_trip(codec):
    s = sample(codec)
    env = roundtrip("sample.collector-1", s)
    got = env.msg
    assert env.kind == "sample" and env.sender == "tester" and env.topic == "sample.collector-1"
    assert (got.collector, got.seq, got.game_time) == (s.collector, s.seq, s.game_time)
    assert (got.steering, got.throttle_brake, got.speed, got.purpose, got.previous) == (
        s.steering,
        s.throttle_brake,
        s.speed,
        s.purpose,
        s.previous,
    )
    np.testing.assert_array_equal(got.history, s.history)
    assert len(got.stack) == 2
    pixels = got.frame.decode()
    assert pixels.shape == IMG.shape and pixels.dtype == np.uint8
    if codec != "jpeg":
        np.testing.assert_array_equal(pixels, IMG)
    else:
        assert np.abs(pixels.astype(int) - IMG).mean() < 12
    assert pixels[13, 4, 0] > 180 and pixels[13, 4, 2] < 60  # red stays red: RGB order kept


def test_sample_without_optional_parts_round_trips():
    s = sample(history=False, stack=0)
    got = roundtrip("sample.c", s).msg
    assert got.history is None and got.stack == [] and got.previous == (-0.2, 0.4) and got.seq == 7


def test_frames_are_not_copied_on_decode():
    frames = encode("sample.c", sample("raw", history=False, stack=0), "t")
    blob = bytearray(memoryview(frames[2]).cast("B"))
    env = decode([frames[0], frames[1], blob])
    blob[0] ^= 0xFF  # change the receive buffer: the decoded frame sees it, so it is a view
    assert env.msg.frame.data[0] == blob[0]


def test_every_other_kind_round_trips():
    ss = SampleSet(
        outputs=["steering"],
        version=3,
        samples=[sample(), sample("png")],
        labels_kept=["steering", "throttle_brake"],
    )
    got = roundtrip("set.steering", ss).msg
    assert got.outputs == ["steering"] and got.version == 3 and len(got.samples) == 2
    assert got.samples[1].frame.codec == "png" and got.labels_kept == ["steering", "throttle_brake"]

    w = Weights("model_x", "model_x_v1", 42, {"backbone": "tiny"}, b"\x00" * 1000, created=1.5)
    got = roundtrip("weights.model_x", w).msg
    assert (got.model, got.run, got.batch, got.config, bytes(got.payload)) == (
        "model_x",
        "model_x_v1",
        42,
        {"backbone": "tiny"},
        w.payload,
    )

    got = roundtrip("config", ConfigReply({"run": "r", "trainer": {"lr": 0.1}})).msg
    assert got.config == {"run": "r", "trainer": {"lr": 0.1}} and got.error == ""

    g = GameFrame(
        "pc1", 3, 0.1, Frame.encode(IMG, "jpeg"), 5.0, (1.0, 2.0, 3.0), 0.5, (0.1, 10.0), (-0.5, 1.0)
    )
    got = roundtrip("game.pc1", g).msg
    assert (got.position, got.heading, got.purpose, got.speed, got.controls) == (
        (1.0, 2.0, 3.0),
        0.5,
        (0.1, 10.0),
        5.0,
        (-0.5, 1.0),
    )

    g.expert = (0.25, -1.0)
    assert roundtrip("game.pc1", g).msg.expert == (0.25, -1.0)

    got = roundtrip("action.pad1", Action(9, -1.0, 0.25, 0.0, "pad1")).msg
    assert (got.seq, got.steering, got.throttle, got.brake, got.target) == (9, -1.0, 0.25, 0.0, "pad1")

    c = Console("player", {"fps": 30.0, "model": "m"}, {"hood": Frame.encode(IMG, "jpeg")})
    got = roundtrip("console.player", c).msg
    assert got.state == {"fps": 30.0, "model": "m"} and got.images["hood"].decode().shape == IMG.shape

    cam = Camera(7, 1.7e9, {"cinematic": Frame.encode(IMG, "jpeg"), "hood": Frame.encode(IMG, "png")})
    got = roundtrip("camera.player-1", cam).msg
    assert (got.seq, got.captured, sorted(got.images)) == (7, 1.7e9, ["cinematic", "hood"])
    assert got.images["hood"].decode().shape == IMG.shape

    got = roundtrip("heartbeat.b1", Heartbeat("broker", "b1", "ok", 3.0, {"n": 1})).msg
    assert (got.service, got.instance, got.state, got.uptime, got.info) == (
        "broker",
        "b1",
        "ok",
        3.0,
        {"n": 1},
    )


# ---------------------------------------------------------------------------------------------- rejects


def frames_of(body_patch=None, header_patch=None, topic=b"sample.c", blobs=None, drop=()):
    frames = encode("sample.c", sample("raw", history=True, stack=0), "t")
    header = msgpack.unpackb(frames[1])
    for k in drop:
        del header["body"][k]
    header["body"].update(body_patch or {})
    header.update(header_patch or {})
    blob_list = [bytes(memoryview(f).cast("B")) for f in frames[2:]] if blobs is None else blobs
    return [topic, msgpack.packb(header), *blob_list]


def reason(frames) -> str:
    with pytest.raises(ProtocolError) as e:
        decode(frames)
    return e.value.reason


@pytest.mark.parametrize(
    "frames,expected",
    [
        ([b"sample.c"], "truncated"),
        ([b"sample.c", b"x" * 9_000_000], "oversize"),
        (lambda: frames_of(topic=b"nosuch.topic"), "unknown_topic"),
        (lambda: frames_of(topic=b"\xff\xfe"), "unknown_topic"),
        ([b"sample.c", b"\xc1\xc1not msgpack"], "bad_header"),
        ([b"sample.c", msgpack.packb([1, 2, 3])], "bad_header"),
        (lambda: frames_of(header_patch={"v": SCHEMA_VERSION + 1}), "bad_version"),
        (lambda: frames_of(header_patch={"kind": "teleporter"}), "unknown_kind"),
        (lambda: frames_of(header_patch={"kind": "action"}), "kind_mismatch"),
        (lambda: frames_of(drop=["steering"]), "missing_field"),
        (lambda: frames_of({"steering": "left"}), "bad_field"),
        (lambda: frames_of({"steering": math.nan}), "nan"),
        (lambda: frames_of({"speed": math.inf}), "nan"),
        (lambda: frames_of({"throttle_brake": 1.5}), "out_of_range"),
        (lambda: frames_of({"seq": -1}), "out_of_range"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [27, 48, 3], "blob": 9}}), "bad_blob"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [27, 48], "blob": 0}}), "bad_shape"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [0, 48, 3], "blob": 0}}), "bad_shape"),
        (lambda: frames_of({"frame": {"codec": "webp", "shape": [27, 48, 3], "blob": 0}}), "bad_codec"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [28, 48, 3], "blob": 0}}), "size_mismatch"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [27, 48, 3.0], "blob": 0}}), "bad_shape"),
        (lambda: frames_of({"frame": {"codec": "raw", "shape": [27, 48, True], "blob": 0}}), "bad_shape"),
        (
            lambda: frames_of({"frame": {"codec": "raw", "shape": [27, 48, 3], "dtype": "f4", "blob": 0}}),
            "bad_field",
        ),
        (lambda: frames_of({"frame": 5}), "bad_field"),
        (lambda: frames_of({"history": {"shape": [60, 4], "dtype": "float32", "blob": 1}}), "bad_shape"),
        (lambda: frames_of({"history": {"shape": [61, 5], "dtype": "float32", "blob": 1}}), "size_mismatch"),
    ],
)
def test_each_bad_input_has_its_named_reason(frames, expected):
    frames = frames() if callable(frames) else frames
    assert reason(frames) == expected
    assert expected in REASONS


def test_pixel_decode_errors_use_the_contracts_reasons():
    """A frame whose bytes pass the codec but not the pixel decode fails with a reason from REASONS.

    Changed on purpose (#15): bytes that do not decode are ``undecodable_frame`` and an image whose own
    header says another size is ``bad_shape``, refused before decoding (both were ``size_mismatch``)."""
    bad = [
        (Frame("jpeg", (27, 48, 3), b"\xff\xd8 not a jpeg"), "undecodable_frame"),
        (Frame("png", (30, 48, 3), Frame.encode(IMG, "png").data), "bad_shape"),  # a 27-row image
        (Frame("jpeg", (27, 48, 3), Frame.encode(IMG, "jpeg").data[:400]), "undecodable_frame"),
        (Frame("raw", (27, 48, 3), b"\x00" * 10), "size_mismatch"),
    ]
    for f, expected in bad:
        with pytest.raises(FrameError) as e:
            f.decode()
        assert e.value.reason == expected
    for h in (
        5,
        {"codec": "raw", "shape": [1, 1, 3], "dtype": "float32"},
        {"codec": "gif", "shape": [1, 1, 3]},
    ):
        with pytest.raises(FrameError) as e:
            Frame.check_header(h)
        assert e.value.reason in REASONS


def test_nan_in_history_is_rejected():
    frames = encode("sample.c", sample("raw"), "t")
    hist = np.frombuffer(bytes(memoryview(frames[3]).cast("B")), dtype=np.float32).copy()
    hist[17] = np.nan
    assert reason([frames[0], frames[1], bytes(memoryview(frames[2]).cast("B")), hist.tobytes()]) == "nan"


def test_weights_checksum_is_verified():
    frames = encode("weights.m", Weights("m", "m_v1", 1, {}, b"abc"), "t")
    assert reason([frames[0], frames[1], b"abd"]) == "bad_checksum"


@pytest.mark.parametrize("recovering", [True, False, None])
def test_game_frame_recovering_round_trips_and_absent_means_not_said(recovering):
    g = GameFrame("pc1", 3, 0.1, Frame.encode(IMG, "raw"), 5.0, controls=(0.0, 1.0), recovering=recovering)
    frames = encode("game.pc1", g, "t")
    assert ("recovering" in msgpack.unpackb(frames[1])["body"]) == (recovering is not None)
    assert roundtrip("game.pc1", g).msg.recovering is recovering


@pytest.mark.parametrize("value", [1, 0, "yes", None, [True]])
def test_game_frame_recovering_that_is_not_a_bool_is_a_bad_field(value):
    frames = encode("game.pc1", GameFrame("pc1", 3, 0.1, Frame.encode(IMG, "raw"), 5.0), "t")
    header = msgpack.unpackb(frames[1])
    header["body"]["recovering"] = value
    blobs = [bytes(memoryview(f).cast("B")) for f in frames[2:]]
    assert reason([b"game.pc1", msgpack.packb(header), *blobs]) == "bad_field"


# ---------------------------------------------------------------------------------------------- fuzzing

_GOOD = [
    encode("sample.c", sample("raw", history=True, stack=1), "t"),
    encode("sample.c", sample("jpeg", history=False, stack=0), "t"),
    encode("set.steering", SampleSet(["steering"], 3, [sample("png", False, 0)]), "t"),
    encode("weights.m", Weights("m", "m_v1", 1, {"x": [1, 2]}, b"w" * 64), "t"),
    encode("action.p", Action(1, 0.5, 0.5, 0.0), "t"),
    encode("console.p", Console("p", {"a": 1}, {"hood": Frame.encode(IMG, "raw")}), "t"),
    encode("sample.c", sample("jpeg", history=True, stack=0), "t"),  # history without a stack
]
_GOOD = [[bytes(memoryview(f).cast("B")) if not isinstance(f, bytes) else f for f in m] for m in _GOOD]

_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**64 - 1)
    | st.floats()
    | st.text(max_size=8)
    | st.binary(max_size=16),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=8,
)


def _mutate(obj, path_choices, value, whole=False):
    """Replace one nested field (chosen by the path indices) with an arbitrary value; ``whole`` replaces
    the map or list the path ends on instead of descending to a leaf."""
    cur = obj
    for depth, choice in enumerate(path_choices):
        last = whole and depth == len(path_choices) - 1
        if isinstance(cur, dict) and cur:
            key = sorted(cur, key=str)[choice % len(cur)]
            if last or not isinstance(cur[key], dict | list) or not cur[key]:
                cur[key] = value
                return obj
            cur = cur[key]
        elif isinstance(cur, list) and cur:
            i = choice % len(cur)
            if last or not isinstance(cur[i], dict | list) or not cur[i]:
                cur[i] = value
                return obj
            cur = cur[i]
        else:
            break
    return obj


def _decode_is_contained(frames) -> None:
    try:
        env = decode(frames)
    except ProtocolError as e:
        assert e.reason in REASONS
        return
    assert env.kind in {
        "sample",
        "sample_set",
        "weights",
        "action",
        "console",
        "camera",
        "config",
        "game_frame",
        "heartbeat",
    }


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.binary(max_size=64), max_size=5))
def test_fuzz_random_frames_never_escape(frames):
    _decode_is_contained(frames)


_MUTATIONS = dict(
    which=st.integers(0, len(_GOOD) - 1),
    path=st.lists(st.integers(0, 50), min_size=1, max_size=5),
    value=_values,
    cut=st.integers(0, 3),
    whole=st.booleans(),
)
"""One good message, one field (or sub-map) replaced, and maybe a blob missing or truncated."""


def _mutated(which, path, value, cut, whole) -> list[bytes]:
    frames = list(_GOOD[which])
    header = msgpack.unpackb(frames[1])
    frames[1] = msgpack.packb(_mutate(header, path, value, whole))
    if cut == 1 and len(frames) > 2:
        frames = frames[:-1]  # a missing blob
    elif cut == 2 and len(frames) > 2:
        frames[-1] = frames[-1][: len(frames[-1]) // 2]  # a truncated blob
    return frames


@settings(max_examples=2500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_MUTATIONS)
def test_fuzz_mutated_headers_never_escape(which, path, value, cut, whole):
    _decode_is_contained(_mutated(which, path, value, cut, whole))


@settings(max_examples=1000, deadline=None)
@given(which=st.integers(0, len(_GOOD) - 1), pos=st.integers(0, 10_000), byte=st.integers(0, 255))
def test_fuzz_flipped_header_bytes_never_escape(which, pos, byte):
    frames = list(_GOOD[which])
    h = bytearray(frames[1])
    h[pos % len(h)] = byte
    frames[1] = bytes(h)
    _decode_is_contained(frames)


def _outcome(fn, frames):
    """What a decode says: the reason it rejects, or the decoded message's fields."""
    try:
        env = fn(frames)
    except ProtocolError as e:
        return ("rejected", e.reason)
    m = env.msg
    if isinstance(m, Sample):
        return (
            env.topic,
            env.kind,
            env.sender,
            env.t,
            env.wall,
            env.nbytes,
            m.collector,
            m.seq,
            m.game_time,
            m.frame.codec,
            m.frame.shape,
            bytes(m.frame.data),
            m.steering,
            m.throttle_brake,
            m.speed,
            m.purpose,
            None if m.history is None else m.history.tobytes(),
            len(m.stack),
            m.previous,
            m.source,
        )
    return (env.topic, env.kind, env.sender, env.nbytes, type(m).__name__)


def _before(frames):
    """The decoder as it was before the wire structs: its precise path, every field by a named check."""
    return proto_codec_before.decode(frames)


def _on_purpose(path: tuple, value, outcome) -> object:
    """What the decoder before the wire structs would say, with the differences made on purpose:
    the schema version must be an integer (``v: true`` and ``v: 1.0`` were taken for 1; #15), and a
    console's ``images`` is a map or nil (any other falsy value, ``0``, ``""``, ``[]``, was taken for
    no images)."""
    if path == ("v",) and value.__class__ is not int and value == SCHEMA_VERSION:
        return ("rejected", "bad_version")
    if path == ("body", "images") and not value and value is not None and not isinstance(value, dict):
        return ("rejected", "bad_field")
    return outcome


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(**_MUTATIONS)
def test_fuzz_typed_decoder_agrees_with_the_one_before(which, path, value, cut, whole):
    """Messages as a subscriber receives them (zmq.Frame) decode exactly as the decoder before the wire
    structs decoded them: the same fields, or a rejection for the same reason where one thing is broken;
    where a blob is cut as well (two faults, named in either order) both refuse."""
    frames = _mutated(which, path, value, cut, whole)
    decode([zmq.Frame(f) for f in _GOOD[which]])  # the topic is known and cached
    got = _outcome(decode, [zmq.Frame(f) for f in frames])
    header = msgpack.unpackb(_GOOD[which][1])
    was = _on_purpose(_path_of(header, path, whole), value, _outcome(_before, [zmq.Frame(f) for f in frames]))
    if cut in (1, 2) and len(_GOOD[which]) > 2 and (got[0] == "rejected" or was[0] == "rejected"):
        assert got[0] == was[0] == "rejected", (got, was)
    else:
        assert got == was, (got, was)
    assert got == _outcome(decode, frames)  # plain bytes: the other way in


def _path_of(header: dict, path_choices: list[int], whole: bool) -> tuple:
    """The field path ``_mutate`` replaces, as keys and indices; () when it replaces nothing (the path
    ran out inside a map or list)."""
    cur, out = header, []
    for depth, choice in enumerate(path_choices):
        last = whole and depth == len(path_choices) - 1
        if isinstance(cur, dict) and cur:
            key = sorted(cur, key=str)[choice % len(cur)]
        elif isinstance(cur, list) and cur:
            key = choice % len(cur)
        else:
            return ()
        out.append(key)
        if last or not isinstance(cur[key], dict | list) or not cur[key]:
            return tuple(out)
        cur = cur[key]
    return ()


def test_an_integer_where_senders_write_floats_is_valid_and_comes_back_a_float():
    header = msgpack.unpackb(_GOOD[1][1])
    header["body"]["speed"] = 12
    odd = [zmq.Frame(_GOOD[1][0]), zmq.Frame(msgpack.packb(header)), zmq.Frame(_GOOD[1][2])]
    assert decode(odd).msg.speed == 12.0 and isinstance(decode(odd).msg.speed, float)
    assert _outcome(decode, odd) == _outcome(_before, odd)


_EDGES = [
    -2.0, -1.0000001, -1.0, -0.0, 0.0, 0.5, 1.0, 1.0000001, 2.0, 3.0, 5.0, 200.0, 200.0001, math.pi,
    math.pi + 2e-6, -math.pi - 2e-6, 1e7, 1e7 + 1, 1e12, 1.1e12, 1e16, math.nan, math.inf, -math.inf,
    -1, 0, 1, 2, 3, 5, 4096, 4097, 2**63 - 1, 2**63, True, False, None,
    "", "x", "raw", "jpeg", "uint8", "float32", "a" * 33, "a" * 257, [], [1.0, 2.0], {}, b"x",
]  # fmt: skip
_FIELDS = [
    ("v",), ("sender",), ("t",), ("wall",), ("kind",),
    *(("body", k) for k in ("steering", "throttle_brake", "speed", "game_time", "seq", "collector", "source")),
    ("body", "purpose", 0), ("body", "purpose", 1), ("body", "previous", 0), ("body", "previous", 1),
    ("body", "purpose"), ("body", "previous"), ("body", "frame"), ("body", "history"), ("body", "stack"),
    *(("body", "frame", k) for k in ("codec", "dtype", "blob", "shape")),
    ("body", "frame", "shape", 0), ("body", "frame", "shape", 1), ("body", "frame", "shape", 2),
    *(("body", "history", k) for k in ("dtype", "blob", "shape")),
    ("body", "history", "shape", 0), ("body", "history", "shape", 1),
]  # fmt: skip


@pytest.mark.parametrize("good", [1, 6])
def test_typed_decoder_agrees_with_the_one_before_on_every_field_at_its_edges(good):
    """Each field of a received sample set to each edge value (just inside and outside its range, NaN,
    the wrong type): the typed decoder and the one before give the same fields or the same reason."""
    decode([zmq.Frame(f) for f in _GOOD[good]])
    for path in _FIELDS:
        for value in _EDGES:
            header = msgpack.unpackb(_GOOD[good][1])
            cur, made = header, False
            for k in path[:-1]:
                made = made or not (isinstance(cur, list) or k in cur)
                cur = cur[k] if isinstance(cur, list) or k in cur else cur.setdefault(k, {})
            cur[path[-1]] = value
            frames = [_GOOD[good][0], msgpack.packb(header), *_GOOD[good][2:]]
            zf = [zmq.Frame(f) for f in frames]
            got, was = _outcome(decode, zf), _on_purpose(path, value, _outcome(_before, zf))
            if made:  # a map made up around the field lacks its other fields too: two faults, either named
                assert (got[0] == "rejected") == (was[0] == "rejected"), (path, value, got, was)
            else:
                assert got == was, (path, value)


def _paths(obj, prefix: tuple = ()):
    """Every key and index path in a decoded header, outermost first."""
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield (*prefix, k)
        yield from _paths(v, (*prefix, k))


_MAPS = [{"codec": "raw"}, {"shape": [1, 1, 3]}, [[1.0, 2.0]], {"a": 1}, [1, 2, 3], -(2**63), 2**64 - 1]


def test_typed_decoder_agrees_with_the_one_before_on_every_field_of_every_kind():
    """Every field, list item and sub-map of every good message (samples, a set, weights, an action, a
    console) set to every edge value and a few wrong shapes: the same fields or the same reason."""
    for good in _GOOD:
        base = msgpack.unpackb(good[1])
        for path in _paths(base):
            for value in _EDGES + _MAPS:
                header = msgpack.unpackb(good[1])
                cur = header
                for k in path[:-1]:
                    cur = cur[k]
                cur[path[-1]] = value
                zf = [zmq.Frame(f) for f in (good[0], msgpack.packb(header), *good[2:])]
                was = _on_purpose(path, value, _outcome(_before, zf))
                assert _outcome(decode, zf) == was, (path, value)


def test_no_c_codec_is_built_or_imported():
    """Untrusted bytes are parsed by msgspec, not by C of ours: the old fast path is gone for good (a
    stale build of it in an old checkout is never loaded; ``make clean`` removes it)."""
    decode([zmq.Frame(f) for f in _GOOD[1]])
    assert "charles.proto._fastcodec" not in sys.modules
    setup = (Path(__file__).parents[1] / "setup.py").read_text()
    assert "_fastcodec" not in setup and "_countproxy.c" in setup
