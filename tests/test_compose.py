"""`docker-compose up` for real: the images built from this checkout, the CPU stack started, scaled,
restarted and torn down, every step judged by a value read from the running stack.

Marked ``compose``: plain ``make test`` deselects it (tests/conftest.py); ``make test-compose`` runs it
and .ci/run does after ``make test``. It needs a Docker daemon, Debian's docker-compose 1.29 (or Compose
v2) and, where the pinned images cannot be pulled, debootstrap (root) for the local base image.

One stack per module under a project name of its own (so it never touches another stack's containers or
volumes), started from docker-compose.yml as a user starts it, plus a test override that only shrinks the
run configuration (tiny buffers, early publishing) so trained weights reach the player in a minute. Each
phase's time and every value read go to runs/compose-test/phases.json, which `make test-compose` prints.

Grafana is started (and checked) only where its image is present or can be pulled: no registry here, and
Grafana is no Debian package. What CI cannot prove here at all: the GPU setup (docker-compose.gpu.yml,
the NVIDIA runtime).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

from charles.proto import registry

from survive_support import Scrape

# the first step builds the images (cold: tens of minutes); the others wait for a loaded box
pytestmark = [pytest.mark.compose, pytest.mark.slow, pytest.mark.timeout(5400)]

ROOT = Path(__file__).resolve().parent.parent
DOCKER = os.environ.get("DOCKER", "docker")
SERVICES = [
    "broker",
    "collector",
    "balancer",
    "trainer",
    "player",
    "viewer",
    "judge",
    "tensorboard",
    "prometheus",
]
DASHBOARDS = {"viewer": 9105, "tensorboard": 6006, "prometheus": 9090, "grafana": 3000}
GRAFANA_IMAGE = os.environ.get("GRAFANA_IMAGE", "grafana/grafana:11.6.0")
HEALTHY_S = 900
"""Every container healthy: the trainer's start period is 180 s; on a loaded 2-core box imports are slow."""

# Only the run configuration changes, through each container's environment (CHARLES__*): buffers of 64
# that train at a quarter full, weights every other batch, a checkpoint every 20.
OVERRIDE = """
services:
  trainer:
    environment:
      CHARLES__TRAINER__BATCH_SIZE: "8"
      CHARLES__TRAINER__PUBLISH_EVERY: "2"
      CHARLES__TRAINER__CHECKPOINT_EVERY: "20"
      CHARLES__TRAINER__BUFFER__CAPACITY: "64"
      CHARLES__TRAINER__BUFFER__START_FRACTION: "0.25"
  balancer:
    environment:
      CHARLES__BALANCER__SET_TIMEOUT_S: "1.0"
"""

PHASES: dict[str, float] = {}
READ: dict[str, object] = {}


def _compose_cmd() -> list[str]:
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    return ["docker", "compose"]


def _run(cmd: list[str], timeout: float = 600, env: dict | None = None, check: bool = True) -> str:
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} exited {p.returncode}:\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
        )
    return p.stdout


def wait_for(pred, timeout: float, what: str, interval: float = 2.0):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        try:
            v = pred()
        except (OSError, ValueError, KeyError, AssertionError, subprocess.SubprocessError) as e:
            v, last = None, e
        if v:
            return v
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s: {what} (last error: {last!r})")


def http(port: int, path: str, timeout: float = 5.0) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


