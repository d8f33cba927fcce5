"""The broker on real loopback sockets: forwarding, last values, config, CURVE, bad input, SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import urllib.request

import msgpack
import msgspec
import numpy as np
import pytest
import zmq

from charles.broker.broker import LastValues
from charles.proto import (
    Action,
    Camera,
    Console,
    Frame,
    GameFrame,
    Heartbeat,
    Sample,
    SampleSet,
    Weights,
    encode,
)
from charles.proto.codec import kind_of

from conftest import missing_tool
from tests_support import counter_value, stop_by_sigterm, wait_for

IMG = np.full((18, 32, 3), 90, dtype=np.uint8)


def _sample(seq: int = 0) -> Sample:
    return Sample(
        "c1",
        seq,
        seq / 30,
        Frame.encode(IMG, "jpeg"),
        0.1,
        0.2,
        3.0,
        (0.0, 10.0),
        np.zeros((4, 5), np.float32),
    )


def _connected(pub, sub, topic: str, msg) -> None:
    """Publish until the subscription has propagated (the slow-joiner rule), then drain."""

    def got():
        pub.send(topic, msg)
        return sub.recv(50) is not None

    wait_for(got, 5, "subscription never propagated through the broker")
    sub.drain()


def test_every_message_kind_crosses_the_broker(client_factory):
    pub = client_factory("sender").publisher()
    sub = client_factory("receiver").subscriber(
        ["sample", "set", "weights", "game", "action", "console", "camera", "heartbeat"], late_join=False
    )
    _connected(pub, sub, "heartbeat.x", Heartbeat("t", "x"))
    msgs = {
        "sample.c1": _sample(),
        "set.steering": SampleSet(["steering"], 3, [_sample(1), _sample(2)]),
        "weights.m": Weights("m", "m_v1", 3, {"k": 1}, b"\x01" * 5000),
        "game.pc": GameFrame("pc", 1, 0.0, Frame.encode(IMG, "raw"), 1.0),
        "action.pad": Action(1, 0.1, 0.2, 0.0),
        "console.player": Console("player", {"fps": 30}),
        "camera.player": Camera(0, 1.7e9, {"cinematic": Frame.encode(IMG, "jpeg")}),
        "heartbeat.x": Heartbeat("t", "x"),
    }
    for topic, msg in msgs.items():
        assert pub.send(topic, msg)
    seen = {}
    deadline = time.monotonic() + 5
    while len(seen) < len(msgs) and time.monotonic() < deadline:
        env = sub.recv(100)
        if env is not None:
            seen[env.topic] = env
    assert set(seen) == set(msgs)
    for topic, msg in msgs.items():
        got = seen[topic]
        assert got.kind == kind_of(msg) and got.sender.startswith("sender")
        assert _plain(got.msg) == _plain(msg), topic  # every field, frames and arrays byte for byte


def _plain(obj):
    """A message as plain data: struct fields, frames and arrays as bytes, tuples as lists."""
    if isinstance(obj, Frame):
        return ["frame", obj.codec, list(obj.shape), bytes(obj.data)]
    if isinstance(obj, Weights):
        d = {f: _plain(getattr(obj, f)) for f in obj.__struct_fields__ if f != "sha256"}
        return {**d, "sha256": obj.sha256 or hashlib.sha256(obj.payload).hexdigest()}
    if isinstance(obj, msgspec.Struct):  # every message kind
        return {f: _plain(getattr(obj, f)) for f in obj.__struct_fields__}
    if isinstance(obj, np.ndarray):
        return ["array", str(obj.dtype), list(obj.shape), obj.tobytes()]
    if isinstance(obj, memoryview | bytearray):
        return bytes(obj)
    if isinstance(obj, list | tuple):
        return [_plain(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return obj


def test_a_late_joiner_gets_the_run_configuration(broker, client_factory):
    b, _ = broker
    sub = client_factory("late").subscriber(["config"])
    env = sub.recv(2000)
    assert env is not None and env.kind == "config"
    assert env.msg.config == b.served_config and env.msg.config["bus"]["host"] == "127.0.0.1"


def test_last_values_are_bounded_per_family_and_in_bytes():
    evicted = []
    lv = LastValues(max_topics=3, max_bytes=1000, on_evict=lambda f, c: evicted.append((f, c)))
    lv.put("weights.model_a", [b"w", b"h", b"x" * 300])
    lv.put("config", [b"c", b"h"])
    for i in range(10):  # a flood of console topics evicts only console topics
        lv.put(f"console.player-{i}", [b"c", b"h", b"x" * 10])
    assert "weights.model_a" in lv.items and "config" in lv.items
    assert [t for t in lv.items if t.startswith("console.")] == [f"console.player-{i}" for i in (7, 8, 9)]
    assert evicted == [("console", "topics")] * 7 and lv.evicted["console", "topics"] == 7
    lv.put("weights.model_b", [b"w", b"h", b"y" * 700])  # over 1000 bytes: the least recent goes
    assert "weights.model_a" not in lv.items and "weights.model_b" in lv.items
    assert lv.nbytes == sum(len(f) for frames in lv.items.values() for f in frames) <= 1000
    assert evicted[-1] == ("weights", "bytes")
    lv.put("weights.model_b", [b"w", b"h", b"z" * 5000])  # alone over the cap: still the newest is kept
    assert list(lv.items) == ["weights.model_b"]


def test_console_flood_never_evicts_the_weights(broker, client_factory):
    b, _ = broker
    pub = client_factory("trainer").publisher()
    wait_for(
        lambda: (
            pub.send("weights.model_c", Weights("model_c", "r", 1, {}, b"w"))
            and "weights.model_c" in b.lvc.items
        ),
        5,
        "weights not cached",
    )
    n = b.cfg.snapshot_hwm + 20
    for i in range(n):
        # a few at a time: the cache's own queue holds the main lane's hwm + 1 (a longer burst is dropped
        # there, and counted, before the cache sees it)
        wait_for(
            lambda i=i: (
                pub.send(f"console.p{i}", Console("player", {"i": i})) and f"console.p{i}" in b.lvc.items
                if i % 8 == 7
                else pub.send(f"console.p{i}", Console("player", {"i": i}))
            ),
            5,
            f"console.p{i} not cached",
        )
    reg = b.svc.metrics.registry
    wait_for(
        lambda: (
            counter_value(
                reg, "charles_broker_last_value_evictions_total", {"family": "console", "cause": "topics"}
            )
            >= 20
        ),
        5,
        "console evictions not counted",
    )
    assert "weights.model_c" in b.lvc.items and "config" in b.lvc.items
    sub = client_factory("player").subscriber(["weights.model_c"])
    env = sub.recv(2000)
    assert env is not None and env.msg.model == "model_c"


def test_late_subscriber_gets_the_newest_weights_at_once(broker, client_factory):
    b, _ = broker
    pub = client_factory("trainer").publisher("weights")
    for batch in (10, 20):
        wait_for(
            lambda batch=batch: (
                pub.send("weights.model_a", Weights("model_a", "model_a_v1", batch, {}, b"w%d" % batch))
                and "weights.model_a" in b.lvc.items
                and msgpack.unpackb(b.lvc.items["weights.model_a"][1])["body"]["batch"] == batch
            ),
            5,
            "weights not cached",
        )
    # a player that starts now: nothing is published any more, yet it gets batch 20 immediately
    sub = client_factory("player").subscriber(["weights.model_a"])
    env = sub.recv(100)
    assert env is not None and env.msg.batch == 20 and bytes(env.msg.payload) == b"w20"
    time.sleep(0.3)
    # never an older one (a live duplicate of 20 still in flight from the loop above is fine)
    assert all(e.msg.batch == 20 for e in sub.drain())


def test_invalid_last_value_is_not_cached_and_is_counted(broker, client_factory):
    b, _ = broker
    pub = client_factory("hostile").publisher()
    frames = encode("weights.model_b", Weights("model_b", "r", 1, {}, b"good"), "hostile")
    frames[2] = b"evil"  # checksum no longer matches

    def sent_and_counted():
        pub.send_frames("weights.model_b", list(frames))
        return counter_value(b.svc.metrics.registry, "charles_rejects_total", {"reason": "bad_checksum"}) > 0

    wait_for(sent_and_counted, 5, "bad weights were not rejected")
    assert "weights.model_b" not in b.lvc.items


def test_collector_fetches_the_run_configuration(client_factory):
    cfg = client_factory("collector").fetch_config("collector", timeout_s=3)
    assert cfg["run"] == "charles" and "bus" in cfg and "service" in cfg


def test_bad_control_requests_get_an_answer_and_are_counted(broker, client_factory):
    b, data = broker
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(f"tcp://127.0.0.1:{data['bus']['ports']['control']}")
    s.send_multipart([b"config", b"\xc1garbage"])
    from charles.proto import decode

    reply = decode(s.recv_multipart())
    assert reply.kind == "config" and "bad_header" in reply.msg.error and reply.msg.config == {}
    assert s.recv_multipart() == [b"!end"]
    s.send_multipart([b"launch-missiles"])
    assert s.recv_multipart() == [b"!end"]
    s.close()
    assert counter_value(b.svc.metrics.registry, "charles_rejects_total", {"reason": "unknown_kind"}) >= 1


def test_subscriber_counts_bad_messages_and_keeps_going(client_factory):
    pub = client_factory("hostile").publisher()
    rx = client_factory("balancer")
    sub = rx.subscriber(["sample"], late_join=False)
    _connected(pub, sub, "sample.c1", _sample())
    good = encode("sample.c1", _sample(5), "c1")
    bad_version = list(good)
    h = msgpack.unpackb(good[1])
    h["v"] = 99
    bad_version[1] = msgpack.packb(h)
    nan = msgpack.unpackb(good[1])
    nan["body"]["steering"] = float("nan")
    for frames in ([b"sample.c1", b"junk"], bad_version, [good[0], msgpack.packb(nan), *good[2:]], good):
        pub.send_frames("sample.c1", list(frames))
    got = None
    deadline = time.monotonic() + 5
    while got is None and time.monotonic() < deadline:
        got = sub.recv(100)
    assert got is not None and got.msg.seq == 5
    reg = rx.metrics.registry
    assert counter_value(reg, "charles_rejects_total", {"reason": "bad_header"}) == 1
    assert counter_value(reg, "charles_rejects_total", {"reason": "bad_version"}) == 1
    assert counter_value(reg, "charles_rejects_total", {"reason": "nan"}) == 1


def _through(b, metric: str = "charles_messages_total", topic: str = "action") -> float:
    return counter_value(b.svc.metrics.registry, metric, {"direction": "through", "topic": topic})


@pytest.mark.parametrize(
    "broker",
    [
        {"count_with": "auto"},
        {"count_with": "auto", "count_every_s": 0.0},
        {"count_with": "capture", "count_every_s": 0.0},
        {"count_with": "capture", "count_every_s": 0.05},
    ],
    indirect=True,
    ids=["c_proxy", "c_proxy_every_poll", "capture_polled", "capture_batched"],
)
def test_broker_counts_messages_and_bytes_per_topic_family_exactly(broker, client_factory):
    b, _ = broker
    if b.cfg.count_with == "auto" and b.counting != "c":
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    assert b.counting == ("c" if b.cfg.count_with == "auto" else "capture")
    sender = client_factory("sender")
    pub = sender.publisher()
    sub = client_factory("receiver").subscriber(["action"], late_join=False)
    _connected(pub, sub, "action.p", Action(0, 0.0, 0.0, 0.0))
    wait_for(lambda: _through(b) > 0, 5, "the probes were not counted")
    time.sleep(0.2)  # the probes' counts settle
    before, before_bytes = _through(b), _through(b, "charles_bytes_total")
    msgs = [Action(i, 0.0, 0.5, 0.0) for i in range(200)]
    size = sum(len(f) for m in msgs for f in encode("action.p", m, sender.instance))
    for m in msgs:
        pub.send("action.p", m)
    wait_for(lambda: _through(b) >= before + 200, 5, "not counted")
    time.sleep(0.2)
    assert _through(b) == before + 200, "each message counted once"
    assert _through(b, "charles_bytes_total") == before_bytes + size
    assert counter_value(b.svc.metrics.registry, "charles_drops_total", {"cause": "capture_full"}) == 0
    # a made-up family is counted as "unknown" (a raw subscriber asks for it: publishers filter)
    raw = zmq.Context.instance().socket(zmq.SUB)
    raw.setsockopt(zmq.LINGER, 0)
    raw.setsockopt(zmq.SUBSCRIBE, b"nosuchfamily")
    raw.connect(f"tcp://127.0.0.1:{b.ports['subscribe']}")
    sent = [0]

    def arrived() -> bool:
        pub.send_frames("nosuchfamily.x", [b"nosuchfamily.x", b"\x80"])
        sent[0] += 1
        return raw.poll(50) != 0

    try:
        wait_for(arrived, 5, "a made-up family never crossed the broker")
        wait_for(lambda: _through(b, topic="unknown") >= 1, 5, "an unknown family was not counted")
        time.sleep(0.2)
        unknown = _through(b, topic="unknown")
        for _ in range(5):
            pub.send_frames("nosuchfamily.x", [b"nosuchfamily.x", b"\x80"])
        wait_for(lambda: _through(b, topic="unknown") >= unknown + 5, 5, "not counted")
        time.sleep(0.2)
        assert _through(b, topic="unknown") == unknown + 5
    finally:
        raw.close()
    assert _through(b) == before + 200, "the subscription messages going upstream are no messages"


def _raw_sub(b, port: str, *prefixes: bytes) -> zmq.Socket:
    """A bare SUB on one of the broker's ports: what a client in any language gets there."""
    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    for p in prefixes:
        sub.setsockopt(zmq.SUBSCRIBE, p)
    sub.connect(f"tcp://127.0.0.1:{b.ports[port]}")
    return sub


