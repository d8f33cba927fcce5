"""The local launcher's process table (``charles up``, core/launcher.py) against the facts."""

from __future__ import annotations

import argparse
from collections import Counter

from charles.proto import registry
from charles.proto.registry import Registry
from charles.topology.facts import LOCAL_COLLECTORS, ROOT, check_env_names, unique


def launcher_table(collectors: int = 2) -> list[tuple[str, str, int, dict[str, str]]]:
    """(process, service, http port, environment set by the launcher) of ``charles up``, as if all were built.

    Read from the launcher's own pure planning functions: nothing is started, no port is probed.
    """
    from charles import launcher

    args = argparse.Namespace(
        collectors=collectors,
        preset="tiny",
        seed=0,
        config=str(ROOT / "deploy" / "charles.yaml"),
        run_dir="runs",
        no_player=False,
        no_viewer=False,
        no_judge=False,
    )
    procs = launcher.plan(args, built=lambda service: True)
    http = launcher.registry_http_ports(procs)
    bus = dict(registry().ports)
    return [(p.name, p.service, http[p.name], launcher.child_env(args, p, bus, http[p.name])) for p in procs]


def local_collector_ports(reg: Registry | None = None, n: int = LOCAL_COLLECTORS) -> list[int]:
    """The launcher's rule: collector-1 the registry port, collector-k (k >= 2) the port + 100 + (k - 1)."""
    base = (reg or registry()).services["collector"].http_port
    return [base] + [base + 100 + (k - 1) for k in range(2, n + 1)]


def check_launcher(collectors: int = 3, reg: Registry | None = None) -> list[str]:
    reg = reg or registry()
    problems = []
    table = launcher_table(collectors)
    where = f"launcher (--collectors {collectors})"
    problems += unique([t[0] for t in table], f"{where}: process name")
    problems += unique([t[2] for t in table], f"{where}: http port")
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
