"""The topic registry: proto/registry.yaml loaded once into typed records."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from importlib import resources

import yaml

KINDS = ("sample", "sample_set", "weights", "config", "game_frame", "action", "console", "heartbeat")
"""Message kinds on the bus, plus the request/reply kinds of the broker's control port."""
CONTROL_KINDS = ("config_request", "config_reply", "snapshot_request", "snapshot_end")


@dataclass(frozen=True)
class Topic:
    family: str
    kind: str
    senders: tuple[str, ...]
    receivers: tuple[str, ...]
    rate_hz: float
    hwm: int
    max_bytes: int
    last_value: bool
    about: str


@dataclass(frozen=True)
class Limits:
    """What a receiver refuses before it looks further (registry.yaml ``limits``)."""

    max_topic_bytes: int
    max_header_bytes: int
    max_side: int
    max_history: int
    max_stack: int
    max_set: int
    max_images: int


@dataclass(frozen=True)
class ServiceEntry:
    name: str
    module: str
    http_port: int
    image: str
    replicas: int


@dataclass(frozen=True)
class Registry:
    schema_version: int
    limits: Limits
    broker_host: str
    ports: dict[str, int]
    topics: dict[str, Topic]
    services: dict[str, ServiceEntry]

    def topic(self, name: str | bytes) -> Topic | None:
        """The registry entry for a concrete topic ("sample.collector-1" -> the "sample" family)."""
        if len(name) > self.limits.max_topic_bytes:
            return None
        if isinstance(name, bytes | bytearray | memoryview):
            try:
                name = bytes(name).decode("ascii")
            except UnicodeDecodeError:
                return None
        return self.topics.get(name.split(".", 1)[0])

    def family(self, name: str | bytes) -> str:
        """A bounded label for metrics: the family, or "unknown"."""
        t = self.topic(name)
        return t.family if t else "unknown"


def _parse(doc: dict) -> Registry:
    topics = {}
    for fam, t in doc["topics"].items():
        if t["kind"] not in KINDS:
            raise ValueError(f"topic {fam}: unknown kind {t['kind']!r}")
        topics[fam] = Topic(
            family=fam,
            kind=t["kind"],
            senders=tuple(t["from"]),
            receivers=tuple(t["to"]),
            rate_hz=float(t["rate_hz"]),
            hwm=int(t["hwm"]),
            max_bytes=int(t["max_bytes"]),
            last_value=bool(t["last_value"]),
            about=t.get("about", ""),
        )
    services = {
        name: ServiceEntry(name, s["module"], int(s["http_port"]), s["image"], int(s["replicas"]))
        for name, s in doc["services"].items()
    }
    return Registry(
        schema_version=int(doc["schema_version"]),
        limits=Limits(**{k: int(v) for k, v in doc["limits"].items()}),
        broker_host=doc["broker"]["host"],
        ports={k: int(v) for k, v in doc["broker"]["ports"].items()},
        topics=topics,
        services=services,
    )


@functools.cache
def registry() -> Registry:
    text = resources.files("charles.proto").joinpath("registry.yaml").read_text()
    return _parse(yaml.safe_load(text))