def _topics(sub: zmq.Socket, wait_ms: int = 300) -> list[bytes]:
    out = []
    while sub.poll(wait_ms):
        out.append(sub.recv_multipart()[0])
    return out


def test_each_family_leaves_the_broker_on_its_lane_in_queues_sized_for_it(broker, client_factory):
    """Sets and weights (up to 1 GB) on subscribe_bulk, the rest (up to 16 MB) on subscribe: a subscriber to
    everything on one lane's port never gets the other's, and each lane's bound comes from queue_bytes and
    its own largest message."""
    b, _ = broker
    if b.counting != "c":
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    main, bulk = _raw_sub(b, "subscribe", b""), _raw_sub(b, "subscribe_bulk", b"")
    pub = client_factory("sender").publisher()
    w = Weights("m", "m_v1", 3, {"k": 1}, b"\x01" * 5000)
    try:
        wait_for(
            lambda: pub.send("heartbeat.x", Heartbeat("t", "x")) and pub.send("weights.m", w) and main.poll(50)
            and bulk.poll(50), 5, "a lane never got its family",
        )  # fmt: skip
        _topics(main, 100), _topics(bulk, 100)
        msgs = {
            "heartbeat.x": Heartbeat("t", "x"),
            "weights.m": w,
            "set.steering": SampleSet(["steering"], 3, [_sample(1)]),
            "action.p": Action(1, 0.1, 0.2, 0.0),
            "console.p": Console("player", {"fps": 30}),
        }
        for topic, m in msgs.items():
            assert pub.send(topic, m)
        assert sorted(_topics(main)) == [b"action.p", b"console.p", b"heartbeat.x"]
        assert sorted(_topics(bulk)) == [b"set.steering", b"weights.m"]
    finally:
        main.close()
        bulk.close()
    reg = b.svc.metrics.registry
    hwm = {q: counter_value(reg, "charles_broker_queue_hwm", {"queue": q}) for q in b.queues}
    bound = {q: counter_value(reg, "charles_broker_queue_bound_bytes", {"queue": q}) for q in b.queues}
    assert b.cfg.queue_bytes == 256_000_000  # the default: 16 messages of the main lane's 16 MB
    assert hwm["subscribe"] == 15 and bound["subscribe"] == 256e6
    assert hwm["subscribe_bulk"] == 2 and bound["subscribe_bulk"] == 3e9  # weights: 1 GB each
    assert hwm["publish"] == 2 and bound["publish"] == 3e9  # a frame may be 1 GB (weights)
    assert "secure_subscribe" not in hwm or hwm["secure_subscribe"] == 0  # no CURVE side: not exported


