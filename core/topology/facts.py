"""What every service must look like wherever it runs, read from proto/registry.yaml.

``facts()`` gives each service's module, HTTP port, health and metrics paths, image (cpu/gpu), replicas,
and the environment its container gets; ``check_registry`` and ``check_env_names`` hold the registry and
any environment to them. The compose, k8s, launcher and Prometheus checkers compare their files with these.
"""

from __future__ import annotations

import dataclasses
import typing
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charles.proto import registry
from charles.proto.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
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


# ---------------------------------------------------------------------------------------------- checks


def unique(items: Iterable[Any], what: str) -> list[str]:
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
    problems += unique(ports, "port")
    problems += [f"port {p} is outside 1025-65535" for p in ports if not 1024 < p < 65536]
    problems += unique([*reg.services, *EXTRA_SERVICES], "service name")
    problems += unique([s.module for s in reg.services.values()], "module")
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
    return typing.get_type_hints(cls).get(name)


def env_dict(env: Any) -> dict[str, str]:
    if isinstance(env, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in env.items()}
    out = {}
    for item in env or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


PROCS_ENV = "CHARLES__TRAINER__PROCS"
"""trainer.procs: training processes, one per GPU (0: one per GPU the container sees)."""


def gpu_count_problems(where: str, name: str, gpus: str, env: Mapping[str, str]) -> list[str]:
    """A GPU service takes one GPU; the trainer one per training process, so it may take several, or every
    GPU of the machine (``all``: compose's count), as long as it has a GPU for each process it runs.

    ``gpus``: the k8s limit or the compose count, "" when there is none."""
    if name != "trainer":
        return [] if gpus == "1" else [f"{where}: asks for {gpus or 'no'} GPUs, expected 1"]
    procs = str(env.get(PROCS_ENV, "1"))
    if not procs.isdigit():
        return [f"{where}: {PROCS_ENV}={procs!r} is not a number of processes"]
    if gpus == "all":
        return []
    if not gpus.isdigit() or int(gpus) < 1:
        return [f"{where}: asks for {gpus or 'no'} GPUs, expected a count of at least 1"]
    if int(procs) > int(gpus):
        return [f"{where}: {PROCS_ENV}={procs} training processes on {gpus} GPU(s): one GPU each"]
    if int(gpus) > 1 and procs not in ("0", gpus):
        return [
            f"{where}: takes {gpus} GPUs but runs {procs} training process(es) ({PROCS_ENV} 0: one per GPU)"
        ]
    return []


def expect_env(where: str, env: Mapping[str, str], expected: Mapping[str, str]) -> list[str]:
    problems = []
    for k, v in expected.items():
        if k not in env:
            problems.append(f"{where}: environment lacks {k}={v}")
        elif str(env[k]) != v:
            problems.append(f"{where}: {k}={env[k]!r}, the registry says {v!r}")
    return problems
