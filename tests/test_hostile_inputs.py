"""Well-formed hostile input that once cost memory, counts or a thread: each refused and counted.

* a mod sending deeply nested JSON or a 400-digit number: the DeepGTAV feed thread died for good while its
  state said connected; now each is a counted bad message and the feed reconnects;
* one spoofed ``seq`` of 10**15 added 10**15 to drops{cause="seq_gap"}; 4096 rotating sender ids silently
  evicted the real senders' sequence state;
* 300 idle half-requests to /metrics were 300 threads; a dead worker thread left /healthz at 200.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import prometheus_client as prom
from test_agents import dataset, mod  # noqa: F401 - the mod fixture: a DeepGTAV server on loopback

from charles import config
from charles.agents.deepgtav import DeepGtavFeed, Scenario
from charles.runtime import HTTP_MAX_CONNECTIONS, HTTP_TIMEOUT_S, SeqGaps, Service

from survive_support import healthz, http_get, wait_for


def test_a_mod_message_that_breaks_the_parser_is_counted_and_the_feed_reconnects(mod):  # noqa: F811
    nested = b"[" * 100_000 + b"]" * 100_000  # RecursionError in json
    huge_int = json.dumps(
        {"speed": 10**400, "location": [10**400, 1, 2]}
    ).encode()  # OverflowError in float()
    srv = mod(poison=[nested, huge_int])
    feed = DeepGtavFeed(
        "127.0.0.1", srv.port, Scenario(), dataset(30, (21, 9)), backoff_min_s=0.05, backoff_max_s=0.1
    )
    events: list[str] = []
    feed.on_event = events.append
    feed.start()
    try:
        msg = feed.next(10.0)
        assert msg is not None and msg.frame is not None and msg.telemetry.speed == 15.0
        assert events.count("bad_message") == 2, events
        assert feed.connections == 3 and feed.state == "connected"
        assert feed._thread.is_alive()
    finally:
        feed.close()


def test_a_seq_jump_is_a_restart_and_sender_rotation_is_counted_not_silent():
    drops = prom.Counter("drops", "d", ["cause"], registry=prom.CollectorRegistry())
    gaps = SeqGaps(max_senders=64, drops=drops)
    for seq in range(10):
        gaps.see("collector-1", seq)
    assert gaps.see("collector-1", 10**15) == 0  # a lie (or a restart), not 10**15 lost messages
    assert gaps.missing == 0 and gaps.restarts == 1
    assert gaps.see("collector-1", 10**15 + 3) == 2  # and it follows from there
    # 4096 made-up senders: bounded state, each eviction counted, and the live sender stays (most recent)
    for i in range(4096):
        gaps.see(f"rogue-{i}", 1)
        if i % 32 == 0:
            gaps.see("collector-1", 10**15 + 4 + i // 32)
    assert len(gaps.last) == 64 and "collector-1" in gaps.last
    assert gaps.evicted == 4096 + 1 - 64 == drops.labels(cause="sender_evicted")._value.get()
    assert gaps.missing == 2 + (4095 // 32) * 0  # collector-1's seq kept moving by one: no gap invented


def _service() -> Service:
    cfg = config.load(data={"service": {"http_port": 0}}, environ={"CHARLES_HTTP_EPHEMERAL": "1"})
    return Service("hostile", cfg, "hostile-1", signals=False)


def test_idle_half_requests_cannot_pile_up_threads_and_time_out(monkeypatch):
    monkeypatch.setenv("CHARLES_HTTP_EPHEMERAL", "1")
    svc = _service()
    threads0 = threading.active_count()
    socks = []
    try:
        for _ in range(300):  # a request line and no end: each held a thread for ever
            s = socket.create_connection(("127.0.0.1", svc.http_port))
            s.sendall(b"GET /metrics HTTP/1.1\r\n")
            socks.append(s)
        for _ in range(10):  # while they wait, the server's threads stay capped
            assert threading.active_count() - threads0 <= HTTP_MAX_CONNECTIONS + 1  # + the accept thread
            time.sleep(0.1)
        refused = wait_for(
            lambda: svc.metrics.registry.get_sample_value("charles_rejects_total", {"reason": "http_busy"}),
            10,
            "over-cap connections not counted",
        )
        assert refused >= 1
        # the idle ones time out, and then /metrics answers again
        code = wait_for(lambda: _get(svc.http_port), HTTP_TIMEOUT_S + 10, "/metrics never came back")
        assert code == 200
    finally:
        for s in socks:
            s.close()
        svc.close()


def _get(port: int) -> int:
    try:
        return http_get(port, "/metrics", timeout=1.0)[0]
    except OSError:
        return 0


def test_a_dead_vital_thread_makes_the_service_degraded(monkeypatch):
    monkeypatch.setenv("CHARLES_HTTP_EPHEMERAL", "1")
    svc = _service()
    try:
        svc.ready()
        worker = svc.vital(threading.Thread(target=lambda: None, name="worker"))
        worker.start()
        worker.join()
        code, h = healthz(svc.http_port)
        assert code == 503 and h["status"] == "degraded" and h["dead_threads"] == ["worker"]
    finally:
        svc.close()