def test_a_burst_reaches_a_reader_whole_and_a_stalled_subscriber_holds_its_queue(broker, client_factory):
    """The bulk lane's queues hold 2 messages (and 1 on the wire), yet a burst of 100 small sets reaches a
    subscriber that reads, whole: a full queue gets PATIENCE_MS to make room. One that stops reading holds
    its 3 sets of 20 MB, no more (charles_broker_queue_held_bytes), and its overflow is counted."""
    b, _ = broker
    if b.counting != "c":
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    reader = client_factory("trainer").subscriber(["set.small"], late_join=False)
    pub = client_factory("sender").publisher()
    reg = b.svc.metrics.registry

    def gauge(name: str, **labels: str) -> float:
        return counter_value(reg, name, labels)

    wait_for(lambda: pub.send_frames("set.small", [b"set.small", b"h"]) and reader.sock.poll(50), 5, "no sub")
    while reader.sock.poll(100):
        reader.sock.recv_multipart()
    for i in range(100):
        assert pub.send_frames("set.small", [b"set.small", b"%d" % i, b"\0" * 10_000])
    got = []
    while reader.sock.poll(500):
        got.append(reader.sock.recv_multipart()[1])
    assert got == [b"%d" % i for i in range(100)], f"a burst of small sets lost {100 - len(got)}"
    assert gauge("charles_drops_total", cause="queue_overflow_set") == 0

    stalled = _raw_sub(b, "subscribe_bulk")
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 65536)
    stalled.setsockopt(zmq.SUBSCRIBE, b"set.big")
    big = [b"set.big", b"h", b"\0" * 20_000_000]
    try:
        wait_for(
            lambda: pub.send_frames("set.big", [b"set.big", b"h"]) and stalled.poll(50), 5, "not subscribed"
        )
        _topics(stalled, 100)
        for _ in range(10):  # 200 MB
            pub.send_frames("set.big", big)
        wait_for(lambda: gauge("charles_drops_total", cause="queue_overflow_set") >= 1, 10, "no overflow")
        time.sleep(0.3)  # the held bytes reach Python every 0.1 s
        held = gauge("charles_broker_queue_held_bytes", lane="bulk")
        assert 0 < held <= 3 * 20_001_000, f"the bulk lane's queues hold {held / 1e6:.0f} MB, over 3 sets"
        _topics(stalled)  # it reads again: the queue lets go
        wait_for(lambda: gauge("charles_broker_queue_held_bytes", lane="bulk") == 0, 5, "still held")
    finally:
        stalled.close()


