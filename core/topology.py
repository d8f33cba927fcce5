"""The one picture of the deployment, read from proto/registry.yaml, and the checks that hold files to it.

``facts()`` says what every service must look like wherever it runs: module, HTTP port, health and
metrics paths, image (cpu/gpu), replicas, and the environment a container gets. The ``check_*`` functions
compare the deployment files with it and return a list of problems (empty: they agree):

* docker-compose.yml (and the CPU override) — ``check_compose``
* the rendered k8s overlays (``kubectl kustomize``) — ``check_k8s``
* the local launcher's process table (core/launcher.py) — ``check_launcher``
* the Prometheus configurations — ``check_prometheus``
* the Grafana dashboard's queries against the metric names in ``METRICS`` — ``check_dashboard``

The files are written by hand and stay readable; this module only checks them. tests/test_topology.py
and ``python -m charles.validate`` (``make validate``) run the checks. ``python -m charles.topology``
prints the facts.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import sys
import tempfile
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from charles.proto import registry
from charles.proto.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
"""The repository (core/ is charles/): where docker-compose.yml, k8s/ and deploy/ live."""

HEALTH_PATH = "/healthz"
METRICS_PATH = "/metrics"
CONFIG_PATH = "/etc/charles/charles.yaml"
"""Where containers find deploy/charles.yaml (CHARLES_CONFIG)."""
RUN_DIR = "/runs"
"""CHARLES_RUN_DIR in containers; the image makes it, owned by the charles user."""
TRAINER_VOLUMES = {"runs": RUN_DIR, "checkpoints": f"{RUN_DIR}/checkpoints", "storage": f"{RUN_DIR}/storage"}
"""Named volume (compose) / PersistentVolumeClaim (k8s) -> mount point in the trainer."""
EXTRA_SERVICES = {"tensorboard": 6006, "prometheus": 9090, "grafana": 3000}
"""Services that are not Charles processes (not in the registry), with the port each serves."""
IMAGE_NAME = "charles"
"""Images are charles:cpu and charles:gpu (Dockerfile targets; `make images`)."""
LOCAL_COLLECTORS = 8
"""deploy/prometheus.local.yml lists this many collectors of the local launcher."""
PLAIN_ENV = {"CHARLES_CONFIG", "CHARLES_RUN_DIR", "CHARLES_CHECKPOINT_DIR", "CHARLES_STORAGE_DIR"}
"""CHARLES_* names that are not CHARLES__SECTION__FIELD configuration paths."""


# ---------------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class ServiceFacts:
    """What a Charles service is, wherever it runs."""

    name: str
    module: str
    http_port: int
    image: str
    """cpu or gpu: the Dockerfile target it runs on (with a GPU)."""
    replicas: int
    env: dict[str, str] = field(default_factory=dict)
    """Environment every container of the service gets (values are exact)."""
    volumes: dict[str, str] = field(default_factory=dict)
    """Named volume -> mount point."""

    @property
    def command(self) -> list[str]:
        return ["python", "-m", self.module]

    @property
    def gpu(self) -> bool:
        return self.image == "gpu"


def container_env(name: str, http_port: int) -> dict[str, str]:
    """The environment of a service's container: config file, broker address, where /metrics listens."""
    env = {
        "CHARLES_CONFIG": CONFIG_PATH,
        "CHARLES__BUS__HOST": "broker",
        "CHARLES__SERVICE__HTTP_HOST": "0.0.0.0",
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
    }
    if name == "broker":
        # binds every interface; its own heartbeat publisher talks to itself on loopback (no hairpin NAT)
        env["CHARLES__BROKER__BIND"] = "0.0.0.0"
        env["CHARLES__BUS__HOST"] = "127.0.0.1"
    if name == "trainer":
        env["CHARLES_RUN_DIR"] = RUN_DIR
        env["CHARLES_CHECKPOINT_DIR"] = TRAINER_VOLUMES["checkpoints"]
        env["CHARLES_STORAGE_DIR"] = TRAINER_VOLUMES["storage"]
        # the final checkpoint on SIGTERM may take longer than the others' shutdown_s; within the 60 s
        # that compose (stop_grace_period) and k8s (terminationGracePeriodSeconds) give the trainer
        env["CHARLES__SERVICE__SHUTDOWN_S"] = "50"
    return env


def facts(reg: Registry | None = None) -> dict[str, ServiceFacts]:
    reg = reg or registry()
    return {
        s.name: ServiceFacts(
            name=s.name,
            module=s.module,
            http_port=s.http_port,
            image=s.image,
            replicas=s.replicas,
            env=container_env(s.name, s.http_port),
            volumes=dict(TRAINER_VOLUMES) if s.name == "trainer" else {},
        )
        for s in reg.services.values()
    }


