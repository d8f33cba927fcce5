"""What both Windows agents share: their configuration, their Service, and a fixed-rate clock.

An agent is configured like every service (``bus`` and ``service`` sections from a file, ``CHARLES__*``
environment variables and ``--set``), plus its own section (``capture`` or ``gamepad``) which lives in the
same file but is not part of the run configuration the broker serves: the game PC keeps one small YAML
file per agent, for example::

    bus: {host: charles.example.org, secure: true, keys_dir: C:/charles/keys, client_key: capture-agent}
    capture: {id: capture-agent, mode: collect, frames: dxcam}

The agent section is read with the same typed, validated machinery (``charles.config.from_dict``), from
the file, then ``CHARLES__CAPTURE__FPS=20``-style variables, then ``--set capture.fps=20``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from charles import config as config_mod

log = logging.getLogger("charles.agents")


def load_agent_config(
    section: str,
    cls: type,
    path: str | None = None,
    sets: Sequence[str] = (),
    environ: Mapping[str, str] | None = None,
) -> tuple[config_mod.Config, Any]:
    """(run configuration, agent settings) from one file, the environment and ``--set`` overrides."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.pop("CHARLES_CONFIG", None) or None
    environ.pop("CHARLES_CONFIG", None)
    rest = agent_environ(section, environ)
    mine = {k: v for k, v in environ.items() if k not in rest}  # CHARLES__<SECTION>__*: the agent's own
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise config_mod.ConfigError(f"configuration file {p} does not exist")
        loaded = yaml.safe_load(p.read_text()) or {}
        if not isinstance(loaded, Mapping):
            raise config_mod.ConfigError(f"{p}: the top level must be a map of sections")
        data = dict(loaded)
    own = data.pop(section, None) or {}
    if not isinstance(own, Mapping):
        raise config_mod.ConfigError(f"{section}: expected a section (a map), got {own!r}")
    own = dict(own)
    for k, v in config_mod.env_overrides(mine).get(section, {}).items():
        own[k] = v
    run_sets = []
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise config_mod.ConfigError(f"override {item!r} must look like section.field=value")
        if key.strip().startswith(f"{section}."):
            own[key.strip()[len(section) + 1 :]] = yaml.safe_load(value) if value else ""
        else:
            run_sets.append(item)
    cfg = config_mod.load(None, environ=rest, overrides=run_sets, data=data)
    settings = config_mod.from_dict(cls, own, section)
    return cfg, settings


def agent_environ(section: str, environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment without the agent's own ``CHARLES__<SECTION>__*`` variables: what the run
    configuration reads (it knows no agent sections)."""
    prefix = f"{config_mod.ENV_PREFIX}{section.upper()}__"
    return {k: v for k, v in (os.environ if environ is None else environ).items() if not k.startswith(prefix)}


def check_bus(cfg: config_mod.Config, require_secure: bool, default_key: str) -> None:
    """Agents run on the game PC, outside the cluster: by default they talk only to the CURVE endpoints."""
    bus = cfg.bus
    if require_secure and not bus.secure:
        raise config_mod.ConfigError(
            "bus.secure is false: agents connect from the game PC and must authenticate with CURVE keys "
            "(set bus.secure=true, bus.keys_dir and bus.client_key; or require_secure=false on a trusted host)"
        )
    if bus.secure and not bus.client_key:
        bus.client_key = default_key
    if bus.secure:
        d = Path(bus.keys_dir)
        for f in (d / "broker.key", d / f"{bus.client_key}.key_secret"):
            if not f.is_file():
                raise config_mod.ConfigError(
                    f"{f} is missing: copy broker.key and {bus.client_key}.key_secret from `charles keys`"
                )


class Pacer:
    """Ticks at a fixed rate on the monotonic clock: tick k is due at start + k / rate_hz.

    Deadlines never drift (each is computed from the start, not from the previous wake-up). A loop that
    falls more than one period behind skips the missed ticks instead of bursting to catch up; ``missed``
    counts them.
    """

    def __init__(self, rate_hz: float, clock: Any = time.monotonic, sleep: Any = time.sleep):
        if rate_hz <= 0:
            raise ValueError("rate_hz must be > 0")
        self.period = 1.0 / rate_hz
        self.clock = clock
        self.sleep = sleep
        self.start = clock()
        self.k = 0
        self.missed = 0

    def wait(self) -> tuple[int, float]:
        """Sleep until the next tick is due; returns (tick index, its due time)."""
        due = self.start + self.k * self.period
        now = self.clock()
        if now < due:
            self.sleep(due - now)
        elif now - due >= self.period:
            k = int((now - self.start) / self.period)
            self.missed += k - self.k
            self.k = k
            due = self.start + k * self.period
        k = self.k
        self.k += 1
        return k, due


def setup(cfg: config_mod.Config) -> None:
    from charles.runtime import setup_logging

    setup_logging(cfg.service.log_level, cfg.service.log_format)