def test_a_message_over_its_family_max_bytes_is_refused_at_the_broker(broker, client_factory):
    """libzmq bounds a frame (ZMQ_MAXMSGSIZE), not a message: a heartbeat of two 40 KB frames passes it. The
    broker refuses it whole (a heartbeat is at most 64 KiB), counts it, and no subscriber's queue holds it;
    one of 5000 small frames under the limit crosses whole."""
    b, _ = broker
    if b.counting != "c":
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    sub = _raw_sub(b, "subscribe", b"heartbeat")
    pub = client_factory("sender").publisher()
    reg = b.svc.metrics.registry
    try:
        wait_for(lambda: pub.send("heartbeat.a", Heartbeat("t", "a")) and sub.poll(50), 5, "no heartbeat")
        _topics(sub, 100)
        before = counter_value(reg, "charles_rejects_total", {"reason": "oversize"})
        frames = encode("heartbeat.big", Heartbeat("t", "big"), "sender")
        pub.send_frames("heartbeat.big", [*frames, b"\0" * 40_000, b"\0" * 40_000])
        pub.send("heartbeat.after", Heartbeat("t", "after"))
        assert _topics(sub) == [b"heartbeat.after"]
        many = [b"heartbeat.many", frames[1], *[b"x"] * 5000]  # under 64 KiB in all: it crosses, whole
        pub.send_frames("heartbeat.many", many)
        assert sub.poll(2000) and sub.recv_multipart() == many
        wait_for(
            lambda: counter_value(reg, "charles_rejects_total", {"reason": "oversize"}) == before + 1,
            5,
            "the oversize message was not counted",
        )
    finally:
        sub.close()