class Stack:
    """docker-compose on docker-compose.yml (+ the test override) under one project name."""

    def __init__(self, tmp: Path, services: list[str], prometheus_image: str):
        self.project = f"charlestest{uuid.uuid4().hex[:8]}"
        self.services = services
        override = tmp / "docker-compose.test.yml"
        override.write_text(OVERRIDE)
        self.files = ["-f", str(ROOT / "docker-compose.yml"), "-f", str(override)]
        self.env = {
            **os.environ,
            "COMPOSE_PROJECT_NAME": self.project,
            "PROMETHEUS_IMAGE": prometheus_image,
            "GRAFANA_IMAGE": GRAFANA_IMAGE,
        }

    def compose(self, *args: str, timeout: float = 600) -> str:
        cmd = [*_compose_cmd(), "--project-directory", str(ROOT), *self.files, *args]
        return _run(cmd, timeout=timeout, env=self.env)

    def up(self, *extra: str) -> str:
        return self.compose("up", "-d", "--no-build", *extra, *self.services)

    def _filter(self, kind: str, service: str | None = None) -> list[str]:
        """Ids of this project's containers (kind ps), volumes or networks, by compose's labels."""
        cmd = [DOCKER, "ps", "-a", "-q"] if kind == "ps" else [DOCKER, kind, "ls", "-q"]
        cmd += ["--filter", f"label=com.docker.compose.project={self.project}"]
        if service:
            cmd += ["--filter", f"label=com.docker.compose.service={service}"]
        return _run(cmd).split()

    def containers(self, service: str | None = None) -> list[str]:
        return self._filter("ps", service)

    def volumes(self) -> list[str]:
        return self._filter("volume")

    def networks(self) -> list[str]:
        return self._filter("network")

    def inspect(self, cid: str) -> dict:
        return json.loads(_run([DOCKER, "inspect", cid]))[0]

    def health(self) -> dict[str, str]:
        out = {}
        for cid in self.containers():
            d = self.inspect(cid)
            name = d["Config"]["Labels"]["com.docker.compose.service"]
            num = d["Config"]["Labels"].get("com.docker.compose.container-number", "1")
            out[f"{name}_{num}"] = (d["State"].get("Health") or {}).get("Status", d["State"]["Status"])
        return out

    def get(self, service: str, port: int, path: str) -> bytes:
        """An HTTP GET inside a service's (first) container: its /metrics and /state are not published."""
        cid = self.containers(service)[0]
        code = (
            "import sys, urllib.request as u; "
            f"sys.stdout.buffer.write(u.urlopen('http://127.0.0.1:{port}{path}', timeout=5).read())"
        )
        p = subprocess.run([DOCKER, "exec", cid, "python", "-c", code], capture_output=True, timeout=30)
        assert p.returncode == 0, p.stderr.decode(errors="replace")[-2000:]
        return p.stdout

    def metrics(self, service: str) -> Scrape:
        port = registry().services[service].http_port
        return Scrape(self.get(service, port, "/metrics").decode())

    def state(self, service: str) -> dict:
        return json.loads(self.get(service, registry().services[service].http_port, "/state"))

    def logs(self, service: str, since: str | None = None) -> str:
        cid = self.containers(service)[0]
        p = subprocess.run(
            [DOCKER, "logs", *(["--since", since] if since else []), cid],
            capture_output=True,
            text=True,
            timeout=60,
        )
        return p.stdout + p.stderr


