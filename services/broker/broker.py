"""The central server: XSUB/XPUB forwarding, a last-value cache, the config service, CURVE for agents.

Hot path: a proxy in C moves every message between publishers and subscribers and counts messages and
bytes per topic family as it goes (``_countproxy.c``, on pyzmq's own libzmq); no Python touches a message
on its way through. Where that extension is not built (or ``broker.count_with: capture``), libzmq's
``zmq.proxy_steerable`` forwards and hands a copy of each message to a capture socket that Python reads
in batches every ``broker.count_every_s`` (a PUB capture socket: if Python falls behind, captures are
dropped and counted as such, never the data; bench/broker.py: 10-15 % slower at 400 KB on two cores,
because the copies keep 400 KB buffers alive until Python has read them).

Queues: ZeroMQ bounds a queue in messages, so bytes come from ``broker.queue_bytes`` and the largest message
each socket carries (``queue_plan``): per connection and direction at most queue_bytes, or 3 of the largest
message where that is more. Subscribers get their families through one of two *lanes* (registry.yaml
``lane``): the main lane (at most 16 MB a message: hwm 15 at the default 256 MB) and the bulk lane (sets
and weights, up to 1 GB: hwm 2), each its own XPUB and ports, so a heartbeat never waits in a queue that
must be short because it may hold weights. (The marks stay put: libzmq's low-water protocol can leave a
queue stuck when its mark changes.) The C proxy sends each message to its family's lane, refuses one over
its family's ``max_bytes`` (libzmq's ``ZMQ_MAXMSGSIZE`` bounds a frame, not a message), gives a full queue
PATIENCE_MS to make room (a burst to a healthy subscriber passes a short queue) and counts each overflow
(``drops{cause=queue_overflow_<family>}``: once per overflow, since libzmq then passes that subscriber by
unseen until it reads again; receivers count what they lost from sequence numbers,
``drops{cause=seq_gap}``). What the lanes' queues hold is ``charles_broker_queue_held_bytes``. Python sees
only:

* the *last-value* families (weights, config, console) through an internal SUB, to keep the newest
  message per topic for late joiners (served on the control port as a snapshot);
* the per-family counts (the C proxy's totals, or the capture socket's copies), every 20 ms;
* the control port (ROUTER): ``[b"config", header]`` -> the run configuration, ``[b"snapshot", prefix]``
  -> the cached newest messages, each reply sequence ended by ``[b"!end"]``.

With ``broker.secure`` a second set of endpoints speaks CURVE, with an allow-list of client public keys
(``keys/allowed/*.key``, each with its role; reloaded on SIGHUP). They are bridged into the same bus by a
Python thread (``SecureBridge``) that checks every message and every subscription against the key's role
(proto/registry.yaml ``publish`` / ``subscribe``) and the header's ``sender`` against the key's name: the
trust boundary. ``broker.plain: false`` closes the plain endpoints, so every peer is a key.
"""

from __future__ import annotations

import collections
import contextlib
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import prometheus_client as prom
import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils.monitor import recv_monitor_message

from charles.proto import ConfigReply, ProtocolError, decode, encode, registry
from charles.proto.registry import LANES, SUBSCRIPTION_MAX_BYTES, subscribe_port, vouches
from charles.runtime import Service

_INPROC_OUT = "inproc://bus-out-{}"  # a lane's XPUB, for the last-value SUB and the secure bridge
_INPROC_SECURE_IN = "inproc://secure-in"  # XPUB of the secure-publish bridge; the main XSUB connects to it
_INPROC_CAPTURE = "inproc://capture"
_AUTH_EVENTS = {
    zmq.EVENT_HANDSHAKE_FAILED_AUTH: "auth_refused",
    zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "handshake_protocol",
    zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "handshake_failed",
}