@pytest.mark.parametrize(
    "broker", [{"count_with": "auto", "count_every_s": 0.0}, {"count_with": "capture"}], indirect=True
)
def test_an_idle_broker_sleeps_whatever_its_counting_period(broker):
    """count_every_s = 0 reads the counts after every poll: the poll still waits (no busy loop)."""
    b, _ = broker
    time.sleep(0.3)
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.5, f"an idle broker ({b.counting} counting) spins"


def test_the_counting_proxy_binds_only_to_a_libzmq_this_process_has_loaded():
    from charles.broker import broker as broker_module

    if broker_module.counting_proxy() is None:
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    from charles.broker import _countproxy

    path = broker_module.loaded_libzmq()
    assert path is not None and "libzmq" in path
    with pytest.raises(OSError, match="not loaded in this process"):
        _countproxy.load("/nonexistent/libzmq.so.5")  # never a second copy of libzmq: its sockets are others

    def run(lanes=(0, 0), counts=8, held=2) -> None:
        args = (lanes, (10, 10), np.zeros(counts, np.int64), np.zeros(held, np.int64), 20, 1000)
        _countproxy.run(0, (0,), 0, (b"sample",), *args, zmq.ETERM)

    with pytest.raises(ValueError, match="counts must be 8 int64"):  # sample + unknown
        run(counts=4)
    with pytest.raises(ValueError, match="held must be 2 int64"):  # one lane
        run(held=1)
    with pytest.raises(ValueError, match="not a back"):  # a lane with no XPUB
        run(lanes=(1, 0))


