"""Helpers for the survival tests (tests/test_survive_*.py): real processes, their HTTP side, memory, kills.

Every check reads what an operator would: ``/healthz``, ``/metrics`` (Prometheus text), ``/state``, the
process table (``/proc``) and the files on disk. Waits poll with generous deadlines: the box is shared
and noisy, so a test waits for an *outcome*, never for a fixed time to pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from prometheus_client.parser import text_string_to_metric_families

from charles.runtime import free_ports

_HTTP_LINE = re.compile(r"(?:/metrics and /healthz|stream page) on http://127\.0\.0\.1:(\d+)")
_BUS_LINE = re.compile(r"broker up: ((?:\w+=\d+, )*\w+=\d+)")


def wait_for(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    """Poll until pred() returns something true (and return it); fail naming ``what`` after timeout s."""
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got:
            return got
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s: {what}")
        time.sleep(interval)


# ---------------------------------------------------------------------------------------------- HTTP


def http_get(port: int, path: str, timeout: float = 3.0) -> tuple[int, bytes]:
    """(status, body); a refused or timed-out connection raises OSError."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:  # 503 from /healthz is an answer, not a failure to connect
        return e.code, e.read()


def healthz(port: int) -> tuple[int, dict]:
    code, body = http_get(port, "/healthz")
    return code, json.loads(body)


def is_healthy(port: int) -> bool:
    """/healthz answers 200 (False while nothing answers yet)."""
    try:
        return healthz(port)[0] == 200
    except (OSError, ValueError):
        return False


def state(port: int) -> dict:
    return json.loads(http_get(port, "/state")[1])


class Scrape:
    """One /metrics scrape: samples by name, summed over the labels a query leaves open."""

    def __init__(self, text: str):
        self.samples: list[tuple[str, dict[str, str], float]] = []
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                self.samples.append((s.name, dict(s.labels), float(s.value)))

    def value(self, name: str, **labels: str) -> float:
        return sum(
            v for n, lab, v in self.samples if n == name and all(lab.get(k) == x for k, x in labels.items())
        )

    def by(self, name: str, label: str) -> dict[str, float]:
        """{label value: value} of one family, e.g. rejects by reason."""
        out: dict[str, float] = {}
        for n, lab, v in self.samples:
            if n == name and label in lab:
                out[lab[label]] = out.get(lab[label], 0.0) + v
        return out

    @property
    def pid(self) -> int:
        for n, lab, _ in self.samples:
            if n == "charles_service_info" and "pid" in lab:
                return int(lab["pid"])
        raise AssertionError("no charles_service_info{pid} in the scrape")


def scrape(port: int) -> Scrape:
    code, body = http_get(port, "/metrics")
    assert code == 200, f"/metrics on {port} answered {code}"
    return Scrape(body.decode())


# ---------------------------------------------------------------------------------------------- processes


def rss_mb(pid: int) -> float:
    """Resident memory of a process (VmRSS), MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


RSS_GROWTH_MB = 50.0
"""What a hostile barrage may cost a service in memory, from warmed up to after it."""
RESTING_S = 3.0
"""How long :func:`resting_rss_mb` watches: a trainer's checkpoint-and-publish peak lasts under a second."""


def resting_rss_mb(pids: dict[str, int], window_s: float = RESTING_S) -> dict[str, float]:
    """Each process's lowest RSS over ``window_s`` (read every 0.1 s), MiB: the memory it keeps.

    One reading can land on work in flight and say nothing about what lasts: the survive pipeline's trainer
    sits at ~825 MiB and stands at ~880 for a few tenths of a second each time it checkpoints and publishes
    (every 3 batches there, a second or two apart). What a hostile message leaves behind is still there at the lowest point.
    """
    low = {n: rss_mb(pid) for n, pid in pids.items()}
    end = time.monotonic() + window_s
    while time.monotonic() < end:
        time.sleep(0.1)
        for n, pid in pids.items():
            low[n] = min(low[n], rss_mb(pid))
    return low


def rss_growth_within(
    before: dict[str, float],
    pids: dict[str, int],
    what: str,
    exempt: Iterable[str] = (),
    limit_mb: float = RSS_GROWTH_MB,
) -> dict[str, float]:
    """Read every process's RSS now and hold its growth since ``before`` (rss_mb by name) to ``limit_mb``;
    ``exempt`` ones are read and reported, not held. The readings are resting ones (:func:`resting_rss_mb`):
    what a process keeps, not a peak of work in flight. Returns them; the assertion names every figure."""
    after = resting_rss_mb(pids)
    figures = ", ".join(f"{n} {before[n]:.0f} -> {after[n]:.0f} ({after[n] - before[n]:+.0f})" for n in after)
    print(f"RSS MiB {what}: {figures}")
    over = [n for n in after if n not in exempt and after[n] - before[n] > limit_mb]
    assert not over, f"{', '.join(over)} grew more than {limit_mb:.0f} MiB {what}; RSS MiB: {figures}"
    return after