def render(reg: Registry | None = None) -> str:
    """The facts as a table, for people."""
    reg = reg or registry()
    lines = [f"broker bus ports: {', '.join(f'{k} {v}' for k, v in reg.ports.items())}", ""]
    lines.append(f"{'service':<12}{'module':<20}{'http':>6}  {'image':<6}{'replicas':>8}  health / metrics")
    for f in facts(reg).values():
        lines.append(
            f"{f.name:<12}{f.module:<20}{f.http_port:>6}  {f.image:<6}{f.replicas:>8}  "
            f":{f.http_port}{HEALTH_PATH} :{f.http_port}{METRICS_PATH}"
        )
    lines.append("")
    lines.append("container environment (compose and k8s):")
    for f in facts(reg).values():
        lines.append(f"  {f.name}: " + " ".join(f"{k}={v}" for k, v in f.env.items()))
    lines.append(f"trainer volumes: {', '.join(f'{k} -> {v}' for k, v in TRAINER_VOLUMES.items())}")
    lines.append(f"other services: {', '.join(f'{k} :{v}' for k, v in EXTRA_SERVICES.items())}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    """counter, gauge, histogram or info (as prometheus_client declares it)."""
    labels: tuple[str, ...]
    owner: str
    """Which service exposes it ("every" for charles.runtime.Metrics)."""


# The metric names dashboards may use; the services declare exactly these (names, types, labels). Every
# service has the "every" families (charles.runtime.Metrics); each service adds its own.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("charles_service_info", "info", ("service", "instance", "pid"), "every"),
        Metric("charles_messages_total", "counter", ("direction", "topic"), "every"),
        Metric("charles_bytes_total", "counter", ("direction", "topic"), "every"),
        Metric("charles_rejects_total", "counter", ("reason",), "every"),
        Metric("charles_drops_total", "counter", ("cause",), "every"),
        Metric("charles_loop_seconds", "histogram", ("loop",), "every"),
        Metric("charles_up", "gauge", (), "every"),
        Metric("charles_topic_alive", "gauge", ("topic",), "every"),
        Metric("charles_topic_rate_hz", "gauge", ("topic",), "every"),
        Metric("charles_collector_samples_total", "counter", (), "collector"),
        Metric("charles_collector_unstucks_total", "counter", (), "collector"),
        Metric("charles_collector_frame_seconds", "histogram", (), "collector"),
        Metric("charles_collector_jitter_seconds", "histogram", (), "collector"),
        Metric("charles_collector_encode_seconds", "histogram", (), "collector"),
        Metric("charles_balancer_samples_accepted_total", "counter", (), "balancer"),
        Metric("charles_balancer_sets_total", "counter", ("group", "outcome"), "balancer"),
        Metric("charles_balancer_bin_fill", "gauge", ("group", "output", "bin"), "balancer"),
        Metric("charles_balancer_acceptance_ratio", "gauge", (), "balancer"),
        Metric("charles_trainer_batches_total", "counter", (), "trainer"),
        Metric("charles_trainer_batch", "gauge", (), "trainer"),
        Metric("charles_trainer_batches_per_second", "gauge", (), "trainer"),
        Metric("charles_trainer_samples_per_second", "gauge", (), "trainer"),
        Metric("charles_trainer_samples_trained_total", "counter", (), "trainer"),
        Metric("charles_trainer_buffer_fill_ratio", "gauge", ("output",), "trainer"),
        Metric("charles_trainer_loss", "gauge", ("output",), "trainer"),
        Metric("charles_trainer_data_wait_fraction", "gauge", (), "trainer"),
        Metric("charles_trainer_weights_published_total", "counter", (), "trainer"),
        Metric("charles_trainer_publish_seconds", "histogram", (), "trainer"),
        Metric("charles_trainer_samples_reused_total", "counter", ("output",), "trainer"),
        Metric("charles_broker_last_value_evictions_total", "counter", ("family", "cause"), "broker"),
        Metric("charles_player_predictions_total", "counter", (), "player"),
        Metric("charles_player_fps", "gauge", (), "player"),
        Metric("charles_player_pps", "gauge", (), "player"),
        Metric("charles_player_weights_batch", "gauge", (), "player"),
        Metric("charles_player_policy_lag_batches", "gauge", (), "player"),
        Metric("charles_player_swaps_total", "counter", (), "player"),
        Metric("charles_player_unstucks_total", "counter", (), "player"),
        Metric("charles_player_latency_seconds", "histogram", (), "player"),
    )
}
PROMETHEUS_OWN = {"up": ()}
"""Series Prometheus makes itself, allowed in dashboards too."""
TARGET_LABELS = ("job", "instance")
"""Labels Prometheus adds to every scraped series. A scraped label of the same name becomes exported_<name>."""


def exposed_names(m: Metric) -> set[str]:
    """The series names a metric family appears under in queries."""
    if m.type == "histogram":
        return {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
    return {m.name}


# ---------------------------------------------------------------------------------------------- helpers


def _unique(items: Iterable[Any], what: str) -> list[str]:
    return [f"{what} {item!r} appears {n} times" for item, n in Counter(items).items() if n > 1]


def check_registry(reg: Registry | None = None) -> list[str]:
    """Names and ports are unique, ports explicit and in range, images known."""
    reg = reg or registry()
    problems = []
    ports = (
        list(reg.ports.values())
        + [s.http_port for s in reg.services.values()]
        + list(EXTRA_SERVICES.values())
    )
    problems += _unique(ports, "port")
    problems += [f"port {p} is outside 1025-65535" for p in ports if not 1024 < p < 65536]
    problems += _unique([*reg.services, *EXTRA_SERVICES], "service name")
    problems += _unique([s.module for s in reg.services.values()], "module")
    for s in reg.services.values():
        if s.module != f"charles.{s.name}":
            problems.append(f"service {s.name}: module {s.module} is not charles.{s.name}")
        if s.image not in ("cpu", "gpu"):
            problems.append(f"service {s.name}: image {s.image!r} is neither cpu nor gpu")
        if s.replicas < 1:
            problems.append(f"service {s.name}: replicas {s.replicas} < 1")
    return problems


def check_env_names(names: Iterable[str], where: str) -> list[str]:
    """Every CHARLES_* variable is a known plain name or a CHARLES__SECTION__FIELD of the configuration."""
    from charles import config as cfg

    cfg._import_sections()
    sections: dict[str, type] = {
        f.name: _field_type(cfg.RunConfig, f.name) for f in dataclasses.fields(cfg.RunConfig)
    }
    sections.update(cfg.SECTIONS)
    problems = []
    for name in names:
        if not name.startswith("CHARLES_") or name in PLAIN_ENV:
            continue
        if not name.startswith(cfg.ENV_PREFIX):
            problems.append(f"{where}: {name} is neither {sorted(PLAIN_ENV)} nor CHARLES__SECTION__FIELD")
            continue
        path = name[len(cfg.ENV_PREFIX) :].lower().split("__")
        tp: Any = sections.get(path[0])
        if tp is None or not dataclasses.is_dataclass(tp):
            problems.append(
                f"{where}: {name}: no configuration section {path[0]!r} (known: {sorted(sections)})"
            )
            continue
        for part in path[1:]:
            if not dataclasses.is_dataclass(tp) or part not in {f.name for f in dataclasses.fields(tp)}:
                problems.append(
                    f"{where}: {name}: {part!r} is not a setting of {getattr(tp, '__name__', tp)}"
                )
                break
            tp = _field_type(tp, part)
    return problems


def _field_type(cls: type, name: str) -> Any:
    import typing

    return typing.get_type_hints(cls).get(name)


def _env_dict(env: Any) -> dict[str, str]:
    if isinstance(env, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out = {}
    for item in env or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def _expect_env(where: str, env: Mapping[str, str], expected: Mapping[str, str]) -> list[str]:
    problems = []
    for k, v in expected.items():
        if k not in env:
            problems.append(f"{where}: environment lacks {k}={v}")
        elif str(env[k]) != v:
            problems.append(f"{where}: {k}={env[k]!r}, the registry says {v!r}")
    return problems


# ---------------------------------------------------------------------------------------------- compose


class _ComposeLoader(yaml.SafeLoader):
    """YAML as Compose reads it: anchors and merge keys, ``!reset``, and an error on a duplicated key."""


class Reset:
    """A ``!reset`` value in an override file: the key is removed from what the files before it set."""

    def __repr__(self) -> str:
        return "!reset"


def _reset(loader: yaml.SafeLoader, node: yaml.Node) -> Reset:
    return Reset()


def _no_duplicates(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    # PyYAML keeps the last of two equal keys silently; in a hand-edited compose file that hides a mistake.
    # Keys merged in with `<<:` may be overridden on purpose, so only the node's own keys count.
    seen: set = set()
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        if key in seen:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate key {key!r}", key_node.start_mark)
        seen.add(key)
    return loader.construct_mapping(node, deep)


_ComposeLoader.add_constructor("!reset", _reset)
_ComposeLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _no_duplicates)

_OVERRIDE_KEYS = {"command", "entrypoint"}
"""Compose replaces these sequences instead of appending (and healthcheck.test)."""


def merge_compose(base: Any, over: Any, path: tuple[str, ...] = ()) -> Any:
    """Compose's merge of an override file onto a base, for what our files use.

    Mappings merge key by key; ``!reset`` removes the key; command, entrypoint and healthcheck.test are
    replaced; other sequences append (ports and volumes de-duplicated on their target, as Compose does).
    """
    if isinstance(base, Mapping) and isinstance(over, Mapping):
        out = dict(base)
        for k, v in over.items():
            if isinstance(v, Reset):
                out.pop(k, None)
            elif k in out:
                out[k] = merge_compose(out[k], v, (*path, str(k)))
            else:
                out[k] = _strip_resets(v)
        return out
    if isinstance(base, list) and isinstance(over, list):
        key = path[-1] if path else ""
        if key in _OVERRIDE_KEYS or path[-2:] == ("healthcheck", "test"):
            return list(over)
        if key in ("volumes", "ports") and len(path) == 3:
            target = _volume_target if key == "volumes" else _port_target
            kept = {target(v): v for v in base}
            kept.update({target(v): v for v in over})
            return list(kept.values())
        return [*base, *over]
    return _strip_resets(over)


def _strip_resets(v: Any) -> Any:
    if isinstance(v, Mapping):
        return {k: _strip_resets(x) for k, x in v.items() if not isinstance(x, Reset)}
    if isinstance(v, list):
        return [_strip_resets(x) for x in v]
    return v


def load_compose(*paths: str | Path) -> dict:
    """The compose model of one file or a base and its overrides, merged as ``docker compose -f ... -f``."""
    model: dict = {}
    for p in paths:
        doc = yaml.load(Path(p).read_text(), Loader=_ComposeLoader) or {}
        model = merge_compose(model, doc) if model else _strip_resets(doc)
    return model


def _volume_target(v: Any) -> str:
    if isinstance(v, Mapping):
        return str(v.get("target"))
    parts = str(v).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _volume_source(v: Any) -> str:
    if isinstance(v, Mapping):
        return str(v.get("source"))
    return str(v).split(":")[0]


def _port_target(p: Any) -> str:
    return str(_port(p)[2])


def _port(p: Any) -> tuple[str, int | None, int]:
    """(host ip, published port or None, container port) of a short or long port entry."""
    if isinstance(p, Mapping):
        pub = p.get("published")
        return str(p.get("host_ip", "")), int(pub) if pub not in (None, "") else None, int(p["target"])
    s = str(p).split("/")[0]
    # from the right: the host part may be a ${VARIABLE:-default}, which has a colon of its own
    parts = s.rsplit(":", 2)
    if len(parts) == 1:
        return "", None, int(parts[0])
    if len(parts) == 2:
        return "", int(parts[0]), int(parts[1])
    return parts[0], int(parts[1]), int(parts[2])


def _gpu_devices(svc: Mapping) -> list:
    res = ((svc.get("deploy") or {}).get("resources") or {}).get("reservations") or {}
    return [d for d in res.get("devices") or [] if "gpu" in (d.get("capabilities") or [])]


def check_compose(model: Mapping, *, cpu: bool = False, reg: Registry | None = None) -> list[str]:
    """docker-compose.yml (``cpu``: alone; else merged with docker-compose.gpu.yml) against the registry."""
    reg = reg or registry()
    problems: list[str] = []
    services: Mapping = model.get("services") or {}
    declared_volumes = set((model.get("volumes") or {}).keys())
    where = "compose (cpu)" if cpu else "compose"
    for name in services:
        if name not in reg.services and name not in EXTRA_SERVICES:
            problems.append(
                f"{where}: service {name!r} is neither in proto/registry.yaml nor one of {sorted(EXTRA_SERVICES)}"
            )
    for name in [*reg.services, *EXTRA_SERVICES]:
        if name not in services:
            problems.append(f"{where}: service {name!r} is missing")
    host_ports: list[tuple[str, int]] = []
    for name, svc in services.items():
        svc = svc or {}
        if "container_name" in svc:
            problems.append(
                f"{where}: {name} has container_name; replicas and scaling need compose's own names"
            )
        for p in svc.get("ports") or []:
            ip, pub, _ = _port(p)
            if pub is not None:
                host_ports.append((ip or "0.0.0.0", pub))
        for v in svc.get("volumes") or []:
            src = _volume_source(v)
            if not src.startswith((".", "/")) and src not in declared_volumes:
                problems.append(
                    f"{where}: {name} mounts volume {src!r}, which is not declared under volumes:"
                )
    problems += _unique(host_ports, "host port")

    for f in facts(reg).values():
        svc = services.get(f.name)
        if not svc:
            continue
        w = f"{where}: {f.name}"
        cmd = svc.get("command") or []
        if isinstance(cmd, str):
            cmd = cmd.split()
        if list(cmd[:3]) != f.command:
            problems.append(f"{w}: command {cmd} does not start with {f.command}")
        if f.name == "collector" and "--id" in cmd:
            problems.append(
                f"{w}: a fixed --id would give every replica the same id (the hostname is the default)"
            )
        image_kind = "cpu" if cpu else f.image
        if svc.get("image") != f"{IMAGE_NAME}:{image_kind}":
            problems.append(f"{w}: image {svc.get('image')!r}, expected {IMAGE_NAME}:{image_kind}")
        build = svc.get("build") or {}
        if isinstance(build, Mapping) and build.get("target") not in (None, image_kind):
            problems.append(f"{w}: builds target {build.get('target')!r} but runs {IMAGE_NAME}:{image_kind}")
        env = _env_dict(svc.get("environment"))
        problems += _expect_env(w, env, f.env)
        problems += check_env_names(env, w)
        hc = svc.get("healthcheck") or {}
        test = " ".join(map(str, hc.get("test") or [])) if not isinstance(hc.get("test"), str) else hc["test"]
        if HEALTH_PATH not in test or not ("CHARLES__SERVICE__HTTP_PORT" in test or str(f.http_port) in test):
            problems.append(f"{w}: healthcheck does not ask {HEALTH_PATH} on the service's port: {test!r}")
        if svc.get("restart") != "unless-stopped":
            problems.append(f"{w}: restart is {svc.get('restart')!r}, not unless-stopped")
        if f.name != "broker":
            dep = svc.get("depends_on") or {}
            cond = dep.get("broker", {}).get("condition") if isinstance(dep, Mapping) else None
            if cond != "service_healthy":
                problems.append(f"{w}: must depend on broker with condition service_healthy")
        replicas = (svc.get("deploy") or {}).get("replicas", 1)
        if replicas != f.replicas:
            problems.append(f"{w}: replicas {replicas}, the registry says {f.replicas}")
        gpus = _gpu_devices(svc)
        if f.gpu and not cpu and not gpus:
            problems.append(
                f"{w}: runs on the GPU image but reserves no GPU (deploy.resources.reservations.devices)"
            )
        if (cpu or not f.gpu) and gpus:
            problems.append(f"{w}: reserves a GPU but runs on the CPU")
        mounts = {_volume_target(v): _volume_source(v) for v in svc.get("volumes") or []}
        if not mounts.get(CONFIG_PATH, "").endswith("deploy/charles.yaml"):
            problems.append(f"{w}: deploy/charles.yaml is not mounted at {CONFIG_PATH}")
        for vol, target in f.volumes.items():
            if mounts.get(target) != vol:
                problems.append(f"{w}: volume {vol!r} is not mounted at {target}")
        published = {_port(p)[1]: _port(p) for p in svc.get("ports") or []}
        if f.name == "collector" and published:
            problems.append(f"{w}: publishes host ports; `--scale collector=N` would collide")
        if f.name == "broker":
            for port_name, port in reg.ports.items():
                if port not in published or published[port][2] != port:
                    problems.append(f"{w}: bus port {port_name} {port} is not published as {port}:{port}")
        if f.name == "viewer" and (f.http_port not in published or published[f.http_port][2] != f.http_port):
            problems.append(f"{w}: the stream page {f.http_port} is not published to the host")

    tb = services.get("tensorboard") or {}
    tb_mounts = {_volume_target(v): _volume_source(v) for v in tb.get("volumes") or []}
    if "runs" not in tb_mounts.values():
        problems.append(f"{where}: tensorboard does not mount the runs volume")
    for name, port in EXTRA_SERVICES.items():
        pubs = [_port(p)[1] for p in (services.get(name) or {}).get("ports") or []]
        if name in services and port not in pubs:
            problems.append(f"{where}: {name} does not publish its port {port}")
    return problems


# ---------------------------------------------------------------------------------------------- k8s


def _by_kind(docs: Iterable[Mapping]) -> dict[str, dict[str, Mapping]]:
    out: dict[str, dict[str, Mapping]] = {}
    for d in docs:
        if d:
            out.setdefault(d.get("kind", ""), {})[d.get("metadata", {}).get("name", "")] = d
    return out


def _configmap_base(name: str) -> str:
    """charles-env-5f8k2 -> charles-env (kustomize's content-hash suffix)."""
    return re.sub(r"-[a-z0-9]{10}$", "", name)


def _k8s_env(container: Mapping, configmaps: Mapping[str, Mapping]) -> dict[str, str]:
    env: dict[str, str] = {}
    for src in container.get("envFrom") or []:
        ref = (src.get("configMapRef") or {}).get("name")
        if ref in configmaps:
            env.update({k: str(v) for k, v in (configmaps[ref].get("data") or {}).items()})
    for e in container.get("env") or []:
        env[e["name"]] = str(e.get("value", "")) if "valueFrom" not in e else "<from>"
    return env


def check_k8s(
    docs: list[Mapping], *, cpu: bool = False, reg: Registry | None = None, where: str = "k8s"
) -> list[str]:
    """A rendered overlay (``kubectl kustomize k8s/overlays/<name>``) against the registry."""
    reg = reg or registry()
    problems: list[str] = []
    problems += _unique(
        [(d.get("kind"), d.get("metadata", {}).get("name")) for d in docs if d], f"{where}: object"
    )
    kinds = _by_kind(docs)
    deployments = kinds.get("Deployment", {})
    services = kinds.get("Service", {})
    configmaps = kinds.get("ConfigMap", {})
    pvcs = kinds.get("PersistentVolumeClaim", {})
    hpa_targets = {
        (h.get("spec", {}).get("scaleTargetRef") or {}).get("name"): h
        for h in kinds.get("HorizontalPodAutoscaler", {}).values()
    }

    for vol in TRAINER_VOLUMES:
        if vol not in pvcs:
            problems.append(f"{where}: PersistentVolumeClaim {vol!r} is missing")

    for name, dep in deployments.items():
        for c in dep["spec"]["template"]["spec"].get("containers", []):
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                if not {"cpu", "memory"} <= set(res.get(kind) or {}):
                    problems.append(f"{where}: {name}/{c['name']}: resources.{kind} needs cpu and memory")

    for f in facts(reg).values():
        w = f"{where}: {f.name}"
        dep = deployments.get(f.name)
        if dep is None:
            problems.append(f"{w}: Deployment is missing")
            continue
        spec = dep["spec"]
        pod = spec["template"]
        labels = pod.get("metadata", {}).get("labels") or {}
        if labels.get("app.kubernetes.io/name") != f.name:
            problems.append(
                f"{w}: pod label app.kubernetes.io/name is {labels.get('app.kubernetes.io/name')!r}"
            )
        hpa = hpa_targets.get(f.name)
        if hpa is not None:
            if "replicas" in spec:
                problems.append(
                    f"{w}: an HPA scales it, so the Deployment must not set replicas (apply would reset them)"
                )
            if hpa["spec"].get("minReplicas") != f.replicas:
                problems.append(
                    f"{w}: HPA minReplicas {hpa['spec'].get('minReplicas')}, the registry says {f.replicas}"
                )
        elif spec.get("replicas", 1) != f.replicas:
            problems.append(f"{w}: replicas {spec.get('replicas', 1)}, the registry says {f.replicas}")
        ann = pod.get("metadata", {}).get("annotations") or {}
        want_ann = {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(f.http_port),
            "prometheus.io/path": METRICS_PATH,
        }
        for k, v in want_ann.items():
            if ann.get(k) != v:
                problems.append(f"{w}: pod annotation {k}={ann.get(k)!r}, expected {v!r}")
        containers = {c["name"]: c for c in pod["spec"].get("containers", [])}
        c = containers.get(f.name)
        if c is None:
            problems.append(f"{w}: no container named {f.name}")
            continue
        if list(c.get("command") or [])[:3] != f.command:
            problems.append(f"{w}: command {c.get('command')} does not start with {f.command}")
        image_kind = "cpu" if cpu else f.image
        image = str(c.get("image", ""))
        if not (image.split("/")[-1].split(":")[0] == IMAGE_NAME and image.endswith(f":{image_kind}")):
            problems.append(f"{w}: image {image!r}, expected {IMAGE_NAME}:{image_kind} (any registry)")
        ports = {p.get("name"): p.get("containerPort") for p in c.get("ports") or []}
        if ports.get("http") != f.http_port:
            problems.append(
                f"{w}: container port 'http' is {ports.get('http')}, the registry says {f.http_port}"
            )
        if f.name == "broker":
            for port_name, port in reg.ports.items():
                if port not in ports.values():
                    problems.append(f"{w}: container does not declare bus port {port_name} {port}")
        env = _k8s_env(c, configmaps)
        problems += _expect_env(w, env, f.env)
        problems += check_env_names(env, w)
        for probe in ("livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != HEALTH_PATH or get.get("port") not in ("http", f.http_port):
                problems.append(f"{w}: {probe} does not ask {HEALTH_PATH} on the http port")
        gpus = str(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", ""))
        if f.gpu and not cpu and gpus != "1":
            problems.append(f"{w}: limits nvidia.com/gpu is {gpus or 'absent'}, expected 1")
        if (cpu or not f.gpu) and gpus:
            problems.append(f"{w}: asks for nvidia.com/gpu {gpus} but runs on the CPU")
        volumes = {v["name"]: v for v in pod["spec"].get("volumes") or []}
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        cfg_vol = volumes.get(mounts.get(str(Path(CONFIG_PATH).parent), ""), {})
        cm = (cfg_vol.get("configMap") or {}).get("name", "")
        if _configmap_base(cm) != "charles-config" or cm not in configmaps:
            problems.append(f"{w}: the charles-config ConfigMap is not mounted at {Path(CONFIG_PATH).parent}")
        elif Path(CONFIG_PATH).name not in (configmaps[cm].get("data") or {}):
            problems.append(f"{w}: ConfigMap {cm} has no {Path(CONFIG_PATH).name}")
        for vol, target in f.volumes.items():
            claim = (volumes.get(mounts.get(target, ""), {}).get("persistentVolumeClaim") or {}).get(
                "claimName"
            )
            if claim != vol:
                problems.append(f"{w}: PersistentVolumeClaim {vol!r} is not mounted at {target}")
        svc = services.get(f.name)
        if svc is None:
            problems.append(f"{w}: Service is missing (Prometheus and clients find it by name)")
            continue
        if (svc["spec"].get("selector") or {}).get("app.kubernetes.io/name") != f.name:
            problems.append(f"{w}: Service selector does not pick app.kubernetes.io/name={f.name}")
        sports = {p.get("port"): p for p in svc["spec"].get("ports") or []}
        if f.http_port not in sports:
            problems.append(f"{w}: Service does not expose {METRICS_PATH} port {f.http_port}")
        if f.name == "broker":
            for port_name, port in reg.ports.items():
                if port not in sports:
                    problems.append(f"{w}: Service does not expose bus port {port_name} {port}")
        if f.name == "collector" and svc["spec"].get("clusterIP") != "None":
            problems.append(
                f"{w}: the collector Service must be headless (clusterIP: None) so every replica is found"
            )

    tb = services.get("tensorboard")
    if tb is None or EXTRA_SERVICES["tensorboard"] not in {
        p.get("port") for p in tb["spec"].get("ports") or []
    }:
        problems.append(f"{where}: Service tensorboard on {EXTRA_SERVICES['tensorboard']} is missing")
    return problems


# ---------------------------------------------------------------------------------------------- launcher


def launcher_table(collectors: int = 2) -> list[tuple[str, str, int, dict[str, str]]]:
    """(process, service, http port, environment set by the launcher) of ``charles up``, as if all were built."""
    import os
    from unittest import mock

    from charles import launcher

    args = argparse.Namespace(
        collectors=collectors,
        preset="tiny",
        minutes=0,
        seed=0,
        config=str(ROOT / "deploy" / "charles.yaml"),
        run_dir="runs",
        logs="",
        no_player=False,
        no_viewer=False,
        random_ports=False,
        plain=True,
    )
    with (
        tempfile.TemporaryDirectory() as tmp,
        mock.patch.object(launcher, "_built", return_value=True),
        mock.patch.object(launcher, "_port_busy", return_value=False),
    ):
        args.logs = tmp
        la = launcher.Launcher(args)
        out = []
        for p in la.procs:
            env = la._env(p)
            own = {k: v for k, v in env.items() if os.environ.get(k) != v}
            out.append((p.name, p.service, la.http_ports[p.name], own))
    return out


def local_collector_ports(reg: Registry | None = None, n: int = LOCAL_COLLECTORS) -> list[int]:
    """The launcher's rule: collector-1 the registry port, collector-k (k >= 2) the port + 100 + (k - 1)."""
    base = (reg or registry()).services["collector"].http_port
    return [base] + [base + 100 + (k - 1) for k in range(2, n + 1)]


def check_launcher(collectors: int = 3, reg: Registry | None = None) -> list[str]:
    reg = reg or registry()
    problems = []
    table = launcher_table(collectors)
    where = f"launcher (--collectors {collectors})"
    problems += _unique([t[0] for t in table], f"{where}: process name")
    problems += _unique([t[2] for t in table], f"{where}: http port")
    got = Counter(t[1] for t in table)
    for name in reg.services:
        want = collectors if name == "collector" else 1
        if got[name] != want:
            problems.append(f"{where}: {got[name]} {name} process(es), expected {want}")
    for name in got:
        if name not in reg.services:
            problems.append(f"{where}: runs {name!r}, which is not in the registry")
    bus = set(reg.ports.values())
    for proc, service, port, env in table:
        w = f"{where}: {proc}"
        if port in bus:
            problems.append(f"{w}: http port {port} is a bus port")
        if service != "collector" and port != reg.services[service].http_port:
            problems.append(f"{w}: http port {port}, the registry says {reg.services[service].http_port}")
        if env.get("CHARLES__SERVICE__HTTP_PORT") != str(port):
            problems.append(
                f"{w}: CHARLES__SERVICE__HTTP_PORT={env.get('CHARLES__SERVICE__HTTP_PORT')!r}, serves {port}"
            )
        for k in ("CHARLES__BUS__HOST", "CHARLES_RUN_DIR", "CHARLES_CONFIG"):
            if k not in env:
                problems.append(f"{w}: the launcher does not set {k}")
        problems += check_env_names(env, w)
    collector_ports = sorted(t[2] for t in table if t[1] == "collector")
    if collector_ports != sorted(local_collector_ports(reg, collectors)):
        problems.append(
            f"{where}: collector ports {collector_ports}, deploy/prometheus.local.yml assumes "
            f"{local_collector_ports(reg, collectors)}"
        )
    return problems


# ---------------------------------------------------------------------------------------------- prometheus


def check_prometheus(doc: Mapping, *, local: bool, reg: Registry | None = None) -> list[str]:
    """deploy/prometheus.yml (compose DNS names) or deploy/prometheus.local.yml (127.0.0.1, launcher ports)."""
    reg = reg or registry()
    where = "prometheus.local.yml" if local else "prometheus.yml"
    problems: list[str] = []
    jobs = {j["job_name"]: j for j in doc.get("scrape_configs") or []}
    problems += _unique([j["job_name"] for j in doc.get("scrape_configs") or []], f"{where}: job")
    for f in facts(reg).values():
        job = jobs.get(f.name)
        w = f"{where}: job {f.name}"
        if job is None:
            problems.append(f"{w} is missing")
            continue
        if job.get("metrics_path", METRICS_PATH) != METRICS_PATH:
            problems.append(f"{w}: metrics_path {job.get('metrics_path')}")
        targets = [t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
        if local:
            want = [
                f"127.0.0.1:{p}"
                for p in (local_collector_ports(reg) if f.name == "collector" else [f.http_port])
            ]
            if sorted(targets) != sorted(want):
                problems.append(f"{w}: targets {targets}, the launcher serves {want}")
        elif f.name == "collector":
            dns = job.get("dns_sd_configs") or []
            if not any(
                d.get("names") == ["collector"] and d.get("type") == "A" and d.get("port") == f.http_port
                for d in dns
            ):
                problems.append(
                    f"{w}: needs dns_sd_configs names [collector], type A, port {f.http_port} (every replica)"
                )
        elif targets != [f"{f.name}:{f.http_port}"]:
            problems.append(f"{w}: targets {targets}, expected ['{f.name}:{f.http_port}']")
    return problems


# ---------------------------------------------------------------------------------------------- grafana

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_PROMQL_WORDS = set(
    [
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "count_values",
        "quantile",
        "stddev",
        "topk",
        "bottomk",
        "rate",
        "irate",
        "increase",
        "delta",
        "deriv",
        "histogram_quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "clamp_min",
        "clamp_max",
        "abs",
        "round",
        "sort",
        "sort_desc",
        "label_replace",
        "vector",
        "scalar",
        "time",
        "absent",
        "changes",
        "resets",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "last_over_time",
        "le",
        "inf",
        "Inf",
        "NaN",
    ]
)
"""PromQL's own words: functions, aggregations, keywords."""


def _series_labels(name: str) -> set[str] | None:
    """Labels a series may carry in a query, or None if the name is not ours."""
    if name in PROMETHEUS_OWN:
        return set(PROMETHEUS_OWN[name]) | set(TARGET_LABELS)
    for m in METRICS.values():
        if name in exposed_names(m):
            labels = (
                set(m.labels) | set(TARGET_LABELS) | {f"exported_{t}" for t in TARGET_LABELS if t in m.labels}
            )
            if name.endswith("_bucket"):
                labels.add("le")
            return labels
    return None


def check_expr(expr: str) -> list[str]:
    """A PromQL expression names only metrics in METRICS (or Prometheus' own) and only their labels."""
    problems = []
    text = re.sub(r'"[^"]*"', '""', expr)  # label values and strings say nothing about names
    text = re.sub(r"\$\{?[a-zA-Z_]+\}?", "", text)  # Grafana variables ($__rate_interval)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors [1m]
    used: set[str] = set()
    for m in _SELECTOR.finditer(text):
        name = m.group(1)
        labels = _series_labels(name)
        if labels is None:
            continue
        for matcher in filter(None, (s.strip() for s in m.group(2).split(","))):
            key = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            if key not in labels:
                problems.append(f"{expr!r}: {name} has no label {key!r}")
    grouped: list[str] = []
    for m in _GROUPING.finditer(text):
        grouped += [g.strip() for g in m.group(2).split(",") if g.strip()]
    stripped = _GROUPING.sub(" ", _SELECTOR.sub(lambda m: m.group(1), text))
    for ident in _IDENT.findall(stripped):
        if ident in _PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", ident):
            continue
        if _series_labels(ident) is None:
            problems.append(f"{expr!r}: {ident!r} is not a metric in charles.topology.METRICS")
        else:
            used.add(ident)
    allowed = set().union(*(_series_labels(n) or set() for n in used)) if used else set()
    for label in grouped:
        if label not in allowed:
            problems.append(f"{expr!r}: groups by {label!r}, which none of {sorted(used)} has")
    return problems


def dashboard_exprs(dashboard: Mapping) -> list[str]:
    out = []

    def walk(panels: Iterable[Mapping]) -> None:
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


def check_dashboard(dashboard: Mapping) -> list[str]:
    problems: list[str] = []
    exprs = dashboard_exprs(dashboard)
    if not exprs:
        problems.append("dashboard has no queries")
    for e in exprs:
        problems += check_expr(e)
    ids = [p.get("id") for p in _all_panels(dashboard)]
    problems += _unique(ids, "dashboard panel id")
    return problems


def _all_panels(d: Mapping) -> list[Mapping]:
    out: list[Mapping] = []
    for p in d.get("panels") or []:
        out.append(p)
        out += _all_panels(p)
    return out


# ---------------------------------------------------------------------------------------------- all files


def check_files(root: Path = ROOT) -> dict[str, list[str]]:
    """Every check that needs no external tool, by name (what tests/test_topology.py and validate run)."""
    import json

    from charles import config as cfg

    out: dict[str, list[str]] = {"registry": check_registry()}
    out["compose (cpu)"] = check_compose(load_compose(root / "docker-compose.yml"), cpu=True)
    out["compose (gpu)"] = check_compose(
        load_compose(root / "docker-compose.yml", root / "docker-compose.gpu.yml")
    )
    out["launcher"] = check_launcher()
    out["prometheus.yml"] = check_prometheus(
        yaml.safe_load((root / "deploy" / "prometheus.yml").read_text()), local=False
    )
    out["prometheus.local.yml"] = check_prometheus(
        yaml.safe_load((root / "deploy" / "prometheus.local.yml").read_text()), local=True
    )
    out["grafana dashboard"] = check_dashboard(
        json.loads((root / "deploy" / "grafana" / "dashboards" / "charles.json").read_text())
    )
    try:
        cfg.load(root / "deploy" / "charles.yaml", environ={})
        out["deploy/charles.yaml"] = []
    except (cfg.ConfigError, ValueError, TypeError) as e:
        out["deploy/charles.yaml"] = [f"deploy/charles.yaml does not load: {e}"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m charles.topology",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--check",
        action="store_true",
        help="also check the files (no external tools; `make validate` does all)",
    )
    args = ap.parse_args(argv)
    print(render(), end="")
    if not args.check:
        return 0
    failed = 0
    for name, problems in check_files().items():
        print(f"{'ok  ' if not problems else 'FAIL'}  {name}")
        for p in problems:
            print(f"        {p}")
        failed += bool(problems)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
