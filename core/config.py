"""Typed, validated run configuration: defaults <- YAML file <- environment <- command line.

Every section is a dataclass whose fields carry a one-line ``help`` (``knob(default, "help")``), so the
printed configuration documents itself (``charles config show``). Environment variables use the
compose/k8s convention ``CHARLES__SECTION__FIELD=value`` (values parsed as YAML scalars, so ``3``,
``0.5``, ``true`` and ``[a, b]`` work); ``CHARLES_CONFIG`` names the file. The resolved configuration is
what the broker serves to collectors and players, and what the trainer saves beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

ENV_PREFIX = "CHARLES__"


class ConfigError(ValueError):
    """A configuration value that is missing, of the wrong type or out of range; says which and why."""


def knob(default: Any, help: str, *, min: float | None = None, max: float | None = None) -> Any:  # noqa: A002
    """A config field with its documentation (and optional numeric bounds) attached."""
    meta = {"help": help, "min": min, "max": max}
    if isinstance(default, list | dict | set) or dataclasses.is_dataclass(default):
        proto = default
        return field(default_factory=lambda: _copy(proto), metadata=meta)
    return field(default=default, metadata=meta)


def _copy(v: Any) -> Any:
    import copy

    return copy.deepcopy(v)


# ---------------------------------------------------------------------------------------------- sections


@dataclass
class BusConfig:
    """Where the broker is and how to talk to it."""

    host: str = knob("127.0.0.1", "Broker host name or address (compose/k8s: broker)")
    secure: bool = knob(False, "Use the CURVE-authenticated endpoints (remote agents); needs key files")
    keys_dir: str = knob("keys", "Folder made by `make keys` (broker.key, <client>.key_secret, allowed/)")
    client_key: str = knob("", "This client's key name in keys_dir (agent-1 -> agent-1.key_secret)")
    connect_timeout_s: float = knob(10.0, "How long to wait for the broker's configuration at start", min=0.1)
    ports: dict = knob(
        {}, "Override registry ports by name (publish, subscribe, control, secure_*); tests and odd hosts"
    )


@dataclass
class BrokerConfig:
    """The central server."""

    bind: str = knob("127.0.0.1", "Address the plain endpoints bind to (0.0.0.0 in containers)")
    secure: bool = knob(False, "Also open the CURVE endpoints for remote agents")
    secure_bind: str = knob("0.0.0.0", "Address the CURVE endpoints bind to")
    plain: bool = knob(
        True,
        "Open the plain (unauthenticated) endpoints on broker.bind; false: on 127.0.0.1 only (the broker's "
        "own heartbeat), so with secure every other service is on CURVE, each key publishing and subscribing "
        "only what its role may (proto/registry.yaml)",
    )
    secure_max_subscriptions: int = knob(
        4096,
        "Distinct prefixes the CURVE subscribers may hold in all; past it a subscription is refused",
        min=1,
    )
    count_topics: bool = knob(
        True,
        "Count messages and bytes per topic family (see count_with); the C proxy always counts (it costs "
        "nothing there): false only spares the capture socket where that is not built",
    )
    count_with: Literal["auto", "capture"] = knob(
        "auto",
        "auto: a counting proxy in C (services/broker/_countproxy.c) forwards and counts, no Python per "
        "message; where it is not built, or with capture, libzmq's proxy hands a copy of every message to "
        "a capture socket that Python reads (10-15 % slower at 400 KB on two cores). Only the C proxy keeps "
        "the lanes apart, refuses a message over its family's max_bytes and counts a full queue's "
        "overflows; libzmq's proxy serves both lanes from one queue with the main lane's hwm, which then "
        "may hold that many weights (the start log says how much)",
    )
    count_every_s: float = knob(
        0.02,
        "Per-topic counts reach /metrics this often: the counting proxy's totals are read, or the capture "
        "socket is read, everything queued at once (0: the capture socket is polled, read at once)",
        min=0.0,
        max=1.0,
    )
    count_queue: int = knob(
        10_000,
        "Captured messages waiting to be counted; past it libzmq drops captures, never the bus's messages "
        "(counted as drops{cause=capture_full}: the per-topic counts then run low)",
        min=1,
    )
    snapshot_hwm: int = knob(
        64,
        "Last-value cache: at most this many topics kept per topic family (weights, config, console)",
        min=1,
    )
    snapshot_max_bytes: int = knob(
        2_000_000_000,
        "Last-value cache: at most this many bytes kept in all (the least recently updated topic goes first)",
        min=1,
    )
    queue_bytes: int = knob(
        256_000_000,
        "Bytes the broker may queue for one connection in one direction (a stalled subscriber, a fast "
        "publisher). ZeroMQ counts messages, so each socket's high-water mark is derived: queue_bytes // the "
        "largest message it carries - 1 (one more crosses the wire), at least 2: a queue whose largest "
        "message is over a third of queue_bytes holds 3 of them (the bulk lane: weights, 1 GB). A full queue "
        "gets 20 ms to make room (a burst to a healthy subscriber passes); past that the broker drops, for "
        "that peer alone, and counts each overflow (drops{cause=queue_overflow_<family>}; receivers count "
        "the messages lost, drops{cause=seq_gap}). The bounds are logged at start and exported as "
        "charles_broker_queue_bound_bytes{queue}. 0: unbounded (benchmarks only)",
        min=0,
    )


@dataclass
class ServiceConfig:
    """What every service process shares."""

    http_host: str = knob("127.0.0.1", "Address of /metrics and /healthz (0.0.0.0 in containers)")
    http_port: int = knob(
        0, "Port of /metrics and /healthz; 0 takes the registry's port for the service", min=0, max=65535
    )
    log_level: str = knob("INFO", "DEBUG, INFO, WARNING or ERROR")
    log_format: Literal["text", "json"] = knob("text", "text for people, json for log shippers")
    heartbeat_s: float = knob(1.0, "Heartbeat period on the bus", min=0.05)
    shutdown_s: float = knob(
        5.0, "A service that has not stopped this long after SIGTERM exits hard", min=0.1
    )
    reject_log_period_s: float = knob(10.0, "Log each reject reason at most once per this period", min=0.0)


@dataclass
class RunConfig:
    """A whole run: one file configures every service."""

    run: str = knob("charles", "Run name (checkpoints, TensorBoard and consoles use it)")
    bus: BusConfig = knob(BusConfig(), "Connection to the broker")
    broker: BrokerConfig = knob(BrokerConfig(), "Broker settings")
    service: ServiceConfig = knob(ServiceConfig(), "Settings every service shares")


SECTIONS: dict[str, type] = {}
"""Further sections registered by the service packages (collector, sim, balancer, trainer, player)."""


def register_section(name: str, cls: type) -> None:
    """Let a service package add its typed section to the run configuration."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"section {name} must be a dataclass")
    SECTIONS[name] = cls