def running(pid: int) -> bool:
    """Alive and not a zombie (a killed child its parent has not reaped yet still has a pid)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def kill9(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not running(pid), 10, f"pid {pid} still runs after SIGKILL")


def service_env(bus_ports: dict[str, int], http_port: int, **extra: str) -> dict[str, str]:
    """The environment the launcher gives a service (see charles.launcher), for starting one by hand."""
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": "1",
        "CHARLES__BUS__HOST": "127.0.0.1",
        "CHARLES__BUS__PORTS": json.dumps(bus_ports),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        **extra,
    }


def overrides(*settings: str) -> list[str]:
    """``--set a=1 --set b=2`` for a service's command line."""
    return [x for item in settings for x in ("--set", item)]


def start_service(module: str, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, *args], env=env, stdout=out, stderr=subprocess.STDOUT
        )


def stop(proc: subprocess.Popen, timeout: float = 15.0) -> int:
    """SIGTERM, then SIGKILL after timeout; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def start_broker(
    log: Path, *settings: str, timeout: float = 60.0
) -> tuple[subprocess.Popen, dict[str, int], int]:
    """A broker process on random free ports, healthy: (process, bus ports, http port).

    A free port can be taken by someone else before the broker binds it: then it starts once more on new
    ports. A broker that exits raises with the end of its log, so the reason is in the failure."""
    from conftest import random_bus_ports

    for attempt in range(2):
        ports, http = random_bus_ports(), free_ports(1)[0]
        proc = start_service("charles.broker", overrides(*settings), service_env(ports, http), log)

        def up(proc: subprocess.Popen = proc, http: int = http) -> bool:
            if proc.poll() is not None:
                raise RuntimeError(f"the broker exited with {proc.returncode}:\n{log.read_text()[-2000:]}")
            return is_healthy(http)

        try:
            wait_for(up, timeout, "the broker never became healthy")
            return proc, ports, http
        except BaseException:
            stop(proc)
            if attempt or "in use" not in log.read_text():
                raise
    raise AssertionError("unreachable")


# ---------------------------------------------------------------------------------------------- the pipeline


class Pipeline:
    """``charles up --random-ports`` in a subprocess, with one run configuration for every service.

    Each service's HTTP port and the bus ports are read from the logs (the launcher keeps them across
    restarts); pids from each service's ``charles_service_info{pid}``.
    """

    def __init__(self, root: Path, config: dict, collectors: int, extra: Iterable[str] = ()):
        self.root = root
        self.logs = root / "logs"
        self.run_dir = root / "runs"
        self.config = root / "config.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.collectors = [f"collector-{i}" for i in range(1, collectors + 1)]
        self.names = ["broker", *self.collectors, "balancer", "trainer", "player", "viewer"]
        cmd = [
            sys.executable, "-m", "charles.cli", "up", "--random-ports", "--plain",
            "--collectors", str(collectors), "--preset", "tiny", "--config", str(self.config),
            "--run-dir", str(self.run_dir), "--logs", str(self.logs), *extra,
        ]  # fmt: skip
        env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
        self.out = open(root / "launcher.out", "ab")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.out, stderr=subprocess.STDOUT)
        self._ports: dict[str, int] = {}
        self.bus_ports: dict[str, int] = {}

    def log(self, name: str) -> str:
        p = self.logs / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    def port(self, name: str) -> int:
        if name not in self._ports:
            m = wait_for(lambda: _HTTP_LINE.search(self.log(name)), 90, f"{name} never served HTTP")
            self._ports[name] = int(m.group(1))
        return self._ports[name]

    def bus(self) -> dict[str, int]:
        if not self.bus_ports:
            m = wait_for(lambda: _BUS_LINE.search(self.log("broker")), 60, "the broker never came up")
            self.bus_ports = {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split(", "))}
        return self.bus_ports

    def scrape(self, name: str) -> Scrape:
        return scrape(self.port(name))

    def state(self, name: str) -> dict:
        return state(self.port(name))

    def try_scrape(self, name: str) -> Scrape | None:
        try:
            return self.scrape(name)
        except (OSError, AssertionError, ValueError):
            return None

    def pid(self, name: str) -> int:
        return wait_for(lambda: (s := self.try_scrape(name)) and s.pid, 90, f"{name} never answered /metrics")

    def pids(self) -> dict[str, int]:
        return {n: self.pid(n) for n in self.names}

    def healthy(self, name: str) -> bool:
        try:
            code, h = healthz(self.port(name))
        except (OSError, ValueError):
            return False
        return code == 200 and h["healthy"]

    def restarted(self, name: str, old_pid: int, timeout: float = 90) -> int:
        """Wait until the launcher has started ``name`` again and it answers; returns its new pid."""

        def new_pid() -> int | None:
            assert self.proc.poll() is None, f"the launcher exited ({self.proc.returncode})"
            s = self.try_scrape(name)
            return s.pid if s is not None and s.pid != old_pid and self.healthy(name) else None

        return wait_for(new_pid, timeout, f"{name} was not restarted after pid {old_pid} died", interval=0.25)

    def close(self) -> int | None:
        rc = stop(self.proc, timeout=60)
        self.out.close()
        return rc


# ---------------------------------------------------------------------------------------------- bus probe


class Probe:
    """A subscriber in the test process that notes what crosses the bus: topic -> (count, last time).

    It keeps counts and times, never the messages (sets and frames would pile up otherwise), and looks
    into every sample set for a marked collector id (hostile data must never reach the trainer).
    """

    def __init__(self, bus_ports: dict[str, int], prefixes: list[str], marker: str = "hostile"):
        from charles import config
        from charles.runtime import Service

        data = {"bus": {"host": "127.0.0.1", "ports": bus_ports}, "service": {"reject_log_period_s": 60}}
        self.svc = Service("probe", config.load(data=data, environ={}), "probe", http=False, signals=False)
        self.sub = self.svc.subscriber(prefixes, hwm=10000, late_join=False)
        self.marker = marker
        self.count: Counter[str] = Counter()
        self.last: dict[str, float] = {}
        self.marked = 0
        self.weights_batches: list[int] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="probe", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from charles.proto import SampleSet, Weights

        while not self._stop.is_set():
            env = self.sub.recv(100)
            if env is None:
                continue
            marked = 0
            if isinstance(env.msg, SampleSet):
                marked = sum(self.marker in s.collector for s in env.msg.samples)
            elif self.marker in getattr(env.msg, "collector", ""):
                marked = 1
            with self._lock:
                self.count[env.topic] += 1
                self.last[env.topic] = time.monotonic()
                self.marked += marked
                if isinstance(env.msg, Weights):
                    self.weights_batches.append(env.msg.batch)

    def since(self, topic: str, t: float) -> bool:
        """A message on ``topic`` (exactly) arrived after monotonic time t."""
        with self._lock:
            return self.last.get(topic, -1.0) > t

    def topics_since(self, prefix: str, t: float) -> set[str]:
        with self._lock:
            return {k for k, v in self.last.items() if k.startswith(prefix) and v > t}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.svc.close()


# ---------------------------------------------------------------------------------------------- fork server


def forkserver_main(module: str, warm: list[str]) -> None:
    """Import a service's heavy modules once, then fork a fresh process per request (see ForkServer).

    Protocol on stdin/stdout, one JSON object a line: ``{"argv", "env", "log"}`` -> ``{"pid"}``;
    ``{"wait": pid}`` -> ``{"status"}`` (reaps a child the test killed).
    """
    import importlib

    main = importlib.import_module(module).main
    for name in warm:
        importlib.import_module(name)
    from charles.version import code_version

    code_version()  # cached: no `git describe` per child
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        req = json.loads(line)
        if "wait" in req:
            _, status = os.waitpid(req["wait"], 0)
            print(json.dumps({"status": status}), flush=True)
            continue
        sys.stdout.flush()
        pid = os.fork()
        if pid == 0:  # the child: its own log, its environment, the service's real main and real exit
            try:
                fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
                os.dup2(fd, 1)
                os.dup2(fd, 2)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.environ.update(req["env"])
            except BaseException:  # noqa: BLE001 - report and leave: this is a child, never return to the loop
                import traceback

                traceback.print_exc()
                os._exit(1)
            from charles.runtime import run_main

            run_main(main, req["argv"])  # never returns: the exit path of `python -m`, exit status main's
        print(json.dumps({"pid": pid}), flush=True)


class ForkServer:
    """Starts service processes in milliseconds instead of seconds (torch and timm imported once).

    The trainer's entry point (``main(argv)``) runs in a fork of a process that has only imported modules:
    no threads, no sockets, no CUDA, so the child is the same process ``python -m`` would have made, minus
    the 3-10 s of imports a test that restarts it twenty times cannot afford.
    """

    def __init__(self, module: str, warm: Iterable[str] = ()):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parent)}
        code = f"import survive_support as s; s.forkserver_main({module!r}, {list(warm)!r})"
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert json.loads(self._readline(120)).get("ready"), "the fork server did not start"

    def _readline(self, timeout: float) -> str:
        out: list[str] = []
        t = threading.Thread(target=lambda: out.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not out or not out[0]:
            raise AssertionError(f"the fork server did not answer (exit status {self.proc.poll()})")
        return out[0]

    def _ask(self, req: dict, timeout: float = 30) -> dict:
        self.proc.stdin.write(json.dumps(req) + "\n")
        self.proc.stdin.flush()
        return json.loads(self._readline(timeout))

    def start(self, argv: list[str], env: dict[str, str], log: Path) -> int:
        return self._ask({"argv": argv, "env": env, "log": str(log)})["pid"]

    def reap(self, pid: int, timeout: float = 30) -> int:
        """Wait for a child to end (killed or stopped) and return its wait status."""
        return self._ask({"wait": pid}, timeout)["status"]

    def close(self) -> None:
        self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------- stops

SHUTDOWN_S = 10.0
"""service.shutdown_s of every process a Stopper starts: the budget a stop must keep."""


@dataclass
class Stopper:
    """Starts one service again and again from a fork server and stops it with SIGTERM: exit 0 within
    SHUTDOWN_S each time (tests/test_survive_stops.py, tests/test_survive_build_stop.py)."""

    module: str
    argv: list[str]
    env: dict[str, str]
    tmp: Path
    warm: list[str] = field(default_factory=list)
    stops: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        (self.http_port,) = free_ports(1)
        self.env = {
            **self.env,
            "CHARLES__SERVICE__HTTP_PORT": str(self.http_port),
            "CHARLES__SERVICE__SHUTDOWN_S": str(SHUTDOWN_S),
            "CUDA_VISIBLE_DEVICES": "",
        }
        self.server = ForkServer(self.module, self.warm)

    def healthy(self) -> bool:
        try:
            code, h = healthz(self.http_port)
        except (OSError, ValueError):
            return False
        return code == 200 and h["healthy"]  # starting and waiting (for weights, actions) are healthy

    def cycle(
        self,
        k: int,
        argv: list[str] | None = None,
        busy: Callable[[Path], None] | None = None,
        sending: str | None = None,
    ) -> Path:
        """One start, ready (and busy, if given), SIGTERM, reaped: exit 0 inside the budget. Returns the log."""
        log = self.tmp / f"{Path(self.module).stem}-{k}.log"
        pid = self.server.start(argv if argv is not None else self.argv, self.env, log)

        def up() -> bool:
            assert running(pid), (
                f"start #{k} exited before it was healthy:\n{log.read_text(errors='replace')[-3000:]}"
            )
            # ``sending`` (the topic family it publishes): stop once it sends, in its loop, not while it
            # starts (a sim's town build; tests/test_survive_build_stop.py stops one there)
            if sending is not None and self.healthy():
                return (
                    scrape(self.http_port).value("charles_messages_total", direction="out", topic=sending) > 0
                )
            return sending is None and self.healthy()

        wait_for(up, 60, f"start #{k} never became healthy ({log})")
        if busy is not None:
            busy(log)
        t0 = time.monotonic()
        os.kill(pid, signal.SIGTERM)
        try:
            status = self.server.reap(pid, timeout=SHUTDOWN_S + 30)
        except AssertionError as e:  # it hung past both watchdogs: fail, and leave no stray process behind
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            raise AssertionError(
                f"start #{k} did not end after SIGTERM\n{log.read_text(errors='replace')[-3000:]}"
            ) from e
        took = time.monotonic() - t0
        tail = log.read_text(errors="replace")[-3000:]
        assert os.waitstatus_to_exitcode(status) == 0, (
            f"start #{k}: exit {os.waitstatus_to_exitcode(status)}\n{tail}"
        )
        assert took < SHUTDOWN_S, f"start #{k} took {took:.1f}s to stop\n{tail}"
        self.stops.append(took)
        return log

    def report(self, name: str) -> None:
        s = sorted(self.stops)
        print(f"{name}: {len(s)} stops, exit 0 each, median {s[len(s) // 2]:.2f}s, max {s[-1]:.2f}s")

    def close(self) -> None:
        self.server.close()