def loaded_libzmq() -> str | None:
    """Path of the libzmq this process has loaded (pyzmq's), from /proc/self/maps; None off Linux."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                path = line.rstrip("\n").split(maxsplit=5)[-1]
                if "/libzmq" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return None


COUNTPROXY_API = 4
"""The ``run()`` of ``_countproxy.c`` this file calls (lanes, limits, four counters a family, what the lanes'
queues hold, patience)."""


def counting_proxy() -> Any | None:
    """The C counting proxy (``_countproxy.c``) bound to pyzmq's libzmq, or None where it is not built,
    was built from another version of the file (``make install`` builds it again), or cannot find the
    library (libzmq's proxy forwards then, and the capture socket counts)."""
    try:
        from charles.broker import _countproxy
    except ImportError:
        return None
    if getattr(_countproxy, "API", 1) != COUNTPROXY_API:
        return None
    path = loaded_libzmq()
    if path is None:
        return None
    try:
        _countproxy.load(path)
    except OSError:
        return None
    return _countproxy


MIN_HWM = 2
"""The smallest high-water mark a broker queue gets, whatever queue_bytes says: two messages sent back to
back (a set per balanced output) must not cost a healthy subscriber the second while the first is still
on its way out."""
PATIENCE_MS = 20
"""How long a subscriber's full queue gets to make room before the subscriber loses the message: enough for
a healthy one behind a burst (its broker-side I/O has not run yet, or libzmq has not yet told the sender
what it took), short enough that a stalled one costs the bus little: libzmq then leaves it out, without
waiting, until it reads again."""
WAIT_PER_S_MS = 50
"""What a lane may wait for full queues in all, a second: a subscriber that is slow, not stalled, cannot make
the bus wait PATIENCE_MS a message."""


class Patience:
    """What a lane may still wait for full queues: WAIT_PER_S_MS a second, PATIENCE_MS at a time (the C
    proxy's publish() does the same for the bus's lanes)."""

    def __init__(self) -> None:
        self.credit = WAIT_PER_S_MS / 1000
        self.refilled = time.monotonic()

    def allowed(self) -> float:
        """Seconds the next wait may take."""
        now = time.monotonic()
        self.credit = min(WAIT_PER_S_MS / 1000, self.credit + (now - self.refilled) * WAIT_PER_S_MS / 1000)
        self.refilled = now
        return min(PATIENCE_MS / 1000, self.credit)


@dataclass(frozen=True)
class Queue:
    """One direction of one connection of a broker socket: ZeroMQ's high-water mark and the bytes it allows."""

    hwm: int
    """Messages (0: unbounded)"""
    largest: int
    """The largest message this direction carries, bytes"""

    @property
    def bound(self) -> float:
        """Bytes it may hold: hwm messages queued and one crossing the wire (inf when unbounded)."""
        return float("inf") if self.hwm == 0 else float((self.hwm + 1) * self.largest)


def queue(budget: int, largest: int) -> Queue:
    """The queue of ``budget`` bytes (0: unbounded) for messages of at most ``largest`` bytes."""
    return Queue(0 if budget == 0 else max(MIN_HWM, budget // largest - 1), largest)


def queue_plan(budget: int, lanes: bool) -> dict[str, Queue]:
    """Each broker port's data queue per connection, by port name: what publishers send (``publish``,
    ``secure_publish``: up to ``ZMQ_MAXMSGSIZE`` a frame) and what each lane's subscribers are sent.
    ``lanes`` false: one XPUB serves every lane (libzmq's proxy cannot tell them apart) with the main lane's
    hwm, so that bursts of small messages still pass: its bound is then that many of the largest message."""
    reg = registry()
    everything = max(t.max_bytes for t in reg.topics.values())
    plan = {
        "publish": queue(budget, everything),
        "secure_publish": queue(budget, max(t.max_bytes for t in reg.topics.values() if t.publish)),
    }
    for lane in LANES:
        q = queue(budget, reg.lane_max_bytes(lane))
        if not lanes:
            q = Queue(queue(budget, reg.lane_max_bytes(LANES[0])).hwm, everything)
        plan[subscribe_port(lane)] = plan[subscribe_port(lane, secure=True)] = q
    return plan


def publish_counted(sock: zmq.Socket, frames: list, patience: Patience | None = None) -> bool:
    """Send to an ``XPUB_NODROP`` socket without blocking: True when every matching subscriber took it,
    False when a queue overflowed (the message then goes, lossy, to the others; libzmq passes the full one
    by, unseen, until it reads again). A plain XPUB drops in silence. With ``patience``, a full queue first
    gets what it allows to make room."""
    try:
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        return True
    except zmq.Again:  # from the first frame, before anything was sent
        pass
    if patience is not None:
        start = time.monotonic()
        deadline = start + patience.allowed()
        try:
            while time.monotonic() < deadline:
                time.sleep(0.0002)
                sock.getsockopt(zmq.EVENTS)  # reads the socket's commands: what its subscribers have taken
                try:
                    sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
                    return True
                except zmq.Again:
                    pass
        finally:
            patience.credit -= time.monotonic() - start
    sock.setsockopt(zmq.XPUB_NODROP, 0)
    try:
        sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
    finally:
        sock.setsockopt(zmq.XPUB_NODROP, 1)
    return False


class LastValues:
    """Newest validated message per topic, bounded in topics per family and in bytes overall.

    A family's topics evict only each other (``max_topics`` per family, least recently updated first), so
    a flood of console topics can never push out the newest weights or the config. Over ``max_bytes`` the
    least recently updated topic of any family goes, never the one just stored. Every eviction is
    counted by family and cause (``topics`` or ``bytes``) and reported to ``on_evict``.
    """

    def __init__(
        self, max_topics: int, max_bytes: int, on_evict: Callable[[str, str], None] | None = None
    ) -> None:
        self.max_topics = max_topics
        self.max_bytes = max_bytes
        self.items: collections.OrderedDict[str, list[bytes]] = collections.OrderedDict()
        """topic -> frames, least recently updated first"""
        self.nbytes = 0
        self.per_family: collections.Counter[str] = collections.Counter()
        self.evicted: collections.Counter[tuple[str, str]] = collections.Counter()
        self._on_evict = on_evict
        self._family = registry().family

    def put(self, topic: str, frames: list[bytes]) -> None:
        family = self._family(topic)
        old = self.items.pop(topic, None)
        if old is not None:
            self.nbytes -= sum(len(f) for f in old)
            self.per_family[family] -= 1
        self.items[topic] = frames
        self.nbytes += sum(len(f) for f in frames)
        self.per_family[family] += 1
        if self.per_family[family] > self.max_topics:
            self._evict(next(t for t in self.items if self._family(t) == family), "topics")
        while self.nbytes > self.max_bytes and len(self.items) > 1:
            self._evict(next(iter(self.items)), "bytes")

    def _evict(self, topic: str, cause: str) -> None:
        family = self._family(topic)
        self.nbytes -= sum(len(f) for f in self.items.pop(topic))
        self.per_family[family] -= 1
        self.evicted[family, cause] += 1
        if self._on_evict is not None:
            self._on_evict(family, cause)

    def matching(self, prefix: str) -> list[list[bytes]]:
        return [f for t, f in self.items.items() if t.startswith(prefix)]


@dataclass(frozen=True)
class ClientKey:
    name: str
    """The key's identity: a peer on it may only send as ``name`` or ``name-<anything>``."""
    role: str


def _cert_field(text: str, key: str) -> str | None:
    for line in text.splitlines():
        k, eq, v = line.strip().partition("=")
        if eq and k.strip() == key:
            return v.strip().strip("'\"")
    return None


def load_allowed(allowed: Path, log: Any) -> dict[str, ClientKey]:
    """The allowed client keys (z85 public key -> name and role) from ``allowed/*.key``.

    A key without a known role, or whose name another key's name would vouch for (``player`` and
    ``player-2``: ``player``'s peers may send as ``player-2``), is left out and logged: allowing it would
    blur whose messages are whose.
    """
    reg = registry()
    out: dict[str, ClientKey] = {}
    for path in sorted(allowed.glob("*.key")):
        try:
            public, _ = zmq.auth.load_certificate(path)
            text = path.read_text()
        except (OSError, ValueError) as e:
            log.error(f"allowed key {path.name} unreadable: {e}")
            continue
        name = _cert_field(text, "name") or path.stem
        role = _cert_field(text, "role") or name.replace("-", "_")
        if role not in reg.roles:
            log.error(f"allowed key {path.name}: role {role!r} is not one of {reg.roles}; not allowed")
            continue
        out[public.decode("ascii")] = ClientKey(name, role)
    names = {k.name for k in out.values()}
    for z85, key in list(out.items()):
        owner = next((n for n in names if n != key.name and vouches(n, key.name)), None)
        if owner is not None:
            log.error(f"allowed key {key.name!r}: key {owner!r} would vouch for it; rename one; not allowed")
            del out[z85]
    return out


@dataclass
class SecureLane:
    """One secure subscribe side: an XSUB on a lane's inproc XPUB, and the CURVE XPUB it feeds."""

    bridge_out: zmq.Socket
    sec_xpub: zmq.Socket
    families: set[bytes]
    """Families this lane's bridge_out subscribes on the bus, each once."""
    patience: Patience = field(default_factory=Patience)


class SecureBridge:
    """The CURVE endpoints' bridge into the bus, checking each message and subscription against its key.

    Publishing (secure XSUB -> the bus): a message is forwarded only if its key is still allowed
    (``revoked_key``), its role may publish the family (``forbidden_topic``), it decodes
    (the codec's reasons) and its header's ``sender`` is the key's identity (``spoofed_sender``).
    Subscribing (a secure XPUB per lane, in manual mode): a subscription takes effect only if the role may
    read that family (``forbidden_subscription``) and the distinct prefixes stay bounded
    (``too_many_subscriptions``). The bus side subscribes per family, once: peers come and go, the family
    stays (the secure XPUB filters per peer). What a full queue drops on the way is counted, as on the bus.
    """

    def __init__(self, broker: Broker, sec_xsub: zmq.Socket, bridge_in: zmq.Socket, lanes: list[SecureLane]):
        self.b = broker
        self.sec_xsub, self.bridge_in, self.lanes = sec_xsub, bridge_in, lanes
        self.reg = registry()
        self.prefixes: set[bytes] = set()
        self.forwarded = 0

    def refuse(self, reason: str, key: ClientKey | None, detail: str) -> None:
        role = key.role if key else "none"
        self.b.m_refused.labels(reason=reason, role=role).inc()
        self.b.svc.reject(reason, f"{detail} (key {key.name if key else '?'}, role {role})")

    def key_of(self, frame: zmq.Frame) -> ClientKey | None:
        try:
            return self.b.keys.get(frame.get("User-Id"))
        except zmq.ZMQError:  # no metadata: not from a CURVE peer
            return None

    def on_publish(self, frames: list) -> None:
        key = self.key_of(frames[0])
        if key is None:
            self.refuse("revoked_key", None, "a message on a key no longer allowed")
            return
        topic = frames[0].bytes
        if not self.reg.may_publish(key.role, topic):
            self.refuse("forbidden_topic", key, f"may not publish {topic[:64]!r}")
            return
        try:
            env = decode(frames)
        except ProtocolError as e:
            self.refuse(e.reason, key, f"at the secure door: {e}")
            return
        if not vouches(key.name, env.sender):
            self.refuse("spoofed_sender", key, f"sent as {env.sender[:64]!r}")
            return
        if publish_counted(self.bridge_in, frames):
            self.forwarded += 1
        else:  # the bus's inbound queue is full: the rest of the bus is slower than the agents
            self.b.count_overflow(topic)

    def on_subscription(self, lane: SecureLane, frame: zmq.Frame) -> None:
        data = frame.bytes
        if not data or data[0] not in (0, 1):
            return  # XPUB passes nothing else up; anything else is not a subscription
        prefix = data[1:]
        if data[0] == 0:
            # an unsubscription (a peer's, or libzmq's for a peer that left): that peer's filter only; the
            # bus side keeps the family (another peer may read it)
            lane.sec_xpub.setsockopt(zmq.UNSUBSCRIBE, prefix)
            return
        key = self.key_of(frame)
        if key is None:
            self.refuse("revoked_key", None, f"a subscription to {prefix[:64]!r} on a key no longer allowed")
            return
        if not self.reg.may_subscribe(key.role, prefix):
            self.refuse("forbidden_subscription", key, f"may not subscribe to {prefix[:64]!r}")
            return
        if prefix not in self.prefixes:
            if len(self.prefixes) >= self.b.cfg.secure_max_subscriptions:
                self.refuse("too_many_subscriptions", key, f"{len(self.prefixes)} prefixes held")
                return
            self.prefixes.add(prefix)
        lane.sec_xpub.setsockopt(zmq.SUBSCRIBE, prefix)
        family = prefix.split(b".", 1)[0]
        if family not in lane.families:
            lane.families.add(family)
            lane.bridge_out.send(b"\x01" + family)

    def run(self, stop: threading.Event) -> None:
        """Move messages both ways until ``stop`` (or the context ends)."""
        poller = zmq.Poller()
        for sock in (self.sec_xsub, self.bridge_in):
            poller.register(sock, zmq.POLLIN)
        for lane in self.lanes:
            poller.register(lane.bridge_out, zmq.POLLIN)
            poller.register(lane.sec_xpub, zmq.POLLIN)
        nb = zmq.NOBLOCK
        while not stop.is_set():
            events = dict(poller.poll(200))
            # each socket drained up to 256 messages a turn, so no side starves the others
            for _ in range(256 if self.sec_xsub in events else 0):  # agents -> bus, checked
                try:
                    self.on_publish(self.sec_xsub.recv_multipart(copy=False, flags=nb))
                except zmq.Again:
                    break
            for _ in range(256 if self.bridge_in in events else 0):  # the bus's subscriptions -> agents
                try:
                    self.sec_xsub.send(self.bridge_in.recv(flags=nb))
                except zmq.Again:
                    break
            for lane in self.lanes:
                # bus -> agents (the XPUB filters per peer)
                for _ in range(256 if lane.bridge_out in events else 0):
                    try:
                        frames = lane.bridge_out.recv_multipart(copy=False, flags=nb)
                    except zmq.Again:
                        break
                    if not publish_counted(lane.sec_xpub, frames, lane.patience):
                        self.b.count_overflow(frames[0].bytes)
                for _ in range(256 if lane.sec_xpub in events else 0):  # agents' subscriptions, checked
                    try:
                        self.on_subscription(lane, lane.sec_xpub.recv(copy=False, flags=nb))
                    except zmq.Again:
                        break


class Broker:
    def __init__(self, svc: Service, served_config: dict):
        self.svc = svc
        self.cfg = svc.cfg.broker
        self.reg = registry()
        self.served_config = served_config
        r = svc.metrics.registry
        self.m_lvc = prom.Gauge(
            "charles_broker_last_value_topics", "Topics held in the last-value cache", registry=r
        )
        self.m_lvc_bytes = prom.Gauge(
            "charles_broker_last_value_bytes", "Bytes held in the last-value cache", registry=r
        )
        self.m_lvc_evicted = prom.Counter(
            "charles_broker_last_value_evictions_total",
            "Topics dropped from the last-value cache, by family and cause (topics: the family's cap; bytes)",
            ["family", "cause"],
            registry=r,
        )
        self.lvc = LastValues(
            self.cfg.snapshot_hwm,
            self.cfg.snapshot_max_bytes,
            lambda family, cause: self.m_lvc_evicted.labels(family=family, cause=cause).inc(),
        )
        self.m_auth = prom.Counter(
            "charles_broker_auth_failures_total", "Refused CURVE handshakes by event", ["event"], registry=r
        )
        self.m_refused = prom.Counter(
            "charles_broker_refused_total",
            "What the secure endpoints refused, by reason and the key's role (each also in charles_rejects_total)",
            ["reason", "role"],
            registry=r,
        )
        self.m_keys = prom.Gauge("charles_broker_allowed_keys", "CURVE client keys allowed now", registry=r)
        self.keys: dict[str, ClientKey] = {}
        """z85 public key -> its name and role; replaced whole on SIGHUP (readers see old or new)."""
        self._reload = threading.Event()
        self.m_requests = prom.Counter(
            "charles_broker_requests_total", "Control-port requests by verb", ["verb"], registry=r
        )
        self.m_snapshot = prom.Counter(
            "charles_broker_snapshot_messages_total", "Last values served to late joiners", registry=r
        )
        self.m_queue_hwm = prom.Gauge(
            "charles_broker_queue_hwm",
            "High-water mark (messages) of one connection's data queue, by port (0: unbounded)",
            ["queue"],
            registry=r,
        )
        self.m_queue_held = prom.Gauge(
            "charles_broker_queue_held_bytes",
            "Bytes the subscribers' queues of a lane hold now (a message queued for several counted once)",
            ["lane"],
            registry=r,
        )
        self.m_queue_bound = prom.Gauge(
            "charles_broker_queue_bound_bytes",
            "Bytes one connection's data queue may hold, by port: hwm messages and one crossing the wire, "
            "each at most the largest message the port carries (broker.queue_bytes)",
            ["queue"],
            registry=r,
        )
        self.queues: dict[str, Queue] = {}
        """Each port's data queue per connection (queue_plan), set at start."""
        self.lane_xpubs: dict[tuple[str, ...], zmq.Socket] = {}
        """Lanes -> the XPUB that serves them (one per lane with the C proxy, one for all without)."""
        self._threads: list[threading.Thread] = []
        self._proxy_controls: list[zmq.Socket] = []
        self._auth: ThreadAuthenticator | None = None
        self.bound = threading.Event()
        self.through = 0
        self._through: dict[bytes, tuple[Any, Any]] = {}
        """Topic bytes -> its family's (messages, bytes) counters, for the capture path."""
        self.ports: dict[str, int] = {}
        self.counting = "off"
        """How the bus is counted: ``c`` (the counting proxy), ``capture`` (the capture socket) or ``off``."""
        self._families = tuple(f.encode() for f in self.reg.topics)
        self._counts = np.zeros((len(self._families) + 1, 4), np.int64)
        """The C proxy's counts per family, the last row "unknown": messages and bytes forwarded, overflows of
        a subscriber's queue, messages refused over max_bytes; it writes, we read."""
        self._counted = self._counts.copy()
        self._held = np.zeros((len(LANES), 2), np.int64)
        """Per lane XPUB, as the C proxy last saw them: the bytes and the messages its subscribers' queues hold
        (a message queued for several counted once); it writes, we read."""

    # -- endpoints -----------------------------------------------------------------------------------------

    def _bind(self, sock: zmq.Socket, host: str, port: int) -> int:
        if port == 0:
            return sock.bind_to_random_port(f"tcp://{host}")
        sock.bind(f"tcp://{host}:{port}")
        return port

    def start(self, ports: dict[str, int] | None = None) -> None:
        """Bind every endpoint and start the proxies. ``ports`` overrides the registry (tests use 0)."""
        ports = {**self.reg.ports, **self.svc.cfg.bus.ports, **(ports or {})}
        s = self.svc.socket
        bind = self.cfg.bind
        proxy = counting_proxy() if self.cfg.count_with == "auto" else None
        self.counting = "c" if proxy is not None else "capture" if self.cfg.count_topics else "off"
        self.queues = queue_plan(self.cfg.queue_bytes, lanes=proxy is not None)
        # subscriptions (at most SUBSCRIPTION_MAX_BYTES each) travel the other way of every socket
        subs = queue(self.cfg.queue_bytes, SUBSCRIPTION_MAX_BYTES)

        # main bus: one XSUB for every publisher; one XPUB per lane, which the C proxy sends each family to
        # (libzmq's proxy has one: every lane's ports are bound to it)
        xsub = s(zmq.XSUB)
        xsub.setsockopt(zmq.RCVHWM, self.queues["publish"].hwm)
        xsub.setsockopt(zmq.SNDHWM, subs.hwm)
        # a frame larger than any family allows ends its sender's connection inside libzmq before it is
        # buffered; a subscription longer than any topic likewise. (A frame, not a message: libzmq bounds
        # neither a message's frames nor their sum; the C proxy refuses a message over its family's max_bytes
        # before any subscriber's queue holds it.)
        xsub.setsockopt(zmq.MAXMSGSIZE, max(t.max_bytes for t in self.reg.topics.values()))
        if not self.cfg.plain:
            # secure-only: the plain endpoints serve this process alone (its own heartbeat), never the network
            bind = "127.0.0.1"
        self.ports["publish"] = self._bind(xsub, bind, ports["publish"])
        for lanes in [(lane,) for lane in LANES] if proxy is not None else [LANES]:
            xpub = s(zmq.XPUB)
            xpub.setsockopt(zmq.SNDHWM, self.queues[subscribe_port(lanes[0])].hwm)
            xpub.setsockopt(zmq.RCVHWM, subs.hwm)
            xpub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES)
            for lane in lanes:
                self.ports[subscribe_port(lane)] = self._bind(xpub, bind, ports[subscribe_port(lane)])
            xpub.bind(_INPROC_OUT.format(lanes[0]))
            self.lane_xpubs[lanes] = xpub
        capture = None
        if self.counting == "capture":
            capture = s(zmq.PUB, hwm=self.cfg.count_queue)
            capture.bind(_INPROC_CAPTURE)

        self.control = s(zmq.ROUTER)
        self.control.setsockopt(zmq.ROUTER_MANDATORY, 0)
        self.control.setsockopt(zmq.MAXMSGSIZE, self.reg.topics["config"].max_bytes)
        self.ports["control"] = self._bind(self.control, bind, ports["control"])

        self.secure_control = None
        if self.cfg.secure:
            self._start_secure(ports, xsub, subs)

        self._start_proxy("bus", xsub, list(self.lane_xpubs.values()), capture, proxy)

        # last-value SUB (subscribes after the proxy runs so its subscription reaches publishers); its queue
        # from each lane is the lane's hwm plus its own 1 (inproc adds both ends'): a lane's bound, as a peer's
        self.lv_sub = s(zmq.SUB, hwm=1)
        for fam, t in self.reg.topics.items():
            # the broker alone makes the configuration: whatever a publisher sends on "config" is never cached
            if t.last_value and fam != "config":
                self.lv_sub.setsockopt(zmq.SUBSCRIBE, fam.encode())
        for lanes in self.lane_xpubs:
            self.lv_sub.connect(_INPROC_OUT.format(lanes[0]))
        self.cap_sub = None
        if capture is not None:
            self.cap_sub = s(zmq.SUB, hwm=self.cfg.count_queue)
            self.cap_sub.setsockopt(zmq.SUBSCRIBE, b"")
            self.cap_sub.connect(_INPROC_CAPTURE)

        cfg_frames = encode("config", ConfigReply(self.served_config), self.svc.instance)
        # kept apart from the cache too (the config request is answered from here, whatever the cache holds)
        self.config_frames = [bytes(f) for f in cfg_frames]
        self._cache("config", self.config_frames)
        self.bound.set()
        self.svc.log.info(
            "broker up: "
            + ", ".join(f"{k}={v}" for k, v in self.ports.items())
            + (" (CURVE on)" if self.cfg.secure else " (plain only)")
            + f"; counting per topic: {self.counting}"
        )
        self._report_queues()

    def _report_queues(self) -> None:
        """Log each port's queue bound per connection and export it: what a stalled peer can cost."""
        parts, over = [], []
        for name, q in self.queues.items():
            if name.startswith("secure_") and not self.cfg.secure:
                continue
            self.m_queue_hwm.labels(name).set(q.hwm)
            self.m_queue_bound.labels(name).set(q.bound)
            size = "unbounded" if q.hwm == 0 else f"{q.bound / 1e6:.0f} MB"
            parts.append(f"{name} {size} (hwm {q.hwm}, messages up to {q.largest / 1e6:g} MB)")
            if q.bound > self.cfg.queue_bytes > 0:
                over.append(name)
        if over:
            parts.append(
                f"{MIN_HWM + 1} of their largest message are more than queue_bytes: {', '.join(over)}"
            )
        if len(self.lane_xpubs) == 1:
            self.svc.log.warning(
                "libzmq's proxy forwards (the C counting proxy is not built, or not from this version: "
                "make install): one queue per subscriber for both lanes, the main lane's hwm of messages up to "
                "1 GB (bounds below); overflows are not counted, nor a message over its family's max_bytes "
                "refused"
            )
        budget = self.cfg.queue_bytes / 1e6
        self.svc.log.info(
            f"queues per connection and direction (queue_bytes {budget:g} MB): " + "; ".join(parts)
        )

    def _start_secure(self, ports: dict[str, int], main_xsub: zmq.Socket, subs: Queue) -> None:
        keys = Path(self.svc.cfg.bus.keys_dir)
        allowed = keys / "allowed"
        if not (keys / "broker.key_secret").is_file():
            raise FileNotFoundError(f"{keys / 'broker.key_secret'} is missing: run `make keys` first")
        if not allowed.is_dir():
            raise FileNotFoundError(
                f"{allowed} is missing: run `make keys` (it holds the allowed clients' public keys)"
            )
        public, secret = zmq.auth.load_certificate(keys / "broker.key_secret")
        self._allowed = allowed
        self.reload_keys()
        self._auth = ThreadAuthenticator(self.svc.ctx)
        self._auth.start()
        # the handshake asks the same table the per-message checks read: revoking on SIGHUP shuts both doors
        self._auth.configure_curve_callback(domain="*", credentials_provider=self)
        host = self.cfg.secure_bind
        s = self.svc.socket

        def server(kind: int) -> zmq.Socket:
            sock = s(kind)
            sock.curve_server = True
            sock.curve_publickey, sock.curve_secretkey = public, secret
            return sock

        # agents -> bus: secure XSUB -> (checks) -> inproc XPUB, which the main XSUB connects to
        sec_xsub = server(zmq.XSUB)
        sec_xsub.setsockopt(zmq.RCVHWM, self.queues["secure_publish"].hwm)
        sec_xsub.setsockopt(zmq.SNDHWM, subs.hwm)
        sec_xsub.setsockopt(zmq.MAXMSGSIZE, max(t.max_bytes for t in self.reg.topics.values() if t.publish))
        self.ports["secure_publish"] = self._bind(sec_xsub, host, ports["secure_publish"])
        bridge_in = s(zmq.XPUB)
        # into the main XSUB's queue (inproc adds both ends' marks: 1 + its hwm), as one more publisher
        bridge_in.setsockopt(zmq.SNDHWM, 1)
        bridge_in.setsockopt(zmq.XPUB_NODROP, 1)
        bridge_in.bind(_INPROC_SECURE_IN)
        main_xsub.connect(_INPROC_SECURE_IN)
        # bus -> agents, per lane: XSUB on the lane's inproc XPUB -> secure XPUB (subscriptions checked, manual)
        lanes = []
        for served in self.lane_xpubs:
            bridge_out = s(zmq.XSUB, hwm=1)  # the lane's hwm + 1, as a subscriber's (inproc adds both ends')
            bridge_out.setsockopt(zmq.SNDHWM, subs.hwm)
            bridge_out.connect(_INPROC_OUT.format(served[0]))
            sec_xpub = server(zmq.XPUB)
            sec_xpub.setsockopt(zmq.XPUB_MANUAL, 1)
            sec_xpub.setsockopt(zmq.XPUB_NODROP, 1)
            sec_xpub.setsockopt(zmq.SNDHWM, self.queues[subscribe_port(served[0], secure=True)].hwm)
            sec_xpub.setsockopt(zmq.RCVHWM, subs.hwm)
            sec_xpub.setsockopt(zmq.MAXMSGSIZE, SUBSCRIPTION_MAX_BYTES)
            for lane in served:
                name = subscribe_port(lane, secure=True)
                self.ports[name] = self._bind(sec_xpub, host, ports[name])
            lanes.append(SecureLane(bridge_out, sec_xpub, set()))
        self.secure_control = server(zmq.ROUTER)
        self.secure_control.setsockopt(zmq.MAXMSGSIZE, self.reg.topics["config"].max_bytes)
        self.ports["secure_control"] = self._bind(self.secure_control, host, ports["secure_control"])
        watched = (sec_xsub, *(lane.sec_xpub for lane in lanes), self.secure_control)
        self._monitors = [sock.get_monitor_socket() for sock in watched]
        for mon in self._monitors:
            mon.setsockopt(zmq.LINGER, 0)
            self.svc.adopt(mon)  # closed with the others, or the context never terminates
        self.bridge = SecureBridge(self, sec_xsub, bridge_in, lanes)
        self._bridge_stop = threading.Event()
        t = threading.Thread(target=self._run_bridge, name="secure-bridge", daemon=True)
        t.start()
        self._threads.append(t)
        self.svc.vital(t)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGHUP, lambda *_: self._reload.set())

    def _run_bridge(self) -> None:
        try:
            self.bridge.run(self._bridge_stop)
        except zmq.ContextTerminated:
            pass
        except zmq.ZMQError as e:
            if e.errno != zmq.ETERM:
                self.svc.log.error(f"secure bridge stopped: {e}")

    def reload_keys(self) -> None:
        """Read ``allowed/`` again (SIGHUP): new keys may connect, removed ones are refused from their next
        message and handshake on (a subscriber already connected keeps its subscriptions until it leaves)."""
        before = set(self.keys)
        self.keys = load_allowed(self._allowed, self.svc.log)
        self.m_keys.set(len(self.keys))
        gone, new = len(before - set(self.keys)), len(set(self.keys) - before)
        self.svc.log.info(f"{len(self.keys)} client keys allowed ({new} new, {gone} revoked)")

    def callback(self, domain: str, key: bytes) -> bool:
        """ZAP: is this z85 public key allowed now? (pyzmq's credentials-provider interface)"""
        return key.decode("ascii", "replace") in self.keys

    def _start_proxy(
        self,
        name: str,
        front: zmq.Socket,
        backs: list[zmq.Socket],
        capture: zmq.Socket | None,
        counting: Any | None = None,
    ) -> None:
        """libzmq's proxy in a thread (one back), or with ``counting`` (the C counting proxy module) that one,
        which sends each family to its lane's back."""
        ctl_addr = f"inproc://proxy-control-{name}"
        ctl = self.svc.socket(zmq.PAIR)
        ctl.bind(ctl_addr)
        peer = self.svc.socket(zmq.PAIR)
        peer.connect(ctl_addr)
        self._proxy_controls.append(ctl)
        lane_of = {lane: i for i, lanes in enumerate(self.lane_xpubs) for lane in lanes}
        families = list(self.reg.topics.values())
        lanes = (*(lane_of[t.lane] for t in families), lane_of[LANES[0]])
        # a topic of no family ("unknown") travels the main lane, bounded as its largest message
        limits = (*(t.max_bytes for t in families), self.reg.lane_max_bytes(LANES[0]))

        def run() -> None:
            try:
                if counting is not None:
                    counting.run(
                        front.underlying,
                        tuple(b.underlying for b in backs),
                        peer.underlying,
                        self._families,
                        lanes,
                        limits,
                        self._counts,
                        self._held,
                        PATIENCE_MS,
                        WAIT_PER_S_MS,
                        zmq.ETERM,
                    )
                else:
                    zmq.proxy_steerable(front, backs[0], capture, peer)
            except zmq.ContextTerminated:
                pass
            except zmq.ZMQError as e:
                if e.errno != zmq.ETERM:
                    self.svc.log.error(f"proxy {name} stopped: {e}")
            except OSError as e:  # the counting proxy's libzmq errors
                self.svc.log.error(f"proxy {name} stopped: {e}")

        t = threading.Thread(target=run, name=f"proxy-{name}", daemon=True)
        t.start()
        self._threads.append(t)
        self.svc.vital(t)  # a proxy that stopped while the broker runs makes it degraded, not silently idle

    # -- the Python side: last values, counting, control ----------------------------------------------------

    def _on_last_value(self, frames: list) -> None:
        try:
            env = decode(frames)
        except ProtocolError as e:
            # not cached: a late joiner must never be handed a message that fails validation
            self.svc.reject(e.reason, f"not caching a bad last value: {e}")
            return
        self._cache(env.topic, [bytes(f.buffer) for f in frames])

    def _cache(self, topic: str, frames: list[bytes]) -> None:
        self.lvc.put(topic, frames)
        self.m_lvc.set(len(self.lvc.items))
        self.m_lvc_bytes.set(self.lvc.nbytes)

    def _family_counters(self, topic: bytes) -> tuple[Any, Any]:
        """A topic's family's (messages, bytes) "through" counters, looked up once per topic."""
        counters = self._through.get(topic)
        if counters is None:
            fam = self.reg.family(topic)
            m = self.svc.metrics
            counters = (m.messages.labels("through", fam), m.bytes.labels("through", fam))
            if len(self._through) < 4096:  # bounded: made-up topics cannot grow it
                self._through[topic] = counters
        return counters

    def flush_counts(self) -> int:
        """Move what the C counting proxy counted since the last call into the metrics; how many messages."""
        now = self._counts.copy()  # each int64 is read whole; a row read mid-update is right next time
        delta = now - self._counted
        if not delta.any():
            self._report_held()
            return 0
        self._counted = now
        m = self.svc.metrics
        for i in np.flatnonzero(delta.any(axis=1)):
            msgs, nbytes, overflows, refused = (int(x) for x in delta[i])
            # a family's own name is a topic of that family; the last row is the registry's "unknown"
            topic = self._families[i] if i < len(self._families) else b""
            counters = self._family_counters(topic)
            counters[0].inc(msgs)
            counters[1].inc(nbytes)
            if overflows:
                m.drops.labels(cause=f"queue_overflow_{self.reg.family(topic)}").inc(overflows)
            if refused:
                fam = self.reg.family(topic)
                limit = self.reg.topics[fam].max_bytes if fam in self.reg.topics else "its lane's largest"
                self.svc.reject("oversize", f"{refused} {fam} message(s) over {limit} bytes refused", refused)
        self._report_held()
        n = int(delta[:, 0].sum())
        self.through += n
        self.svc.info["through_msgs"] = self.through
        return n

    def _report_held(self) -> None:
        for i, lanes in enumerate(self.lane_xpubs):
            self.m_queue_held.labels(lanes[0]).set(int(self._held[i, 0]))

    def count_overflow(self, topic: bytes) -> None:
        """A queue on the secure side overflowed at this message (the C proxy counts the bus's)."""
        self.svc.metrics.drops.labels(cause=f"queue_overflow_{self.reg.family(topic)}").inc()

    def _on_capture(self, frames: list) -> None:
        # every message through the bus passes here: per-topic counters are looked up once, not per call
        first = frames[0].bytes
        if len(frames) == 1 and first[:1] in (b"\x00", b"\x01"):
            return  # a (un)subscription travelling upstream
        counters = self._family_counters(first)
        self.through += 1
        self.svc.info["through_msgs"] = self.through
        counters[0].inc()
        counters[1].inc(sum(map(len, frames)))

    def _on_control(self, sock: zmq.Socket, frames: list) -> None:
        ident, rest = frames[0].bytes, frames[1:]
        verb = rest[0].bytes if rest else b""
        replies: list[list] = []
        key = None
        if sock is self.secure_control and rest:
            key = self.bridge.key_of(rest[0])
            if key is None:
                self.bridge.refuse("revoked_key", None, "a control request on a key no longer allowed")
                sock.send_multipart([ident, b"!end"])
                return
        if verb == b"config":
            self.m_requests.labels("config").inc()
            try:
                env = decode([b"config", *rest[1:]], control=True)
                if env.kind != "config_request":
                    raise ProtocolError("kind_mismatch", f"expected config_request, got {env.kind}")
                replies.append(self.config_frames)
                self.svc.log.info(f"served the configuration to {env.sender} ({env.msg.role})")
            except ProtocolError as e:
                self.svc.reject(e.reason, f"bad configuration request: {e}")
                replies.append(encode("config", ConfigReply({}, error=str(e)), self.svc.instance))
        elif verb == b"snapshot":
            self.m_requests.labels("snapshot").inc()
            prefix = rest[1].bytes.decode("ascii", "replace") if len(rest) > 1 else ""
            if key is not None and not self.reg.may_subscribe(key.role, prefix):
                self.bridge.refuse("forbidden_subscription", key, f"snapshot of {prefix[:64]!r}")
                prefix = None
            hits = self.lvc.matching(prefix) if prefix is not None else []
            self.m_snapshot.inc(len(hits))
            replies.extend(hits)
        else:
            self.m_requests.labels("unknown").inc()
            self.svc.reject("unknown_kind", f"control verb {verb[:32]!r}")
        for r in replies:
            sock.send_multipart([ident, *r], copy=False)
        sock.send_multipart([ident, b"!end"])

    def _on_monitor(self, mon: zmq.Socket) -> None:
        evt = recv_monitor_message(mon)
        name = _AUTH_EVENTS.get(evt["event"])
        if name:
            self.m_auth.labels(name).inc()
            self.svc.reject(
                "unauthenticated", f"CURVE handshake refused ({name}) from {evt.get('endpoint', b'')!r}"
            )

    def serve(self) -> None:
        """The broker's Python loop (control requests, last values, counting) until the service stops."""
        poller = zmq.Poller()
        handlers: dict[zmq.Socket, Any] = {
            self.control: lambda f: self._on_control(self.control, f),
            self.lv_sub: self._on_last_value,
        }
        if self.secure_control is not None:
            handlers[self.secure_control] = lambda f: self._on_control(self.secure_control, f)
        # Per-topic counts: the C proxy's totals are moved into the metrics every count_every_s (0: after
        # every poll). The capture socket (every message on the bus) is read in batches on the same clock,
        # not polled: polling it woke this thread, and libzmq's proxy thread to signal it, once per message;
        # only count_every_s = 0 polls it.
        every = self.cfg.count_every_s
        count: Callable[[], int] | None = None
        if self.counting == "c":
            count = self.flush_counts
        elif self.cap_sub is not None and every > 0:
            count = self._count_captures
        elif self.cap_sub is not None:
            handlers[self.cap_sub] = self._on_capture
        for sock in handlers:
            poller.register(sock, zmq.POLLIN)
        for mon in getattr(self, "_monitors", []):
            poller.register(mon, zmq.POLLIN)
        next_count = time.monotonic()
        self.svc.ready()
        loop = self.svc.metrics.loop.labels("broker")
        while self.svc.running:
            if self._reload.is_set():
                self._reload.clear()
                self.reload_keys()
            timeout = 200.0
            if count is not None and every > 0:
                timeout = min(timeout, max(0.0, next_count - time.monotonic()) * 1000.0)
            events = dict(poller.poll(timeout))
            t0 = time.perf_counter()
            for sock in events:
                if sock in handlers:
                    # drain what is there, bounded, so one busy socket cannot starve the others
                    self._drain(sock, handlers[sock], 256)
                else:
                    self._on_monitor(sock)
            counted = 0
            if count is not None and time.monotonic() >= next_count:
                next_count = time.monotonic() + every
                counted = count()
            if events or counted:
                loop.observe(time.perf_counter() - t0)

    def _count_captures(self) -> int:
        """Count every queued capture; a full queue means libzmq may have dropped some."""
        n = self._drain(self.cap_sub, self._on_capture, self.cfg.count_queue)
        if n >= self.cfg.count_queue:
            # the counts run low, the bus's messages are untouched: say so instead of undercounting in silence
            self.svc.metrics.drops.labels(cause="capture_full").inc()
        return n

    @staticmethod
    def _drain(sock: zmq.Socket, handler: Callable[[list], None], limit: int) -> int:
        """Hand up to ``limit`` queued messages to ``handler``; how many there were."""
        for n in range(limit):
            try:
                frames = sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                return n
            handler(frames)
        return limit

    def close(self) -> None:
        if self.secure_control is not None:
            self._bridge_stop.set()
        for ctl in self._proxy_controls:
            with contextlib.suppress(zmq.ZMQError):  # a proxy already gone needs no telling
                ctl.send(b"TERMINATE", flags=zmq.NOBLOCK)
        for t in self._threads:
            t.join(timeout=2)
        if self.counting == "c":
            self.flush_counts()  # what the proxy counted after the loop's last look
        if self._auth is not None:
            self._auth.stop()