# ---------------------------------------------------------------------------------------------- parsing


def _coerce(value: Any, tp: Any, path: str, meta: Mapping | None = None) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a section (a map), got {value!r}")
        return from_dict(tp, value, path)
    if origin is Literal:
        # YAML 1.1 (PyYAML, --set, CHARLES__*) reads a bare off/on as false/true: give a choice named so back
        if isinstance(value, bool) and ("on" if value else "off") in typing.get_args(tp):
            value = "on" if value else "off"
        if value not in typing.get_args(tp):
            raise ConfigError(f"{path}: {value!r} is not one of {list(typing.get_args(tp))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path, meta)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError("; ".join(errors))
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{path}: expected true or false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool) or not isinstance(value, int | float | str):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        try:
            v = tp(value)
        except ValueError:
            raise ConfigError(f"{path}: expected {tp.__name__}, got {value!r}") from None
        if tp is int and isinstance(value, float) and value != int(value):
            raise ConfigError(f"{path}: expected a whole number, got {value!r}")
        if v != v or v in (float("inf"), float("-inf")):
            raise ConfigError(f"{path}: {value!r} is not a finite number")
        lo, hi = (meta or {}).get("min"), (meta or {}).get("max")
        if lo is not None and v < lo or hi is not None and v > hi:
            raise ConfigError(f"{path}: {v} is outside [{lo}, {hi}]")
        return v
    if tp is str:
        if not isinstance(value, str | int | float) or isinstance(value, bool):
            raise ConfigError(f"{path}: expected text, got {value!r}")
        return str(value)
    if origin in (list, tuple, Sequence) or tp in (list, tuple):
        if isinstance(value, str):
            value = [
                v.strip() for v in value.split(",") if v.strip()
            ]  # CHARLES__X__NAMES=a,b from the environment
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        if args and args[-1] is not Ellipsis and origin is not tuple:
            return [_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is tuple and args and args[-1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
        return list(value) if origin is not tuple else tuple(value)
    if origin is dict or tp is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{path}: expected a map, got {value!r}")
        return dict(value)
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def from_dict(cls: type, data: Mapping, path: str = "") -> Any:
    """Build a config dataclass from a plain map, checking names, types and ranges."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(data) - set(fields)
    if unknown:
        where = path or cls.__name__
        raise ConfigError(f"{where}: unknown setting(s) {sorted(unknown)}; known: {sorted(fields)}")
    kwargs = {}
    for name, value in data.items():
        f = fields[name]
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name, f.metadata)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # a section's own __post_init__ checks
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def to_dict(obj: Any) -> Any:
    """A config (or any nested dataclass) as plain YAML/msgpack-friendly data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, list | tuple):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if (
        hasattr(obj, "value")
        and type(obj).__module__ != "builtins"
        and not isinstance(obj, int | float | str)
    ):
        return obj.value  # enums
    return obj


def _merge(base: dict, over: Mapping) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


def _set_path(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"{dotted}: {k} is not a section")
    d[keys[-1]] = value


def env_overrides(environ: Mapping[str, str]) -> dict:
    """``CHARLES__TRAINER__BATCH_SIZE=32`` -> {"trainer": {"batch_size": 32}}."""
    out: dict = {}
    for key, raw in environ.items():
        if not key.startswith(ENV_PREFIX):
            continue
        dotted = key[len(ENV_PREFIX) :].lower().replace("__", ".")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        _set_path(out, dotted, value)
    return out


@dataclass
class Config:
    """The resolved configuration: the core sections typed, the registered sections typed too."""

    core: RunConfig
    sections: dict[str, Any]

    def __getattr__(self, name: str) -> Any:
        if name in ("core", "sections"):
            raise AttributeError(name)
        if name in self.sections:
            return self.sections[name]
        return getattr(self.core, name)

    def to_dict(self) -> dict:
        d = to_dict(self.core)
        for name, sec in self.sections.items():
            d[name] = to_dict(sec)
        return d


def load(
    path: str | os.PathLike | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Sequence[str] = (),
    data: Mapping | None = None,
) -> Config:
    """Resolve the run configuration. Later sources win: defaults, file, ``data``, environment, overrides."""
    _import_sections()
    environ = os.environ if environ is None else environ
    merged: dict = {}
    path = path or environ.get("CHARLES_CONFIG") or None
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"configuration file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{p}: the top level must be a map of sections")
        merged = _merge(merged, loaded)
    if data:
        merged = _merge(merged, data)
    merged = _merge(merged, env_overrides(environ))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        k, v = item.split("=", 1)
        _set_path(merged, k.strip(), yaml.safe_load(v) if v else "")
    return from_data(merged)


