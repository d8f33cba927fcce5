"""A rendered k8s overlay (``kubectl kustomize k8s/overlays/<name>``) against the facts: ``check_k8s``."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from pathlib import Path

from charles.proto import registry
from charles.proto.registry import Registry
from charles.topology.facts import (
    CONFIG_PATH,
    EXTRA_SERVICES,
    HEALTH_PATH,
    IMAGE_NAME,
    METRICS_PATH,
    TRAINER_VOLUMES,
    check_env_names,
    expect_env,
    facts,
    gpu_count_problems,
    unique,
)


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
    problems += unique(
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
        problems += expect_env(w, env, f.env)
        problems += check_env_names(env, w)
        for probe in ("livenessProbe", "readinessProbe"):
            get = (c.get(probe) or {}).get("httpGet") or {}
            if get.get("path") != HEALTH_PATH or get.get("port") not in ("http", f.http_port):
                problems.append(f"{w}: {probe} does not ask {HEALTH_PATH} on the http port")
        gpus = str(((c.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu", ""))
        if f.gpu and not cpu:
            problems += gpu_count_problems(f"{w}: limits nvidia.com/gpu", f.name, gpus, env)
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
