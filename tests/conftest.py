"""Shared fixtures: free loopback ports, an in-process broker, a config pointing at it; the switch that
turns a missing system tool from a skip into a failure in CI."""

from __future__ import annotations

import json
import os
import shutil
import threading
from typing import NoReturn

import pytest

from charles.runtime import free_ports  # tests import it from here too

os.environ.setdefault("CHARLES_HTTP_EPHEMERAL", "1")  # never collide with a running `make run`
# One OpenMP thread per process: on a 2-core box spinning OpenMP workers of parallel test processes
# (trainer, player, sim subprocesses) slow everything several-fold. Children inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REQUIRE_TOOLS = os.environ.get("CHARLES_REQUIRE_TOOLS") == "1"
"""Set by .ci/run, which installs every system tool the tests drive: a missing one fails there instead of
skipping, so a green CI means the checks that need them ran."""


OPT_IN = ("system", "compose")
"""Markers whose tests run only when -m names them: `make test-system` (whole pipelines: `charles up` under
Prometheus, the e2e bench in miniature, barrages of kills, stops and hostile runs: minutes) and `make test-compose` (images and the docker-compose stack: tens of
minutes, a Docker daemon). CI runs both as steps of their own after `make test`, which keeps its time."""


def pytest_collection_modifyitems(config, items):
    named = config.getoption("markexpr") or ""
    drop = [m for m in OPT_IN if m not in named]
    keep = [item for item in items if not any(item.get_closest_marker(m) for m in drop)]
    if len(keep) != len(items):
        config.hook.pytest_deselected(items=[item for item in items if item not in keep])
        items[:] = keep


def missing_tool(what: str) -> NoReturn:
    """Skip a test whose system tool is not installed (fail under CHARLES_REQUIRE_TOOLS=1)."""
    if REQUIRE_TOOLS:
        pytest.fail(f"{what}; CHARLES_REQUIRE_TOOLS=1 says it must be here", pytrace=False)
    pytest.skip(what)


def require_tool(*names: str, install: str) -> str:
    """The path of the first of names on PATH; missing_tool() when none is, saying how to install it."""
    for name in names:
        if path := shutil.which(name):
            return path
    missing_tool(f"{' or '.join(names)} is not installed; install it with {install}")


def random_bus_ports() -> dict[str, int]:
    """A free loopback port for every broker port the registry names (a port left out would be the
    registry's fixed one, which parallel tests and a running `make run` share)."""
    from charles.proto import registry

    names = list(registry().ports)
    return dict(zip(names, free_ports(len(names)), strict=True))


@pytest.fixture
def bus_ports() -> dict[str, int]:
    return random_bus_ports()


@pytest.fixture
def broker(bus_ports, request):
    """A broker running in this process on random loopback ports; yields (broker, config data).

    Parametrize it indirectly with a map to change its ``broker`` section."""
    from charles import config
    from charles.broker.broker import Broker
    from charles.runtime import Service

    data = {"bus": {"host": "127.0.0.1", "ports": bus_ports}, "service": {"http_port": 0, "shutdown_s": 2}}
    cfg = config.load(data={**data, "broker": getattr(request, "param", None) or {}}, environ={})
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


@pytest.fixture
def stopper(broker, tmp_path):
    """Make survive_support.Stoppers on the test broker: a service's real entry point, started from a fork
    server and stopped with SIGTERM (``stopper(module, argv, warm_imports, **env)``); closed at the end."""
    from survive_support import Stopper

    _, data = broker
    made: list[Stopper] = []

    def make(module: str, argv: list[str], warm: list[str] = (), **env: str) -> Stopper:
        base = {"CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]), **env}
        s = Stopper(module, argv, base, tmp_path, list(warm))
        made.append(s)
        return s

    yield make
    for s in made:
        s.close()


_exit_status: list[int] = []


def pytest_sessionfinish(session, exitstatus) -> None:
    _exit_status.append(int(exitstatus))


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config) -> None:
    """End the test process the way every Charles process ends (charles.runtime.run_main): streams flushed,
    then os._exit with pytest's status. In-process brokers and clients leave daemon threads that may sit in
    native code; Python's finalization kills such a thread by unwinding C++ frames (std::terminate, SIGABRT)
    after the summary was already printed green. Under xdist workers or an embedding caller, do nothing."""
    if not _exit_status or os.environ.get("PYTEST_XDIST_WORKER") or config.pluginmanager.has_plugin("xdist"):
        return
    from charles.runtime import exit_process

    exit_process(_exit_status[-1])
