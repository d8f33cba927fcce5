"""The topic registry: proto/registry.yaml loaded once into typed records."""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources

import yaml

KINDS = (
    "sample",
    "sample_set",
    "weights",
    "config",
    "game_frame",
    "action",
    "console",
    "camera",
    "score",
    "heartbeat",
)
"""Message kinds on the bus, plus the request/reply kinds of the broker's control port."""
CONTROL_KINDS = ("config_request", "config_reply", "snapshot_request", "snapshot_end")


LANES = ("main", "bulk")
"""The broker's subscriber lanes, main first: a family's messages leave the broker on its lane's subscribe
ports (``subscribe``, ``subscribe_bulk`` and their ``secure_`` twins), in queues sized for that lane's
largest message (see Registry.lane_max_bytes and the broker's ``queue_bytes``)."""

SUBSCRIPTION_MAX_BYTES = 65536
"""``ZMQ_MAXMSGSIZE`` of sockets that receive only subscriptions (PUB, XPUB): far above any topic the
registry allows (``max_topic_bytes``), and above CURVE's handshake commands, which the limit also counts."""


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
    publish: tuple[str, ...] = ()
    """Key roles that may publish the family on the secure endpoints ("any": every role)."""
    subscribe: tuple[str, ...] = ()
    """Key roles that may subscribe to it there."""
    lane: str = "main"
    """The broker's subscriber lane the family travels in (LANES)."""


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
    roles: tuple[str, ...] = ()

    @property
    def max_topic_bytes(self) -> int:
        """The longest topic any socket carries (limits.max_topic_bytes: one source for codec and broker)."""
        return self.limits.max_topic_bytes

    def _family_of(self, name: str | bytes) -> str | None:
        """A topic's (or prefix's) family name: None when it is too long or not ASCII."""
        if len(name) > self.limits.max_topic_bytes:
            return None
        if isinstance(name, bytes | bytearray | memoryview):
            try:
                name = bytes(name).decode("ascii")
            except UnicodeDecodeError:
                return None
        return name.split(".", 1)[0]

    def topic(self, name: str | bytes) -> Topic | None:
        """The registry entry for a concrete topic ("sample.collector-1" -> the "sample" family)."""
        family = self._family_of(name)
        return None if family is None else self.topics.get(family)

    def family(self, name: str | bytes) -> str:
        """A bounded label for metrics: the family, or "unknown"."""
        t = self.topic(name)
        return t.family if t else "unknown"

    def lane_max_bytes(self, lane: str) -> int:
        """The largest message of a lane: its queues are sized by it."""
        return max(t.max_bytes for t in self.topics.values() if t.lane == lane)

    def lanes_of(self, prefixes: Iterable[str]) -> list[str]:
        """The lanes a subscriber to these prefixes must connect to: each family's, every lane for a prefix
        that is not within one family ("" or "w")."""
        lanes = set()
        for p in prefixes:
            t = self.topic(p)
            lanes |= {t.lane} if t is not None else set(LANES)
        return [lane for lane in LANES if lane in lanes]

    def may_publish(self, role: str, topic: str | bytes) -> bool:
        """May a key of this role publish this topic on the secure side?"""
        t = self.topic(topic)
        return t is not None and (role in t.publish or "any" in t.publish)

    def may_subscribe(self, role: str, prefix: str | bytes) -> bool:
        """May a key of this role subscribe to this prefix? The prefix must name a whole family the role
        may read ("weights" or "weights.line"): "" or "w" would match families it may not."""
        t = self.topic(prefix)
        return t is not None and (role in t.subscribe or "any" in t.subscribe)


def vouches(identity: str, sender: str) -> bool:
    """Does a key named ``identity`` speak for ``sender``? Its own name, or an instance of it
    (``collector`` for ``collector-7f9c``): replicas share their role's key. Key names are checked at load
    so that no key's name starts with another's name and a dash (proto/README.md "Roles and permissions")."""
    return sender == identity or (
        sender.startswith(identity) and sender[len(identity) : len(identity) + 1] == "-"
    )


def subscribe_port(lane: str, secure: bool = False) -> str:
    """The name of a lane's subscribe port in ``broker.ports``: ``subscribe``, ``subscribe_bulk``, with
    ``secure_`` before it on the CURVE side."""
    name = "subscribe" if lane == LANES[0] else f"subscribe_{lane}"
    return f"secure_{name}" if secure else name


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
            publish=tuple(t.get("publish", ())),
            subscribe=tuple(t.get("subscribe", ())),
            lane=t.get("lane", "main"),
        )
        if topics[fam].lane not in LANES:
            raise ValueError(f"topic {fam}: lane {topics[fam].lane!r} is not one of {LANES}")
        unknown = {r for r in (*topics[fam].publish, *topics[fam].subscribe) if r != "any"} - set(
            doc.get("roles", ())
        )
        if unknown:
            raise ValueError(f"topic {fam}: unknown roles {sorted(unknown)}")
    ports = {k: int(v) for k, v in doc["broker"]["ports"].items()}
    for lane in {t.lane for t in topics.values()}:
        for name in (subscribe_port(lane), subscribe_port(lane, secure=True)):
            if name not in ports:
                raise ValueError(f"lane {lane}: broker.ports has no {name}")
    services = {
        name: ServiceEntry(name, s["module"], int(s["http_port"]), s["image"], int(s["replicas"]))
        for name, s in doc["services"].items()
    }
    return Registry(
        schema_version=int(doc["schema_version"]),
        limits=Limits(**{k: int(v) for k, v in doc["limits"].items()}),
        broker_host=doc["broker"]["host"],
        ports=ports,
        topics=topics,
        services=services,
        roles=tuple(doc.get("roles", ())),
    )


@functools.cache
def registry() -> Registry:
    text = resources.files("charles.proto").joinpath("registry.yaml").read_text()
    return _parse(yaml.safe_load(text))
