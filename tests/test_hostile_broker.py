"""Hostile clients against a real broker process: what an allowed key may do is what its role may do.

A broker subprocess with its CURVE endpoints and keys made by ``make_keys`` (a capture agent, a gamepad
agent, a player). The test plays the clients on raw ZeroMQ sockets, so it can send what our own code never
would, and a plain in-cluster "sniffer" that subscribes to everything: what it sees is what got onto the
bus. Each hostile act is counted by reason, exactly, and nothing it sent reaches the bus or the broker's
last-value cache.
"""

from __future__ import annotations

import os
import signal
import time

import pytest
import zmq
import zmq.auth

from charles.proto import Action, Heartbeat, Weights, encode
from charles.tools import make_keys

from conftest import random_bus_ports
from survive_support import (
    healthz,
    rss_growth_within,
    rss_mb,
    scrape,
    start_broker,
    stop,
    wait_for,
)

KEYS = ["cap-1:capture_agent", "pad-1:gamepad_agent", "player"]


@pytest.fixture
def broker(tmp_path):
    keys = tmp_path / "keys"
    make_keys(keys, KEYS)
    proc, ports, http = start_broker(
        tmp_path / "broker.log", "broker.secure=true", "broker.secure_bind=127.0.0.1", f"bus.keys_dir={keys}"
    )
    ctx = zmq.Context()
    try:
        yield proc, ports, http, keys, ctx
    finally:
        ctx.destroy(linger=0)
        stop(proc)


def _secure(ctx: zmq.Context, keys, name: str, kind: int, port: int) -> zmq.Socket:
    s = ctx.socket(kind)
    s.linger = 0
    s.curve_publickey, s.curve_secretkey = zmq.auth.load_certificate(keys / f"{name}.key_secret")
    s.curve_serverkey, _ = zmq.auth.load_certificate(keys / "broker.key")
    s.connect(f"tcp://127.0.0.1:{port}")
    return s


def _seen(sock: zmq.Socket, timeout_s: float = 0.3) -> list[list[bytes]]:
    """Everything that arrives within timeout_s of the last message."""
    out = []
    while sock.poll(int(timeout_s * 1000)):
        out.append(sock.recv_multipart())
    return out


def _refused(http: int, reason: str, role: str) -> float:
    return scrape(http).value("charles_broker_refused_total", reason=reason, role=role)