def from_data(merged: Mapping) -> Config:
    """A Config from one plain map (what the broker serves, what a checkpoint saved)."""
    _import_sections()
    core_fields = {f.name: f for f in dataclasses.fields(RunConfig)}
    unknown = set(merged) - set(core_fields) - set(SECTIONS)
    if unknown:
        sections = sorted([*SECTIONS, *(n for n, f in core_fields.items() if _is_section(f))])
        settings = sorted(n for n, f in core_fields.items() if not _is_section(f))
        raise ConfigError(
            f"unknown section(s) {sorted(unknown)}; the sections are {sections}, the top-level settings {settings}"
        )
    core_part = {k: v for k, v in merged.items() if k not in SECTIONS}
    extra = {k: v for k, v in merged.items() if k in SECTIONS}
    core = from_dict(RunConfig, core_part)
    sections = {name: from_dict(cls, extra.get(name, {}), name) for name, cls in SECTIONS.items()}
    return Config(core, sections)


def _is_section(f: dataclasses.Field) -> bool:
    return dataclasses.is_dataclass(_hints(RunConfig)[f.name])


def _import_sections() -> None:
    """Import the service packages that register config sections (cheap: config modules only)."""
    import importlib

    for mod in SECTION_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


SECTION_MODULES: list[str] = ["charles.sections"]
"""Modules whose import registers the typed sections of the services."""