class Heartbeats:
    """A subscriber on the stack's bus (published on 127.0.0.1): the newest heartbeat of every instance."""

    def __init__(self):
        from charles import config
        from charles.runtime import Service

        ports = dict(registry().ports)
        data = {"bus": {"host": "127.0.0.1", "ports": ports}}
        self.svc = Service("compose-test", config.load(data=data, environ={}), http=False, signals=False)
        self.sub = self.svc.subscriber(["heartbeat."], hwm=1000, late_join=False)
        self.seen: dict[str, tuple[float, object]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="heartbeats", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        from charles.proto import Heartbeat

        while not self._stop.is_set():
            env = self.sub.recv(200)
            if env is not None and isinstance(env.msg, Heartbeat):
                with self._lock:
                    self.seen[env.msg.instance] = (time.monotonic(), env.msg)

    def since(self, service: str, t: float) -> dict[str, object]:
        """{instance: newest heartbeat} of a service's instances heard after monotonic time t."""
        with self._lock:
            return {i: hb for i, (ts, hb) in self.seen.items() if ts > t and hb.service == service}

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.svc.close()


def _docker_root() -> str:
    return _run([DOCKER, "info", "-f", "{{.DockerRootDir}}"]).strip() or "/var/lib/docker"


def _docker_free_gb() -> float:
    root = Path(_docker_root())
    while not root.exists():
        root = root.parent
    return shutil.disk_usage(root).free / 1e9


def _image_available(name: str) -> bool:
    if subprocess.run([DOCKER, "image", "inspect", name], capture_output=True).returncode == 0:
        return True
    return subprocess.run([DOCKER, "pull", "-q", name], capture_output=True, timeout=600).returncode == 0


def _prometheus_targets() -> list[dict]:
    code, body = http(9090, "/api/v1/targets?state=active")
    assert code == 200, body[:300]
    return json.loads(body)["data"]["activeTargets"]


def _trainer_resumed(text: str) -> tuple[int, int] | None:
    """(batch resumed at, samples refilled) from the newest trainer start in a log; None before both."""
    resumed = re.findall(r"resumed \S+ from batch_\d+ \(batch (\d+)\)", text)
    refilled = re.findall(r"refilled (\d+) samples", text)
    return (int(resumed[-1]), int(refilled[-1])) if resumed and refilled else None


# ---------------------------------------------------------------------------------------------- the stack


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    for tool in ("docker", "docker-compose"):
        if shutil.which(tool) is None and not (tool == "docker-compose" and shutil.which("docker")):
            pytest.fail(f"{tool} is not installed (apt-get install docker.io docker-compose debootstrap)")
    if subprocess.run([DOCKER, "info"], capture_output=True).returncode != 0:
        pytest.fail("no Docker daemon answers (start dockerd as root)")
    taken = []
    for port in [*registry().ports.values(), *DASHBOARDS.values()]:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                taken.append(port)
    assert not taken, f"host ports the stack publishes are taken: {taken} (another stack or `make run`?)"

    # A first build holds torch's venv twice (the deps stage and the image, 6 GB each with PyPI's CUDA
    # torch); a rebuild over a cached one adds megabytes. Say so up front rather than fail mid-build.
    free_gb, need_gb = _docker_free_gb(), (2 if _run([DOCKER, "images", "-q", "charles:cpu"]).strip() else 14)
    READ["free GB where Docker stores images, before the build"] = round(free_gb, 1)
    assert free_gb > need_gb, (
        f"only {free_gb:.1f} GB free where Docker stores images ({_docker_root()}), a build needs about"
        f" {need_gb} GB: `docker builder prune` and `docker image prune` make room"
    )
    t0 = time.monotonic()
    env = {**os.environ, "DOCKER": DOCKER}
    built = _run(["make", "images", "IMAGES=cpu", f"DOCKER={DOCKER}"], timeout=3600, env=env)
    PHASES["make images (base, CPU image, Prometheus)"] = time.monotonic() - t0
    READ["make images said"] = [line for line in built.splitlines() if line.startswith("==")]
    prometheus_image = _run(["deploy/prometheus-image.sh"], env=env).strip()
    services = list(SERVICES)
    if _image_available(GRAFANA_IMAGE):
        services.append("grafana")
    READ["services"] = services
    READ["prometheus image"] = prometheus_image
    s = Stack(tmp_path_factory.mktemp("compose"), services, prometheus_image)
    try:
        yield s
    finally:
        if s.containers() or s.volumes():
            subprocess.run(
                [
                    *_compose_cmd(),
                    "--project-directory",
                    str(ROOT),
                    *s.files,
                    "down",
                    "-v",
                    "--remove-orphans",
                ],
                cwd=ROOT,
                env=s.env,
                capture_output=True,
                timeout=300,
            )
        # `make test-compose` prints it after pytest's report
        out = ROOT / "runs" / "compose-test"
        out.mkdir(parents=True, exist_ok=True)
        (out / "phases.json").write_text(
            json.dumps({"phases_s": PHASES, "read": READ}, indent=2, default=str)
        )


@pytest.fixture(scope="module")
def heartbeats(stack):
    hb = Heartbeats()
    yield hb
    hb.close()


def _healthy(stack: Stack, expected: int) -> dict[str, str] | None:
    h = stack.health()
    return h if len(h) == expected and all(v == "healthy" for v in h.values()) else None


# ---------------------------------------------------------------------------------------------- the steps


def test_1_the_images_build_and_the_cpu_stack_starts(stack):
    size = int(_run([DOCKER, "image", "inspect", "-f", "{{.Size}}", "charles:cpu"]).strip())
    READ["charles:cpu size MB"] = round(size / 1e6)
    assert size > 100e6, size
    # Charles' own code is its own small layer on top of the dependencies' venv, so a code edit rebuilds
    # megabytes, not the venv's gigabytes (which, copied once per build, filled a CI disk).
    layers = [
        line.split("\t", 1)
        for line in _run(
            [
                DOCKER,
                "history",
                "--human=false",
                "--no-trunc",
                "--format",
                "{{.Size}}\t{{.CreatedBy}}",
                "charles:cpu",
            ]
        ).splitlines()
    ]
    code = [int(n) for n, made_by in layers if "/wheels/charles-" in made_by]
    READ["charles:cpu code layer MB"] = [round(n / 1e6, 1) for n in code]
    assert len(code) == 1 and code[0] < 30e6, layers[:6]
    t0 = time.monotonic()
    stack.up()
    PHASES["docker-compose up -d"] = time.monotonic() - t0
    by_service = {name: len(stack.containers(name)) for name in stack.services}
    READ["containers after up"] = by_service
    # collector: deploy.replicas 2 (the registry's replicas); everything else one container
    assert by_service == {name: (2 if name == "collector" else 1) for name in stack.services}
    limits = {}
    for cid in stack.containers():
        d = stack.inspect(cid)
        name = d["Config"]["Labels"]["com.docker.compose.service"]
        limits[name] = (d["HostConfig"]["Memory"], d["HostConfig"]["NanoCpus"])
        assert d["HostConfig"]["Memory"] > 0 and d["HostConfig"]["NanoCpus"] > 0, (name, limits[name])
    READ["limits (bytes, nano cpus)"] = limits
    for name, port in DASHBOARDS.items():
        if name in stack.services:
            bound = _run([DOCKER, "port", stack.containers(name)[0], str(port)]).split()
            assert bound == [f"127.0.0.1:{port}"], (name, bound)


def test_2_every_healthcheck_turns_healthy(stack):
    t0 = time.monotonic()
    expected = len(stack.containers())
    h = wait_for(
        lambda: _healthy(stack, expected), HEALTHY_S, f"every container healthy: {stack.health()}", 5
    )
    PHASES["up to every container healthy"] = time.monotonic() - t0
    READ["health"] = h


def test_3_weights_reach_the_player_and_every_dashboard_reads_the_stack(stack, heartbeats):
    t0 = time.monotonic()

    def trained() -> Scrape | None:
        m = stack.metrics("trainer")
        return m if m.value("charles_trainer_weights_published_total") >= 2 else None

    m = wait_for(trained, 600, "the trainer publishing trained weights")
    READ["trainer: batches, weights published"] = (
        m.value("charles_trainer_batches_total"),
        m.value("charles_trainer_weights_published_total"),
    )

    def driving() -> dict | None:
        players = heartbeats.since("player", time.monotonic() - 5)
        return {i: hb.info for i, hb in players.items() if hb.info.get("model_batch", -1) >= 1} or None

    players = wait_for(driving, 300, "the player's heartbeat naming a trained batch")
    READ["player heartbeat (bus)"] = players
    PHASES["trained weights driven by the player"] = time.monotonic() - t0

    code, page = http(9105, "/")
    assert code == 200 and b"<html" in page.lower(), page[:200]
    code, body = http(9105, "/api/state")
    snap = json.loads(body)
    player = snap["roles"].get("player")
    assert code == 200 and player in players, (player, list(players))
    assert snap["instances"][player]["service"] == "player"
    READ["viewer /api/state roles"] = snap["roles"]

    def all_up() -> list[dict] | None:
        targets = _prometheus_targets()
        jobs = {t["labels"]["job"] for t in targets}
        want = {"prometheus", *registry().services}
        ok = jobs >= want and all(t["health"] == "up" for t in targets)
        return targets if ok else None

    targets = wait_for(all_up, 120, "every Prometheus target up")
    READ["prometheus targets up"] = sorted(f"{t['labels']['job']} {t['scrapeUrl']}" for t in targets)
    code, body = http(9090, "/api/v1/rules?type=alert")
    alerts = sorted(r["name"] for g in json.loads(body)["data"]["groups"] for r in g["rules"])
    READ["prometheus alert rules"] = alerts
    assert code == 200 and len(alerts) == 4 and "CharlesServiceDown" in alerts, alerts
    if "grafana" in stack.services:
        code, body = http(3000, "/api/search?query=Charles")
        assert code == 200 and any(d.get("uid") == "charles" for d in json.loads(body)), body[:300]
    PHASES["reads (weights, player, viewer, Prometheus)"] = time.monotonic() - t0


def test_4_three_collectors_on_the_bus_and_in_prometheus(stack, heartbeats):
    t0 = time.monotonic()
    stack.up("--scale", "collector=3")
    assert len(stack.containers("collector")) == 3
    start = time.monotonic()
    ids = wait_for(
        lambda: (c := heartbeats.since("collector", start)) and len(c) == 3 and sorted(c),
        300,
        "three collector ids heartbeating on the bus",
    )
    READ["collector ids (bus)"] = ids

    def three_targets() -> list[str] | None:
        got = [t for t in _prometheus_targets() if t["labels"]["job"] == "collector" and t["health"] == "up"]
        return sorted(t["scrapeUrl"] for t in got) if len(got) == 3 else None

    READ["collector targets (Prometheus)"] = wait_for(three_targets, 180, "three collector targets up")
    PHASES["scale collector=3"] = time.monotonic() - t0


def test_5_the_trainer_resumes_after_a_restart_and_after_down_and_up(stack):
    t0 = time.monotonic()
    before = stack.metrics("trainer").value("charles_trainer_batch")
    since = _run([DOCKER, "inspect", "-f", "{{.State.StartedAt}}", stack.containers("trainer")[0]]).strip()
    stack.compose("restart", "trainer", timeout=300)
    started = _run([DOCKER, "inspect", "-f", "{{.State.StartedAt}}", stack.containers("trainer")[0]]).strip()
    assert started != since, "docker-compose restart did not restart the trainer"
    # /healthz answers while the trainer still loads its checkpoint: its log says when it resumed
    resumed, refilled = wait_for(
        lambda: _trainer_resumed(stack.logs("trainer", since=started)), HEALTHY_S, "the trainer resuming", 5
    )
    wait_for(lambda: _healthy(stack, len(stack.containers())), HEALTHY_S, "healthy after the restart", 5)
    READ["restart: batch before, resumed at, refilled"] = (before, resumed, refilled)
    assert resumed >= before and refilled > 0
    PHASES["restart trainer to healthy"] = time.monotonic() - t0

    t1 = time.monotonic()
    before = stack.metrics("trainer").value("charles_trainer_batch")
    volumes = sorted(stack.volumes())
    stack.compose("down", timeout=600)
    assert stack.containers() == [] and sorted(stack.volumes()) == volumes, (
        "down kept containers or lost volumes"
    )
    stack.up("--scale", "collector=3")
    resumed, refilled = wait_for(
        lambda: _trainer_resumed(stack.logs("trainer")), HEALTHY_S, "the trainer resuming after up", 5
    )
    wait_for(lambda: _healthy(stack, len(stack.containers())), HEALTHY_S, "healthy after down and up", 5)
    after = stack.metrics("trainer")
    READ["down/up: batch before, resumed at, refilled, fill ratio"] = (
        before,
        resumed,
        refilled,
        after.value("charles_trainer_buffer_fill_ratio"),
    )
    assert resumed >= before and refilled > 0
    assert after.value("charles_trainer_batch") >= resumed
    PHASES["down and up (volumes kept) to healthy"] = time.monotonic() - t1


def test_6_down_v_leaves_nothing_behind(stack):
    t0 = time.monotonic()
    stack.compose("down", "-v", "--remove-orphans", timeout=600)
    left = {"containers": stack.containers(), "volumes": stack.volumes(), "networks": stack.networks()}
    READ["left after down -v"] = left
    assert left == {"containers": [], "volumes": [], "networks": []}
    PHASES["down -v"] = time.monotonic() - t0