def test_an_allowed_key_publishes_and_reads_only_what_its_role_may(broker):
    proc, ports, http, keys, ctx = broker
    sniffer = ctx.socket(zmq.SUB)
    sniffer.linger = 0
    sniffer.subscribe(b"")
    sniffer.connect(f"tcp://127.0.0.1:{ports['subscribe']}")
    sniffer.connect(f"tcp://127.0.0.1:{ports['subscribe_bulk']}")  # both lanes: weights and sets too
    cap = _secure(ctx, keys, "cap-1", zmq.PUB, ports["secure_publish"])

    # the connection is up once an allowed message gets through
    def beat() -> bool:
        cap.send_multipart(encode("heartbeat.cap-1", Heartbeat("capture_agent", "cap-1"), "cap-1"))
        return any(f[0] == b"heartbeat.cap-1" for f in _seen(sniffer, 0.2))

    wait_for(beat, 20, "the capture agent's heartbeat never reached the bus")
    trainer = ctx.socket(zmq.PUB)  # in-cluster, plain: the sniffer hears the bulk lane too
    trainer.linger = 0
    trainer.connect(f"tcp://127.0.0.1:{ports['publish']}")

    def bulk() -> bool:
        trainer.send_multipart(encode("weights.probe", Weights("probe", "probe_v1", 1, {}, b"w"), "trainer"))
        return any(f[0] == b"weights.probe" for f in _seen(sniffer, 0.2))

    wait_for(bulk, 20, "the sniffer never heard the bulk lane")
    rss0 = rss_mb(proc.pid)

    # forged weights, sets and actions from an allowed capture-agent key; one sender spoofed
    forged = [
        encode("action.pad-1", Action(1, 1.0, 1.0, 0.0), "player"),
        encode("config", Heartbeat("broker", "cap-1"), "cap-1", "heartbeat"),
        [b"weights.tiny", b"\x80", b"not safetensors"],
        [b"set.steering", b"\x80"],
    ]
    for frames in forged:
        cap.send_multipart(frames)
    cap.send_multipart(encode("heartbeat.player", Heartbeat("player", "player"), "player"))  # spoofed
    huge = b"heartbeat." + b"x" * 1_000_000
    for _ in range(50):
        cap.send_multipart([huge, b"\x80"])  # 1 MB topics: never a family it may publish
    wait_for(lambda: _refused(http, "forbidden_topic", "capture_agent") >= 54, 20, "forbidden not counted")
    assert _refused(http, "forbidden_topic", "capture_agent") == 54
    wait_for(lambda: _refused(http, "spoofed_sender", "capture_agent") == 1, 10, "spoofing not counted")
    arrived = _seen(sniffer, 0.5)
    hostile = {f[0] for f in forged} | {b"heartbeat.player", huge}
    assert [f[0][:40] for f in arrived if f[0] in hostile] == []

    # subscriptions: a capture agent may not read weights nor everything; the gamepad agent reads actions
    spy = _secure(ctx, keys, "cap-1", zmq.SUB, ports["secure_subscribe"])
    spy.connect(f"tcp://127.0.0.1:{ports['secure_subscribe_bulk']}")  # weights' lane too
    spy.subscribe(b"weights")
    spy.subscribe(b"")
    pad = _secure(ctx, keys, "pad-1", zmq.SUB, ports["secure_subscribe"])
    pad.subscribe(b"action.pad-1")
    # each refused on each lane
    wait_for(lambda: _refused(http, "forbidden_subscription", "capture_agent") == 4, 10, "subs not refused")
    player = ctx.socket(zmq.PUB)
    player.linger = 0
    player.connect(f"tcp://127.0.0.1:{ports['publish']}")

    def drive() -> bool:
        player.send_multipart(encode("action.pad-1", Action(2, 0.5, 0.5, 0.0), "player-1"))
        trainer.send_multipart(encode("weights.probe", Weights("probe", "probe_v1", 2, {}, b"w"), "trainer"))
        return bool(_seen(pad, 0.2))

    wait_for(drive, 20, "the gamepad agent never got the player's action")
    assert _seen(spy, 0.5) == []  # neither the weights nor the actions

    # the secure control port: no snapshot of a family the role may not read
    ctl = _secure(ctx, keys, "cap-1", zmq.DEALER, ports["secure_control"])
    ctl.send_multipart([b"snapshot", b"weights"])
    assert ctl.poll(5000)
    assert ctl.recv_multipart() == [b"!end"]
    assert _refused(http, "forbidden_subscription", "capture_agent") == 5

    # revoke the capture agent's key: SIGHUP, and its next message is refused
    (keys / "allowed" / "cap-1.key").unlink()
    os.kill(proc.pid, signal.SIGHUP)
    wait_for(lambda: scrape(http).value("charles_broker_allowed_keys") == 2, 10, "keys not reloaded")
    cap.send_multipart(encode("heartbeat.cap-1", Heartbeat("capture_agent", "cap-1"), "cap-1"))
    wait_for(lambda: _refused(http, "revoked_key", "none") == 1, 10, "revoked key not refused")
    late = _secure(ctx, keys, "cap-1", zmq.DEALER, ports["secure_control"])
    late.send_multipart([b"snapshot", b"heartbeat"])
    assert not late.poll(1500)  # the handshake itself is refused now
    wait_for(lambda: scrape(http).value("charles_broker_auth_failures_total") >= 1, 10, "handshake counted")

    m = scrape(http)
    by_reason = m.by("charles_rejects_total", "reason")
    assert by_reason == {
        "forbidden_topic": 54.0,
        "spoofed_sender": 1.0,
        "forbidden_subscription": 5.0,
        "revoked_key": 1.0,
        "unauthenticated": by_reason.get("unauthenticated", 0.0),
    }, by_reason
    assert by_reason["unauthenticated"] >= 1
    time.sleep(0.2)
    rss_growth_within({"broker": rss0}, {"broker": proc.pid}, "after the hostile keys")
    assert healthz(http)[1]["status"] == "ok"


def test_a_proxy_thread_that_dies_makes_the_broker_degraded(tmp_path):
    import threading

    from charles import config
    from charles.broker.broker import Broker
    from charles.runtime import Service

    keys = tmp_path / "keys"
    make_keys(keys, ["player"])
    data = {
        "bus": {
            "host": "127.0.0.1",
            "ports": random_bus_ports(),
            "keys_dir": str(keys),
        },
        "broker": {"secure": True, "secure_bind": "127.0.0.1"},
    }
    svc = Service("broker", config.load(data=data, environ={}), http=False, signals=False)
    b = Broker(svc, {"run": "degraded"})
    b.start()
    t = threading.Thread(target=b.serve, daemon=True)
    t.start()
    try:
        wait_for(lambda: svc.status == "ok", 10, "broker never ready")
        assert svc.health()["healthy"]
        b._proxy_controls[0].send(b"TERMINATE")  # the bus proxy ends, as if it had failed
        h = wait_for(lambda: (h := svc.health())["status"] == "degraded" and h, 10, "still ok")
        assert not h["healthy"] and h["dead_threads"] == ["proxy-bus"]
        b._bridge_stop.set()  # and the secure bridge too
        wait_for(lambda: svc.health()["dead_threads"] == ["secure-bridge", "proxy-bus"], 10, "bridge alive")
    finally:
        svc.stop()
        t.join(3)
        b.close()
        svc.close()
