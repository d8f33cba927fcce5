"""docker-compose.yml (and the CPU override) against the facts: Compose's own YAML and merge rules, then
``check_compose``."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from charles.proto import registry
from charles.proto.registry import Registry
from charles.topology.facts import (
    CONFIG_PATH,
    EXTRA_SERVICES,
    HEALTH_PATH,
    IMAGE_NAME,
    check_env_names,
    env_dict,
    expect_env,
    facts,
    gpu_count_problems,
    unique,
)


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


_VARIABLE = re.compile(r"\$\{\w+:-([^}]*)\}")
"""A compose ``${NAME:-default}``: the files as written (not yet through docker-compose config) hold them."""


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
    problems += unique(host_ports, "host port")

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
        env = env_dict(svc.get("environment"))
        problems += expect_env(w, env, f.env)
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
        elif f.gpu and not cpu:
            count = gpus[0].get("count", "all")  # absent: every GPU
            count = "all" if count == -1 else str(count)
            resolved = {k: _VARIABLE.sub(r"\1", str(v)) for k, v in env.items()}  # the defaults, as unset
            problems += gpu_count_problems(f"{w}: GPU reservation", f.name, count, resolved)
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