def render(cfg: Config | Any, *, comments: bool = True) -> str:
    """YAML of the resolved configuration, each field preceded by its help line."""
    if not comments:
        return yaml.safe_dump(cfg.to_dict() if isinstance(cfg, Config) else to_dict(cfg), sort_keys=False)
    lines: list[str] = []

    def emit(obj: Any, indent: int) -> None:
        pad = "  " * indent
        for f in dataclasses.fields(obj):
            v = getattr(obj, f.name)
            helptext = f.metadata.get("help", "")
            if helptext:
                lines.append(f"{pad}# {helptext}")
            if dataclasses.is_dataclass(v):
                lines.append(f"{pad}{f.name}:")
                emit(v, indent + 1)
            else:
                dumped = yaml.safe_dump(
                    {f.name: to_dict(v)}, default_flow_style=True, sort_keys=False
                ).strip()
                lines.append(f"{pad}{dumped[1:-1]}")  # drop the one pair of braces flow style adds

    if isinstance(cfg, Config):
        emit(cfg.core, 0)
        for name, sec in cfg.sections.items():
            lines.append(f"# {type(sec).__doc__.strip().splitlines()[0] if type(sec).__doc__ else name}")
            lines.append(f"{name}:")
            emit(sec, 1)
    else:
        emit(cfg, 0)
    return "\n".join(lines) + "\n"


LOCAL_SECTIONS = ("bus", "service", "broker")
"""This process's own facts (how it reaches the broker, where it serves /metrics): never the broker's."""


def run_config(
    local: Config,
    served: Mapping[str, Any],
    overrides: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> Config:
    """The broker's configuration, with what is this process's own on top.

    The broker's sections are the run's truth (every collector feeds the same model line). This process
    keeps its own ``bus``, ``service`` and ``broker`` sections, and its environment (``CHARLES__*``) and
    command line (``--set``) win over the broker: they are explicit per-process choices.
    """
    known = {f.name for f in dataclasses.fields(RunConfig)} | set(SECTIONS)
    data = {k: v for k, v in served.items() if k in known and k not in LOCAL_SECTIONS}
    mine = local.to_dict()
    data.update({k: mine[k] for k in LOCAL_SECTIONS})
    env = dict(os.environ if environ is None else environ)
    env.pop("CHARLES_CONFIG", None)  # the file was read for `local`; the broker's values replace it
    return load(None, environ=env, overrides=overrides, data=data)


def add_arguments(
    ap: Any,
    config_help: str = "run configuration file (default: $CHARLES_CONFIG)",
    set_help: str = "override a setting",
) -> None:
    """``--config FILE`` and ``--set SECTION.FIELD=VALUE`` (repeatable): every entry point reads its
    configuration the same way (``load(args.config, overrides=args.set)``)."""
    ap.add_argument("--config", help=config_help)
    ap.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE", help=set_help)