@pytest.mark.parametrize(
    # queue_bytes 0: the bus's own queues unbounded (a 300-message burst would overflow the 15 of libzmq's
    # proxy's one queue, uncounted); the capture queue is this test's
    "broker",
    [{"count_with": "capture", "count_every_s": 0.5, "count_queue": 16, "queue_bytes": 0}],
    indirect=True,
)
def test_a_full_counting_queue_is_reported_and_the_bus_loses_nothing(broker, client_factory):
    b, _ = broker
    pub = client_factory("sender").publisher()
    sub = client_factory("receiver").subscriber(["action"], late_join=False)
    _connected(pub, sub, "action.p", Action(0, 0.0, 0.0, 0.0))
    for i in range(300):  # far more than 16 inside one 0.5 s counting period
        pub.send("action.p", Action(i, 0.0, 0.5, 0.0))
    got = []
    while len(got) < 300:
        env = sub.recv(2000)
        assert env is not None, f"the bus lost messages: {len(got)} of 300 arrived"
        got.append(env.msg.seq)
    assert got == list(range(300))
    wait_for(
        lambda: counter_value(b.svc.metrics.registry, "charles_drops_total", {"cause": "capture_full"}) >= 1,
        3,
        "a full counting queue went unreported",
    )
    assert _through(b) < 300, "captures were dropped, so the counts run low (and the drop says so)"


# ---------------------------------------------------------------------------------------------- CURVE


@pytest.fixture
def secure_broker(tmp_path, bus_ports):
    import threading

    from charles import config
    from charles.broker.broker import Broker
    from charles.runtime import Service
    from charles.tools import make_keys

    keys = tmp_path / "keys"
    make_keys(keys, ["agent-ok:player"])
    # a key pair the broker has never heard of
    make_keys(tmp_path / "rogue", ["agent-rogue:player"])
    data = {
        "bus": {"host": "127.0.0.1", "ports": bus_ports, "keys_dir": str(keys)},
        "broker": {"secure": True, "secure_bind": "127.0.0.1"},
    }
    svc = Service("broker", config.load(data=data, environ={}), http=False, signals=False)
    b = Broker(svc, {"run": "secure-test"})
    b.start()
    t = threading.Thread(target=b.serve, daemon=True)
    t.start()
    yield b, data, keys, tmp_path / "rogue"
    svc.stop()
    t.join(3)
    b.close()
    svc.close()


def _client(data, keys_dir, key):
    from charles import config
    from charles.runtime import Service

    d = {
        "bus": {
            **data["bus"],
            "secure": True,
            "keys_dir": str(keys_dir),
            "client_key": key,
            "connect_timeout_s": 1.5,
        }
    }
    return Service("agent", config.load(data=d, environ={}), http=False, signals=False)


