"""Shared fixtures: free loopback ports, an in-process broker, a config pointing at it."""

from __future__ import annotations

import os
import socket
import threading

import pytest

os.environ.setdefault("CHARLES_HTTP_EPHEMERAL", "1")  # never collide with a running `make run`
# One OpenMP thread per process: on a 2-core box spinning OpenMP workers of parallel test processes
# (trainer, player, sim subprocesses) slow everything several-fold. Children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def bus_ports() -> dict[str, int]:
    names = ["publish", "subscribe", "control", "secure_publish", "secure_subscribe", "secure_control"]
    return dict(zip(names, free_ports(len(names)), strict=True))


@pytest.fixture
def broker(bus_ports):
    """A broker running in this process on random loopback ports; yields (broker, config data)."""
    from charles import config
    from charles.broker.broker import Broker
    from charles.runtime import Service

    data = {"bus": {"host": "127.0.0.1", "ports": bus_ports}, "service": {"http_port": 0, "shutdown_s": 2}}
    cfg = config.load(data=data, environ={})
    svc = Service("broker", cfg, http=False, signals=False)
    b = Broker(svc, cfg.to_dict())
    b.start()
    t = threading.Thread(target=b.serve, daemon=True)
    t.start()
    yield b, data
    svc.stop()
    t.join(timeout=3)
    b.close()
    svc.close()


@pytest.fixture
def client_factory(broker):
    """Make client Services connected to the test broker; closed at the end."""
    from charles import config
    from charles.runtime import Service

    made = []

    def make(name: str = "client", **overrides):
        _, data = broker
        d = {**data, **overrides}
        svc = Service(name, config.load(data=d, environ={}), http=False, signals=False)
        made.append(svc)
        return svc

    yield make
    for s in made:
        s.close()
