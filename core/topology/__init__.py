"""The one picture of the deployment, read from proto/registry.yaml, and the checks that hold files to it.

What lives here, one idea per module (each check returns a list of problems; empty: they agree):

* ``facts`` — what every service must look like wherever it runs (``facts()``: module, HTTP port, health
  and metrics paths, image, replicas, container environment); ``check_registry``, ``check_env_names``
* ``metrics`` — the metric catalogue ``METRICS`` the services declare and dashboards may query
* ``compose`` — docker-compose.yml and its CPU override, merged as Compose does: ``check_compose``
* ``k8s`` — the rendered k8s overlays (``kubectl kustomize``): ``check_k8s``
* ``launcher`` — the local launcher's process table (core/launcher.py): ``check_launcher``
* ``prometheus`` — the Prometheus configurations and the Grafana dashboard's PromQL: ``check_prometheus``,
  ``check_dashboard``

The files are written by hand and stay readable; this package only checks them. It may import
charles.proto, charles.config and charles.launcher (to plan, never to start), and no service.
tests/test_topology.py and ``python -m charles.validate`` (``make validate``) run the checks;
``python -m charles.topology`` prints the facts.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from charles.topology.compose import Reset, check_compose, load_compose, merge_compose
from charles.topology.facts import (
    CONFIG_PATH,
    EXTRA_SERVICES,
    HEALTH_PATH,
    IMAGE_NAME,
    LOCAL_COLLECTORS,
    METRICS_PATH,
    PLAIN_ENV,
    ROOT,
    RUN_DIR,
    TRAINER_VOLUMES,
    ServiceFacts,
    check_env_names,
    check_registry,
    container_env,
    facts,
    render,
)
from charles.topology.k8s import check_k8s
from charles.topology.launcher import check_launcher, launcher_table, local_collector_ports
from charles.topology.metrics import METRICS, PROMETHEUS_OWN, TARGET_LABELS, Metric, exposed_names
from charles.topology.prometheus import check_dashboard, check_expr, check_prometheus, dashboard_exprs

__all__ = [
    "CONFIG_PATH",
    "EXTRA_SERVICES",
    "HEALTH_PATH",
    "IMAGE_NAME",
    "LOCAL_COLLECTORS",
    "METRICS",
    "METRICS_PATH",
    "PLAIN_ENV",
    "PROMETHEUS_OWN",
    "ROOT",
    "RUN_DIR",
    "TARGET_LABELS",
    "TRAINER_VOLUMES",
    "Metric",
    "Reset",
    "ServiceFacts",
    "check_compose",
    "check_dashboard",
    "check_env_names",
    "check_expr",
    "check_files",
    "check_k8s",
    "check_launcher",
    "check_prometheus",
    "check_registry",
    "container_env",
    "dashboard_exprs",
    "exposed_names",
    "facts",
    "launcher_table",
    "load_compose",
    "local_collector_ports",
    "merge_compose",
    "render",
]


def check_files(root: Path = ROOT) -> dict[str, list[str]]:
    """Every check that needs no external tool, by name (what tests/test_topology.py and validate run)."""
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