def test_curve_accepts_the_right_key_and_refuses_a_wrong_one(secure_broker):
    b, data, keys, rogue_dir = secure_broker
    # the rogue needs the broker's public key to even try: give it the real one
    import shutil

    shutil.copy(keys / "broker.key", rogue_dir / "broker.key")
    ok = _client(data, keys, "agent-ok")
    rogue = _client(data, rogue_dir, "agent-rogue")
    try:
        assert ok.fetch_config("capture_agent", timeout_s=3)["run"] == "secure-test"
        # authenticated publish reaches a plain in-cluster subscriber, and the other way round
        plain = _client(data, keys, "agent-ok")
        plain.cfg.bus.secure = False
        plain.endpoints = plain._endpoints(__import__("charles.proto", fromlist=["registry"]).registry())
        sub_plain = plain.subscriber(["action"], late_join=False)
        pub_ok = ok.publisher()
        _connected(pub_ok, sub_plain, "action.x", Action(0, 0.0, 0.0, 0.0))
        with pytest.raises(TimeoutError):
            rogue.fetch_config("capture_agent", timeout_s=1.0)
        wait_for(
            lambda: (
                counter_value(
                    b.svc.metrics.registry, "charles_broker_auth_failures_total", {"event": "auth_refused"}
                )
                >= 1
            ),
            5,
            "refusal not counted",
        )
        assert (
            counter_value(b.svc.metrics.registry, "charles_rejects_total", {"reason": "unauthenticated"}) >= 1
        )
        plain.close()
    finally:
        ok.close()
        rogue.close()


def test_a_stalled_curve_subscriber_overflows_its_queue_alone_and_it_is_counted(secure_broker):
    """The secure lanes count their overflows as the bus does: a CURVE subscriber that stops reading costs
    the broker its queue and no more, a plain one reading alongside loses nothing."""
    b, data, keys, _ = secure_broker
    if b.counting != "c":
        missing_tool("the broker's C counting proxy is not built (a C compiler at `make install`)")
    agent = _client(data, keys, "agent-ok")
    plain = _client(data, keys, "agent-ok")
    plain.cfg.bus.secure = False
    plain.endpoints = plain._endpoints(__import__("charles.proto", fromlist=["registry"]).registry())
    stalled = agent.socket(zmq.SUB)  # with the agent's CURVE keys
    stalled.setsockopt(zmq.RCVHWM, 1)
    stalled.setsockopt(zmq.RCVBUF, 65536)
    stalled.setsockopt(zmq.SUBSCRIBE, b"heartbeat.big")
    stalled.connect(agent.endpoints["subscribe"])
    reader = plain.subscriber(["heartbeat.big"], hwm=10_000, late_join=False)
    pub = plain.publisher()
    big = Heartbeat("t", "big", info={"pad": "x" * 60_000})  # near a heartbeat's 64 KiB
    reg = b.svc.metrics.registry
    try:
        wait_for(
            lambda: pub.send("heartbeat.big", big) and stalled.poll(50) and reader.recv(50) is not None, 10,
            "the subscribers never got a heartbeat",
        )  # fmt: skip
        reader.drain()
        got = 0
        for sent in range(1, 401):  # 24 MB: past the socket buffers and the 15-message queue
            assert pub.send("heartbeat.big", big)
            deadline = time.monotonic() + 5
            # at the reader's pace (4 ahead at most): what it loses is the stalled one's doing, not its own
            while (got := got + len(reader.drain())) < sent - 4 and time.monotonic() < deadline:
                got += reader.recv(20) is not None
        deadline = time.monotonic() + 10
        while got < 400 and time.monotonic() < deadline:
            got += reader.recv(100) is not None
        assert got == 400, f"the plain reader lost {400 - got} heartbeats to the stalled CURVE subscriber"
        wait_for(
            lambda: counter_value(reg, "charles_drops_total", {"cause": "queue_overflow_heartbeat"}) >= 1,
            5,
            "the stalled subscriber's overflow was not counted",
        )
    finally:
        agent.close()
        plain.close()


# ---------------------------------------------------------------------------------------------- process


def test_broker_process_serves_health_and_stops_promptly_on_sigterm(bus_ports, tmp_path):
    from conftest import free_ports

    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(bus_ports),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "charles.broker"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    try:

        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/healthz", timeout=1) as r:
                    return json.load(r)["status"] == "ok"
            except OSError:
                return False

        wait_for(healthy, 20, "broker never became healthy")
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as r:
            assert b"charles_up 1.0" in r.read()
        stop_by_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_listed_broker_metrics_are_what_the_broker_exposes(broker):
    from test_topology import _assert_listed_as_exposed, _exposed

    b, _ = broker
    for i in range(b.cfg.snapshot_hwm + 1):  # one eviction: the counter's first series
        b.lvc.put(f"console.c{i}", [b"c", b"h"])
    _assert_listed_as_exposed("broker", _exposed(b.svc.metrics.registry))
