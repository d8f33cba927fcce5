"""The service runtime: /metrics and /healthz over real HTTP, heartbeats on the bus, bounded reject logs."""

from __future__ import annotations

import json
import logging
import urllib.request

from charles.proto import Heartbeat

from tests_support import wait_for


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_metrics_health_and_extra_routes_over_http(broker):
    from charles import config
    from charles.runtime import Service

    _, data = broker
    svc = Service("collector", config.load(data=data, environ={}), signals=False)
    try:
        svc.http_routes["/hello.txt"] = lambda: (b"hi", "text/plain")
        sub = svc.subscriber(["heartbeat"], late_join=False)
        code, body = _get(svc.http_port, "/healthz")
        health = json.loads(body)
        assert (
            code == 200 and health["status"] == "starting" and health["topics"]["heartbeat"]["alive"] is False
        )
        svc.ready()
        svc.reject("nan", "a test reject")
        code, body = _get(svc.http_port, "/metrics")
        assert code == 200
        text = body.decode()
        assert "charles_up 1.0" in text and 'charles_rejects_total{reason="nan"} 1.0' in text
        assert _get(svc.http_port, "/hello.txt") == (200, b"hi")
        assert _get(svc.http_port, "/nope")[0] == 404
        svc.stop()
        code, body = _get(svc.http_port, "/healthz")
        assert code == 503 and json.loads(body)["healthy"] is False
        del sub
    finally:
        svc.close()


def test_heartbeats_arrive_and_mark_the_topic_alive(client_factory):
    beating = client_factory("balancer", service={"heartbeat_s": 0.1})
    beating.info.update({"sets": 3, "ignored": [1, 2]})
    beating.ready()
    beating.start_heartbeat()
    watcher = client_factory("watcher")
    sub = watcher.subscriber(["heartbeat"], late_join=False)
    got: list[Heartbeat] = []

    def seen():
        env = sub.recv(100)
        if env is not None and env.msg.instance == beating.instance:
            got.append(env.msg)
        return bool(got)

    wait_for(seen, 5, "no heartbeat")
    hb = got[0]
    assert hb.service == "balancer" and hb.state == "ok" and hb.info == {"sets": 3}  # only scalars travel
    assert watcher.health()["topics"]["heartbeat"]["alive"] is True


def test_reject_logs_are_rate_limited(caplog):
    from charles.runtime import RateLimitedLog

    log = RateLimitedLog(logging.getLogger("t"), period_s=60)
    with caplog.at_level(logging.WARNING):
        for _ in range(1000):
            log.warn("nan", "bad")
        log.warn("oversize", "big")
    assert [r.getMessage() for r in caplog.records] == ["bad", "big"]
