"""The wire structs against the registry and the generated JSON Schema, and the receive-side hardening
of the trust boundary (#15): integer schema versions, the topic cache, long topics, image headers that
lie about their size. Rejects are counted by a real Service, the way every receive loop counts them."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import zlib

import msgpack
import msgspec
import numpy as np
import pytest
from msgspec import inspect as mi

from charles import config
from charles.proto import Frame, FrameError, ProtocolError, Sample, decode, encode, registry, schema, wire
from charles.proto import codec as codec_module
from charles.proto import frames as frames_module
from charles.proto.registry import CONTROL_KINDS, KINDS

from tests_support import counter_value

IMG = np.full((27, 48, 3), 90, dtype=np.uint8)


def _sample_frames(topic: str = "sample.c", codec: str = "raw") -> list[bytes]:
    s = Sample("c", 1, 0.5, Frame.encode(IMG, codec), 0.1, 0.2, 3.0, (0.1, 10.0))
    return [bytes(memoryview(f).cast("B")) for f in encode(topic, s, "t")]


def _patched(frames: list[bytes], **header_patch) -> list[bytes]:
    header = msgpack.unpackb(frames[1])
    header.update(header_patch)
    return [frames[0], msgpack.packb(header), *frames[2:]]


@pytest.fixture
def svc(bus_ports):
    """A Service whose decode counts rejects into charles_rejects_total, as every receive loop does."""
    from charles.runtime import Service

    data = {"bus": {"host": "127.0.0.1", "ports": bus_ports}}
    s = Service("balancer", config.load(data=data, environ={}), http=False, signals=False)
    yield s
    s.close()


def rejects(svc, reason: str) -> float:
    return counter_value(svc.metrics.registry, "charles_rejects_total", {"reason": reason})


@pytest.fixture
def fresh_topics(monkeypatch):
    """An empty topic cache for the test (the module's own is shared by every test in the process)."""
    cache: dict = {}
    monkeypatch.setattr(codec_module, "_TOPICS", cache)
    return cache


# ---------------------------------------------------------------------------------------------- contract


def test_the_json_schema_in_the_repository_is_what_the_structs_say():
    """proto/schema.json is generated (`make schema`); a change to the structs must regenerate it."""
    assert schema.PATH.read_text() == schema.text(), "run `make schema` (python -m charles.proto.schema)"
    doc = json.loads(schema.PATH.read_text())
    assert {d["$ref"].rsplit("/", 1)[1] for d in doc["oneOf"]} == {
        s.__name__ for s in wire.ENVELOPES.values()
    }


def test_every_kind_has_a_struct_and_the_registry_bounds_are_the_structs_bounds():
    reg = registry()
    assert set(wire.ENVELOPES) == set(KINDS) | set(CONTROL_KINDS[:2])
    assert wire.SCHEMA_VERSION == reg.schema_version == codec_module.SCHEMA_VERSION

    def field(cls, name):
        info = mi.type_info(cls)
        t = next(f.type for f in info.fields if f.name == name)
        while isinstance(t, mi.Metadata | mi.UnionType):
            t = (
                t.type
                if isinstance(t, mi.Metadata)
                else next(x for x in t.types if not isinstance(x, mi.NoneType))
            )
        return t

    lim = reg.limits
    shape = field(wire.FrameRef, "shape")
    assert shape.item_types[0].le == shape.item_types[1].le == lim.max_side == frames_module.MAX_SIDE
    assert field(wire.HistoryRef, "shape").item_types[0].le == lim.max_history
    assert field(wire.SampleBody, "stack").max_length == lim.max_stack
    assert field(wire.SampleSetBody, "samples").max_length == lim.max_set
    assert field(wire.ConsoleBody, "images").max_length == lim.max_images
    assert lim.max_header_bytes == codec_module.MAX_HEADER_BYTES
    assert field(wire.ENVELOPES["sample"], "v").values == (reg.schema_version,)


def _wire_view(t: type) -> dict:
    """A struct's JSON Schema with every $ref inlined and names, prose and defaults dropped: what it
    accepts (a default says what an absent field becomes in memory: a Sample's stack is [], not None)."""
    (ref,), defs = msgspec.json.schema_components([t], ref_template="#/$defs/{name}")

    def inline(node):
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(defs[node["$ref"].rsplit("/", 1)[1]])
            kept = {k: inline(v) for k, v in node.items() if k not in ("title", "description", "default")}
            return {**kept, "required": sorted(kept["required"])} if "required" in kept else kept
        if isinstance(node, list):
            return [inline(v) for v in node]
        return node

    return inline(ref)


@pytest.mark.parametrize("kind", ["sample", "sample_set"])
def test_what_a_receiver_decodes_into_accepts_exactly_what_the_contract_says(kind):
    """Samples decode straight into charles.proto.Sample (and Frame), not the wire's SampleBody: the
    structs a receiver decodes with must accept the same headers as the contract's (schema.json)."""
    decoder = codec_module._DECODERS[kind][0]
    assert decoder.type is not wire.ENVELOPES[kind]  # the receive side's own structs...
    assert _wire_view(decoder.type) == _wire_view(wire.ENVELOPES[kind])  # ...with the same wire fields
    # and the view sees a difference where there is one: a bound changed in a copy of the body
    loose = msgspec.defstruct("Loose", [("speed", float)], bases=(Sample,))
    assert _wire_view(wire.envelope("sample", loose)) != _wire_view(wire.ENVELOPES["sample"])


def test_a_decoded_sample_is_a_sample_of_frames_with_their_bytes():
    got = decode(_sample_frames(codec="jpeg"))
    s = got.msg
    assert type(s) is Sample and type(s.frame) is Frame and s.stack == [] and s.history is None
    assert isinstance(s.frame.data, memoryview) and np.array_equal(s.frame.decode().shape, IMG.shape)


# ---------------------------------------------------------------------------------------------- #15


def test_the_schema_version_must_be_an_integer(svc):
    """``v: true`` and ``v: 1.0`` equal 1 in Python but are not the integer 1: bad_version, each counted."""
    good = _sample_frames()
    sent = [
        *(_patched(good, v=True) for _ in range(3)),
        *(_patched(good, v=float(wire.SCHEMA_VERSION)) for _ in range(2)),
        _patched(good, v=str(wire.SCHEMA_VERSION)),
        *(good for _ in range(4)),
    ]
    decoded = [svc.decode(f) for f in sent]
    assert sum(e is not None for e in decoded) == 4
    assert rejects(svc, "bad_version") == 6
    assert sum(rejects(svc, r) for r in codec_module.REASONS) == 6


def test_a_topic_is_cached_only_after_a_message_on_it_decodes(svc, fresh_topics):
    good = _sample_frames("sample.new")
    bad = _patched(good, v=True)
    for i in range(50):  # a flood of refused messages on made-up topics of a known family
        assert svc.decode([f"sample.flood-{i}".encode(), *bad[1:]]) is None
    assert svc.decode(bad) is None
    assert fresh_topics == {} and rejects(svc, "bad_version") == 51
    assert svc.decode(good) is not None
    assert list(fresh_topics) == [b"sample.new"]
    assert svc.decode(bad) is None and rejects(svc, "bad_version") == 52  # a cached topic is checked alike


def test_a_topic_longer_than_the_registry_limit_is_unknown_and_never_cached(svc, fresh_topics):
    limit = registry().limits.max_topic_bytes
    at_limit = "sample." + "x" * (limit - len("sample."))
    over = at_limit + "x"
    assert svc.decode(_sample_frames(at_limit)) is not None  # the limit itself is allowed
    for _ in range(3):
        assert svc.decode(_sample_frames(over)) is None
    assert svc.decode([b"sample." + b"\xff" * 10_000, *_sample_frames()[1:]]) is None
    assert rejects(svc, "unknown_topic") == 4
    assert list(fresh_topics) == [at_limit.encode()]
    assert registry().topic(over) is None and registry().topic(at_limit).family == "sample"


def _png_bomb(side: int = 12_000) -> bytes:
    """A real grayscale PNG of side x side black pixels: a few hundred KB that decode to side**2 bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    z = zlib.compressobj(9)
    row = bytes(side + 1)  # filter byte 0 and a black row
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_an_image_that_lies_about_its_size_is_refused_before_it_is_decoded(svc, monkeypatch):
    """A 12000 x 12000 PNG sent as a 27 x 48 frame passes the header checks (its bytes are what they
    are) and is refused as bad_shape where pixels are decoded, before OpenCV sees it."""
    bomb = _png_bomb()
    assert 100_000 < len(bomb) < 600_000
    frame = Frame("png", (27, 48, 1), bomb)
    s = Sample("c", 1, 0.5, frame, 0.1, 0.2, 3.0, (0.1, 10.0))
    env = decode(encode("sample.c", s, "t"))  # the message is well formed: the frame is a blob
    assert frames_module.encoded_size("png", env.msg.frame.data) == (12_000, 12_000)

    def never(*a, **k):
        raise AssertionError("cv2.imdecode was called on a frame whose header lies")

    monkeypatch.setattr(frames_module.cv2, "imdecode", never)
    for _ in range(3):  # as the player's frame source counts it
        try:
            env.msg.frame.decode()
        except FrameError as e:
            svc.reject(e.reason, str(e))
    assert rejects(svc, "bad_shape") == 3

    jpeg = Frame.encode(IMG, "jpeg")
    lying = Frame("jpeg", (270, 480, 3), jpeg.data)
    with pytest.raises(FrameError) as e:
        lying.decode()
    assert e.value.reason == "bad_shape" and "(27, 48)" in str(e.value)


def test_bytes_that_do_not_decode_are_undecodable_frame_counted_where_decoded(svc):
    png = Frame.encode(IMG, "png").data
    broken = [
        Frame("jpeg", (27, 48, 3), b"\xff\xd8 not a jpeg"),
        Frame("png", (27, 48, 3), png[:40]),  # the header survives, the pixels do not
        Frame("png", (27, 48, 3), b"not a png at all, not at all"),
    ]
    for f in broken:
        try:
            f.decode()
        except FrameError as e:
            svc.reject(e.reason, str(e))
    assert rejects(svc, "undecodable_frame") == 3 and "undecodable_frame" in codec_module.REASONS


def test_jpeg_and_png_headers_are_read_without_decoding():
    for codec in ("jpeg", "png"):
        for shape in ((27, 48, 3), (1, 4096, 3), (300, 7, 1)):
            img = np.zeros(shape, np.uint8)
            assert frames_module.encoded_size(codec, Frame.encode(img, codec).data) == shape[:2]
    for junk in (b"", b"\xff\xd8", b"\xff\xd8\xff\xda\x00\x02", b"\xff\xd8\xff\xe0\x00\x01", b"\x89PNG\r\n"):
        assert (
            frames_module.encoded_size("jpeg", junk) is None
            and frames_module.encoded_size("png", junk) is None
        )


def test_opencv_is_capped_at_the_largest_frame_we_accept():
    """OPENCV_IO_MAX_IMAGE_PIXELS is set before cv2 loads in any charles process: a decode that got past
    our checks still cannot allocate more than max_side squared pixels."""
    code = """
import os
import charles.sim.world  # a module that imports cv2 before charles.proto does
import cv2
import numpy as np
big = cv2.imencode(".png", np.zeros((4100, 4100), np.uint8))[1]
ok = cv2.imencode(".png", np.zeros((4096, 4096), np.uint8))[1]
try:
    refused = cv2.imdecode(big, 0) is None
except cv2.error:  # OpenCV 5 raises, 4 returned None
    refused = True
print(os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"], refused, cv2.imdecode(ok, 0).shape == (4096, 4096))
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    side = registry().limits.max_side
    assert out.stdout.split() == [str(side * side), "True", "True"]


def test_a_reject_names_the_fields_path_for_the_log_line():
    good = _sample_frames()
    header = msgpack.unpackb(good[1])
    header["body"]["purpose"][1] = -3.0
    with pytest.raises(ProtocolError) as e:
        decode([good[0], msgpack.packb(header), *good[2:]])
    assert e.value.reason == "out_of_range" and "$.body.purpose[1]" in str(e.value)
    header = msgpack.unpackb(good[1])
    header["body"]["frame"]["shape"][2] = 4
    with pytest.raises(ProtocolError) as e:
        decode([good[0], msgpack.packb(header), *good[2:]])
    assert e.value.reason == "bad_shape" and "$.body.frame.shape[2]" in str(e.value)
