"""What every service process shares: logs, metrics, health, the bus, heartbeats, clean shutdown.

A service's ``main`` builds a ``Service`` (one ZeroMQ context, one metrics registry, one HTTP server for
/metrics and /healthz), asks it for publishers and subscribers, and runs its loop while
``service.running``. SIGTERM and SIGINT end the loop; ``close`` closes every socket with linger 0, and a
watchdog exits the process hard if shutdown takes longer than ``service.shutdown_s``.
"""

from __future__ import annotations

import collections
import contextlib
import faulthandler
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, NoReturn

import prometheus_client as prom
import zmq

from charles.config import Config
from charles.proto import Heartbeat, ProtocolError, decode, encode, registry
from charles.proto.codec import Envelope
from charles.proto.registry import LANES, SUBSCRIPTION_MAX_BYTES, subscribe_port

_FETCH_SLICE_S = 0.5
"""A configuration request waits at most this long before looking at SIGTERM again."""

log = logging.getLogger("charles")

# ---------------------------------------------------------------------------------------------- logging


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        out.update(getattr(record, "fields", {}))
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class _TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        base = f"{time.strftime('%H:%M:%S', time.localtime(record.created))} {record.levelname[0]} {record.name}: {record.getMessage()}"
        fields = getattr(record, "fields", None)
        if fields:
            base += " " + " ".join(f"{k}={v}" for k, v in fields.items())
        if record.exc_info:
            base += "\n" + self.formatException(record.exc_info)
        return base


def setup_logging(level: str = "INFO", fmt: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_JsonFormatter() if fmt == "json" else _TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


class RateLimitedLog:
    """Log each key at most once per period, saying how many were held back (bad input can be a flood)."""

    def __init__(self, logger: logging.Logger, period_s: float):
        self.logger = logger
        self.period = period_s
        self._last: dict[str, float] = {}
        self._held: collections.Counter[str] = collections.Counter()

    def warn(self, key: str, msg: str) -> None:
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.period:
            self._held[key] += 1
            return
        held = self._held.pop(key, 0)
        if len(self._last) > 1024:  # keys are reasons (a bounded set), but stay bounded regardless
            self._last.clear()
        self._last[key] = now
        suffix = f" ({held} more since last report)" if held else ""
        self.logger.warning(f"{msg}{suffix}")


# ---------------------------------------------------------------------------------------------- metrics


class Metrics:
    """The service's Prometheus registry with the families every service has."""

    def __init__(self, service: str, instance: str):
        self.registry = prom.CollectorRegistry(auto_describe=True)
        r = self.registry
        self.info = prom.Info("charles_service", "Service identity", registry=r)
        self.info.info({"service": service, "instance": instance, "pid": str(os.getpid())})
        self.messages = prom.Counter(
            "charles_messages_total",
            "Messages by direction and topic family",
            ["direction", "topic"],
            registry=r,
        )
        self.bytes = prom.Counter(
            "charles_bytes_total", "Bytes by direction and topic family", ["direction", "topic"], registry=r
        )
        self.rejects = prom.Counter(
            "charles_rejects_total", "Rejected input by reason", ["reason"], registry=r
        )
        self.drops = prom.Counter("charles_drops_total", "Dropped data by cause", ["cause"], registry=r)
        self.loop = prom.Histogram(
            "charles_loop_seconds",
            "Loop iteration time",
            ["loop"],
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
            registry=r,
        )
        self.up = prom.Gauge("charles_up", "1 while the service runs its loop", registry=r)
        self.alive = prom.Gauge(
            "charles_topic_alive", "1 if the topic family arrives at its expected rate", ["topic"], registry=r
        )
        self.rate = prom.Gauge(
            "charles_topic_rate_hz", "Measured arrival rate per topic family", ["topic"], registry=r
        )

    def render(self) -> bytes:
        return prom.generate_latest(self.registry)


# ---------------------------------------------------------------------------------------------- health


MAX_SENDERS = 4096
"""Senders whose sequence a SeqGaps follows; past this the least recently seen is forgotten and counted."""
MAX_SEQ_JUMP = 1_000_000
"""A forward jump larger than this is a restart (or a lie), not a gap: at 30 Hz, over nine hours of
messages lost from one sender. One spoofed seq of 10**15 must not add 10**15 to drops{cause="seq_gap"}."""


class SeqGaps:
    """Per-sender sequence numbers: how many messages went missing between two that arrived.

    A sequence that goes backwards, or jumps ahead by more than ``max_jump``, is a restarted sender (its seq
    starts again), not a gap. State is bounded: past ``max_senders`` the least recently seen sender is
    forgotten and counted in ``evicted`` (a flood of made-up sender ids shows there, instead of silently
    wiping real senders' state). The balancer follows collectors' samples, the trainer the balancer's sets,
    a collector and the player a capture agent's game frames.
    """

    def __init__(
        self, max_senders: int = MAX_SENDERS, max_jump: int = MAX_SEQ_JUMP, drops: prom.Counter | None = None
    ):
        self.max = max_senders
        self._evicted = drops.labels(cause="sender_evicted") if drops is not None else None
        self.max_jump = max_jump
        self.last: collections.OrderedDict[str, int] = collections.OrderedDict()
        """sender -> last seq, least recently seen first"""
        self.missing = 0
        self.restarts = 0
        self.evicted = 0

    def see(self, sender: str, seq: int) -> int:
        """Record one arrival; returns how many messages of this sender were skipped just before it."""
        last = self.last.pop(sender, None)
        if last is None and len(self.last) >= self.max:
            self.last.popitem(last=False)
            self.evicted += 1
            if self._evicted is not None:
                self._evicted.inc()
        self.last[sender] = seq
        if last is None:
            return 0
        if seq <= last or seq - last > self.max_jump:
            self.restarts += 1
            return 0
        gap = seq - last - 1
        self.missing += gap
        return gap


class TopicWatch:
    """Is each subscribed topic family arriving, and at what rate? (what health checks read)"""

    def __init__(self, families: Iterable[str]):
        reg = registry()
        self.expected = {f: reg.topics[f].rate_hz for f in families if f in reg.topics}
        self.count: collections.Counter[str] = collections.Counter()
        self.last: dict[str, float] = {}
        self._window: dict[str, collections.deque] = {f: collections.deque(maxlen=64) for f in self.expected}

    def saw(self, family: str, now: float) -> None:
        self.count[family] += 1
        self.last[family] = now
        w = self._window.get(family)
        if w is not None:
            w.append(now)

    def rate(self, family: str) -> float:
        w = self._window.get(family)
        if not w or len(w) < 2 or w[-1] == w[0]:
            return 0.0
        return (len(w) - 1) / (w[-1] - w[0])

    def alive(self, family: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        last = self.last.get(family)
        if last is None:
            return False
        rate = self.expected.get(family, 0.0)
        # a 30 Hz topic is dead after ~1 s of silence; irregular topics after a minute
        limit = max(1.0, 30.0 / rate) if rate > 0 else 60.0
        return now - last < limit


HTTP_TIMEOUT_S = 5.0
"""A /metrics or /healthz client that has not sent its request (or read the answer) in this long is cut off."""
HTTP_MAX_CONNECTIONS = 16
"""Connections served at once; past it a new one is closed at accept (Prometheus and a probe need two)."""


class _CappedHttpServer(ThreadingHTTPServer):
    """ThreadingHTTPServer with a bound on live connections: 300 idle half-requests were 300 threads."""

    daemon_threads = True
    request_queue_size = 128  # the listen backlog: a burst of connections is accepted (and refused) fast

    def __init__(self, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._slots = threading.BoundedSemaphore(HTTP_MAX_CONNECTIONS)
        self.refused = 0

    def verify_request(self, request: Any, client_address: Any) -> bool:
        if not self._slots.acquire(blocking=False):
            self.refused += 1
            svc = getattr(self, "service", None)
            if svc is not None:
                svc.metrics.rejects.labels(reason="http_busy").inc()
            return False  # socketserver closes it
        return True

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            return  # a client that went away (or never finished): nothing to print a traceback about
        super().handle_error(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _HttpHandler(BaseHTTPRequestHandler):
    service: Service
    timeout = (
        HTTP_TIMEOUT_S  # socketserver sets it on the connection: a half-sent request cannot hold a thread
    )

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        svc = self.server.service  # type: ignore[attr-defined]
        if self.path.startswith("/metrics"):
            body, ctype, code = svc.metrics.render(), prom.CONTENT_TYPE_LATEST, 200
        elif self.path.startswith("/healthz"):
            h = svc.health()
            body, ctype, code = json.dumps(h).encode(), "application/json", 200 if h["healthy"] else 503
        elif self.path.startswith("/state"):
            body, ctype, code = json.dumps(svc.state(), default=str).encode(), "application/json", 200
        else:
            extra = svc.http_routes.get(self.path.split("?", 1)[0])
            if extra is None:
                body, ctype, code = b"not found\n", "text/plain", 404
            else:
                # a route returns (body, content type) or (body, content type, status)
                body, ctype, *rest = extra()
                code = rest[0] if rest else 200
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: Prometheus scrapes often
        pass


# ---------------------------------------------------------------------------------------------- bus


class Publisher:
    """A PUB socket that never blocks the caller: at the high-water mark a message is dropped and counted."""

    def __init__(self, svc: Service, endpoint: str, hwm: int):
        self.svc = svc
        # a PUB receives only subscriptions, which the broker bounds to the longest topic
        self.sock = svc.socket(zmq.PUB, hwm=hwm, max_bytes=SUBSCRIPTION_MAX_BYTES)
        self.sock.connect(endpoint)

    def send(self, topic: str, msg: Any, kind: str | None = None) -> bool:
        frames = encode(topic, msg, self.svc.instance, kind)
        return self.send_frames(topic, frames)

    def close(self, linger_s: float = 1.0) -> None:
        """Close, giving queued messages (a final flush, the last weights) up to linger_s to leave."""
        self.sock.close(linger=int(linger_s * 1000))

    def send_frames(self, topic: str, frames: list) -> bool:
        fam = registry().family(topic)
        try:
            self.sock.send_multipart(frames, copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            self.svc.metrics.drops.labels(cause=f"hwm_{fam}").inc()
            return False
        m = self.svc.metrics
        m.messages.labels("out", fam).inc()
        m.bytes.labels("out", fam).inc(
            sum(memoryview(f).nbytes if not isinstance(f, bytes) else len(f) for f in frames)
        )
        return True


class Subscriber:
    """A SUB socket that decodes, validates, counts and (for last-value topics) fetches the newest value.

    ``recv`` returns an Envelope or None (timeout). A message that fails validation is counted by reason,
    logged once per period, and skipped: it never raises out of the loop.
    """

    def __init__(
        self, svc: Service, endpoints: list[str], prefixes: Iterable[str], hwm: int, late_join: bool = True
    ):
        self.svc = svc
        self.prefixes = list(prefixes)
        reg = registry()
        families = [t for p in self.prefixes if (t := reg.topic(p)) is not None]
        # bytes bound: libzmq drops the connection on a frame past twice the family's limit before buffering it
        # (the broker reconnects us; what was lost shows as seq gaps); one over the limit, but less than
        # twice, is still read and counted as oversize by the codec, so a sender's small overrun has a name
        limit = max((t.max_bytes for t in families), default=None)
        self.sock = svc.socket(zmq.SUB, hwm=hwm, max_bytes=2 * limit if limit else None)
        for p in self.prefixes:
            self.sock.setsockopt(zmq.SUBSCRIBE, p.encode())
        for endpoint in endpoints:  # the broker's lanes these prefixes travel in (Registry.lanes_of)
            self.sock.connect(endpoint)
        self.watch = TopicWatch({p.split(".", 1)[0] for p in self.prefixes})
        self.pending: collections.deque[Envelope] = collections.deque(
            maxlen=256
        )  # snapshot + one live message
        self.poller = zmq.Poller()
        self.poller.register(self.sock, zmq.POLLIN)
        lvc = [p for p in self.prefixes if (t := reg.topic(p)) is not None and t.last_value]
        if late_join and lvc:
            # The slow-joiner rule: what was published before we connected is lost, so ask the broker for
            # the newest value of each last-value topic (a duplicate later is harmless: receivers dedupe).
            for env in svc.snapshot(lvc):
                self._accept(env)

    def _accept(self, env: Envelope) -> None:
        fam = registry().family(env.topic)
        now = time.monotonic()
        self.watch.saw(fam, now)
        m = self.svc.metrics
        m.messages.labels("in", fam).inc()
        m.bytes.labels("in", fam).inc(env.nbytes)
        self.pending.append(env)

    def recv(self, timeout_ms: int = 100) -> Envelope | None:
        if self.pending:
            return self.pending.popleft()
        deadline = time.monotonic() + timeout_ms / 1000.0
        while True:
            remaining = max(0, int((deadline - time.monotonic()) * 1000))
            if not self.poller.poll(remaining):
                return None
            frames = self.sock.recv_multipart(copy=False)
            env = self.svc.decode(frames)
            if env is not None:
                self._accept(env)
                return self.pending.popleft()
            if time.monotonic() >= deadline:
                return None

    def drain(self, limit: int = 1000) -> list[Envelope]:
        """Everything waiting now (up to limit), without blocking."""
        out = []
        while self.pending and len(out) < limit:
            out.append(self.pending.popleft())
        while len(out) < limit:
            try:
                frames = self.sock.recv_multipart(copy=False, flags=zmq.NOBLOCK)
            except zmq.Again:
                break
            env = self.svc.decode(frames)
            if env is not None:
                self._accept(env)
                out.append(self.pending.popleft())
        return out


# ---------------------------------------------------------------------------------------------- service


def _load_curve_client(keys_dir: str, client_key: str) -> tuple[bytes, bytes, bytes]:
    import zmq.auth

    d = Path(keys_dir)
    server_public, _ = zmq.auth.load_certificate(d / "broker.key")
    public, secret = zmq.auth.load_certificate(d / f"{client_key}.key_secret")
    if secret is None:
        raise ValueError(f"{d / (client_key + '.key_secret')} holds no secret key")
    return public, secret, server_public


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports free right now (bound together, then released): tests, benches and
    ``charles up --random-ports``. Another process may take one before it is used; callers that can
    retry do."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def agent_service(name: str, cfg: Config, instance: str, http_port: int, **kw: Any) -> Service:
    """The Service of a process that runs outside compose and k8s (the agents, the sim agent): /metrics on
    its own fixed ``http_port`` unless ``service.http_port`` says otherwise."""
    if cfg.service.http_port == 0 and os.environ.get("CHARLES_HTTP_EPHEMERAL") != "1":
        cfg.service.http_port = http_port
    return Service(name, cfg, instance, **kw)


def default_instance(name: str) -> str:
    """A stable id (the same across restarts, so consoles and last values are replaced, not multiplied).

    In compose and k8s the host name is the container or pod name, which is unique per replica.
    """
    return os.environ.get("CHARLES_INSTANCE") or f"{name}-{socket.gethostname()}"


class Service:
    """One service process: context, metrics, HTTP, heartbeats, signals, shutdown."""

    def __init__(
        self, name: str, cfg: Config, instance: str | None = None, *, http: bool = True, signals: bool = True
    ):
        self.name = name
        self.cfg = cfg
        # on CURVE the broker vouches for senders named after the key (``collector`` -> ``collector-<host>``)
        secure_key = cfg.bus.client_key if cfg.bus.secure else ""
        self.instance = instance or default_instance(secure_key or name)
        self.log = logging.getLogger(f"charles.{name}")
        self.metrics = Metrics(name, self.instance)
        self.ctx = zmq.Context()
        self.started = time.monotonic()
        self.stop_event = threading.Event()
        self.status = "starting"
        self.info: dict[str, Any] = {}
        self.http_routes: dict[str, Callable[[], tuple[bytes, str]]] = {}
        self._sockets: list[zmq.Socket] = []
        self._sock_lock = threading.Lock()
        self._rejects = RateLimitedLog(self.log, cfg.service.reject_log_period_s)
        self._subscribers: list[Subscriber] = []
        self._http: _CappedHttpServer | None = None
        self._vital: list[threading.Thread] = []
        self._hb_thread: threading.Thread | None = None
        self._signal_w = -1  # the signal handler's pipe to the signals thread (install_signals)
        reg = registry()
        self.endpoints = self._endpoints(reg)
        if signals:
            self.install_signals()
        if http:
            self.start_http()

    # -- wiring -------------------------------------------------------------------------------------------

    def _endpoints(self, reg: Any) -> dict[str, str]:
        """publish, control and each lane's subscribe endpoint (``subscribe``, ``subscribe_bulk``), plain or
        CURVE as ``bus.secure`` says."""
        host = self.cfg.bus.host
        p = {**reg.ports, **self.cfg.bus.ports}
        secure = "secure_" if self.cfg.bus.secure else ""
        names = ["publish", "control", *(subscribe_port(lane) for lane in LANES)]
        return {k: f"tcp://{host}:{p[secure + k]}" for k in names}

    def socket(self, kind: int, hwm: int | None = None, max_bytes: int | None = None) -> zmq.Socket:
        """A socket of this service; ``max_bytes`` (``ZMQ_MAXMSGSIZE``) ends the connection of a peer that
        sends a larger frame, before libzmq buffers it (the registry's limits, not the codec's, bound memory)."""
        s = self.ctx.socket(kind)
        s.setsockopt(zmq.LINGER, 0)
        if hwm is not None:
            s.setsockopt(zmq.SNDHWM, hwm)
            s.setsockopt(zmq.RCVHWM, hwm)
        if max_bytes is not None:
            s.setsockopt(zmq.MAXMSGSIZE, max_bytes)
        if self.cfg.bus.secure:
            public, secret, server = _load_curve_client(self.cfg.bus.keys_dir, self.cfg.bus.client_key)
            s.curve_publickey, s.curve_secretkey, s.curve_serverkey = public, secret, server
        with self._sock_lock:
            self._sockets.append(s)
        return s

    def adopt(self, sock: zmq.Socket) -> zmq.Socket:
        """Close this socket (made elsewhere, e.g. a monitor) when the service closes."""
        with self._sock_lock:
            self._sockets.append(sock)
        return sock

    def publisher(self, family: str | None = None, hwm: int | None = None) -> Publisher:
        reg = registry()
        hwm = hwm or (reg.topics[family].hwm if family else 1000)
        return Publisher(self, self.endpoints["publish"], hwm)

    def subscriber(
        self, prefixes: Iterable[str], hwm: int | None = None, late_join: bool = True
    ) -> Subscriber:
        prefixes = list(prefixes)
        reg = registry()
        if hwm is None:
            hwm = max(
                (reg.topics[p.split(".", 1)[0]].hwm for p in prefixes if p.split(".", 1)[0] in reg.topics),
                default=1000,
            )
        endpoints = [self.endpoints[subscribe_port(lane)] for lane in reg.lanes_of(prefixes)]
        sub = Subscriber(self, endpoints, prefixes, hwm, late_join)
        self._subscribers.append(sub)
        return sub

    def decode(self, frames: list) -> Envelope | None:
        """Decode or count-and-skip: the one place bad input is handled for every receive loop."""
        try:
            return decode(frames)
        except ProtocolError as e:
            self.metrics.rejects.labels(reason=e.reason).inc()
            self._rejects.warn(e.reason, f"rejected a message ({e})")
            return None

    def reject(self, reason: str, detail: str, n: int = 1) -> None:
        """Count (``n`` of them) and log (rate-limited) a reject found by service logic after decoding."""
        self.metrics.rejects.labels(reason=reason).inc(n)
        self._rejects.warn(reason, f"rejected: {reason}: {detail}")

    # -- control port: configuration and last values -----------------------------------------------------

    def _control(self, frames: list, timeout_s: float) -> list[list]:
        reg = registry()
        s = self.socket(zmq.DEALER, max_bytes=max(t.max_bytes for t in reg.topics.values() if t.last_value))
        try:
            s.connect(self.endpoints["control"])
            s.send_multipart(frames)
            replies = []
            deadline = time.monotonic() + timeout_s
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"broker at {self.endpoints['control']} did not answer in {timeout_s:.1f}s"
                    )
                # short slices so SIGTERM during a wait for the broker is noticed at once
                if not s.poll(int(min(remaining, 0.2) * 1000)):
                    if self.stop_event.is_set():
                        raise TimeoutError("stopping while waiting for the broker")
                    continue
                msg = s.recv_multipart(copy=False)
                if len(msg) == 1 and msg[0].bytes == b"!end":
                    return replies
                replies.append(msg)
        finally:
            s.close(linger=0)
            with self._sock_lock:
                if s in self._sockets:
                    self._sockets.remove(s)

    def fetch_config(self, role: str | None = None, timeout_s: float | None = None) -> dict:
        """The run configuration as the broker serves it (collectors and players call this at start)."""
        from charles.proto import ConfigRequest

        timeout_s = self.cfg.bus.connect_timeout_s if timeout_s is None else timeout_s
        frames = encode("config", ConfigRequest(role or self.name), self.instance, "config_request")
        frames[0] = b"config"
        replies = self._control(frames, timeout_s)
        for r in replies:
            env = self.decode(r)
            if env is not None and env.kind == "config":
                if env.msg.error:
                    raise RuntimeError(f"broker refused the configuration request: {env.msg.error}")
                return env.msg.config
        raise RuntimeError("broker sent no configuration")

    def acquire_config(self, role: str | None = None) -> dict | None:
        """The run configuration from the broker; retries until it comes. None when stopped while waiting.

        Each try waits up to ``bus.connect_timeout_s`` (in short requests, so SIGTERM is noticed within half a
        second); every failed try is logged with where we looked.
        """
        self.status = "waiting"
        tries = 0
        while self.running:
            tries += 1
            deadline = time.monotonic() + self.cfg.bus.connect_timeout_s
            error: Exception | None = None
            while self.running and time.monotonic() < deadline:
                try:
                    return self.fetch_config(
                        role, timeout_s=min(_FETCH_SLICE_S, max(0.05, deadline - time.monotonic()))
                    )
                except TimeoutError as e:
                    error = e
                except RuntimeError as e:  # the broker answered but refused: worth a pause, not a spin
                    error = e
                    self.stop_event.wait(1.0)
            if self.running:
                self.log.warning(
                    f"no run configuration from the broker at {self.endpoints['control']} after "
                    f"{self.cfg.bus.connect_timeout_s:g}s (try {tries}: {error}); still trying"
                )
        return None

    def acquire_run_config(
        self,
        local: Config,
        overrides: Sequence[str] = (),
        environ: Mapping[str, str] | None = None,
        role: str | None = None,
    ) -> Config | None:
        """The run configuration to work with: the broker's (:meth:`acquire_config`, retried) with this
        process's own on top (:func:`charles.config.run_config`). None when stopped while waiting.

        A configuration that does not fit this process (a bad value, a model line that does not resolve)
        is logged and ends the process with exit status 2: retrying would only fail the same way.
        """
        from charles.config import run_config

        served = self.acquire_config(role)
        if served is None:
            return None
        try:
            cfg = run_config(local, served, overrides, environ)
            cfg.model.resolve()
        except ValueError as e:
            self.log.error(f"the run configuration does not fit this {role or self.name}: {e}")
            raise SystemExit(2) from None
        return cfg

    def snapshot(
        self, prefixes: Iterable[str], timeout_s: float = 2.0, *, missing_ok: bool = True
    ) -> list[Envelope]:
        """The broker's newest message of each last-value topic matching the prefixes. A broker that does not
        answer is logged and skipped, or raises TimeoutError when not ``missing_ok``."""
        out = []
        for p in prefixes:
            try:
                replies = self._control([b"snapshot", p.encode()], timeout_s)
            except TimeoutError as e:
                if not missing_ok:
                    raise
                self.log.warning(f"no last-value snapshot for {p!r}: {e}")
                continue
            for r in replies:
                env = self.decode(r)
                if env is not None:
                    out.append(env)
        return out

    # -- health and state --------------------------------------------------------------------------------

    def health(self) -> dict:
        now = time.monotonic()
        topics = {}
        for sub in self._subscribers:
            for fam in sub.watch.expected:
                alive = sub.watch.alive(fam, now)
                topics[fam] = {
                    "alive": alive,
                    "rate_hz": round(sub.watch.rate(fam), 2),
                    "count": sub.watch.count[fam],
                }
                self.metrics.alive.labels(fam).set(1 if alive else 0)
                self.metrics.rate.labels(fam).set(sub.watch.rate(fam))
        dead = [t.name for t in self._vital if not t.is_alive()]
        if dead and self.status == "ok" and not self.stop_event.is_set():
            # a worker or proxy that died while the service runs: it answers, but does not do its job
            self.status = "degraded"
            self.log.error(f"degraded: thread(s) {', '.join(dead)} stopped")
        healthy = self.status in ("ok", "starting", "waiting") and not self.stop_event.is_set()
        return {
            "service": self.name,
            "instance": self.instance,
            "status": self.status,
            "healthy": healthy,
            "dead_threads": dead,
            "uptime_s": round(now - self.started, 1),
            "topics": topics,
        }

    def vital(self, thread: threading.Thread) -> threading.Thread:
        """A thread the service cannot work without: if it ends while the service runs, /healthz and the
        heartbeat say ``degraded``."""
        self._vital.append(thread)
        return thread

    def state(self) -> dict:
        return {**self.health(), "info": dict(self.info)}

    # -- lifecycle ---------------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        return not self.stop_event.is_set()

    def stop(self, *_: Any) -> None:
        if not self.stop_event.is_set():
            self.log.info("stopping")
        self.status = "stopping"
        self.stop_event.set()

    def install_signals(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        r, self._signal_w = os.pipe()
        os.set_blocking(self._signal_w, False)
        threading.Thread(target=self._watch_signals, args=(r,), name="signals", daemon=True).start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)

    def _on_signal(self, signum: int, _frame: Any) -> None:
        # A handler runs in the main thread between two bytecodes, wherever that thread is: inside
        # Event.wait holding the event's lock, inside Thread.start holding threading's. Setting the stop event
        # or starting a timer from here deadlocks when the interrupted code holds the lock it needs (a
        # collector stopped in its pacing wait logged "stopping" and then hung for good, its watchdog never
        # started). So the handler takes no lock: it writes one byte, the signals thread does the rest.
        if self._signal_w >= 0:
            with contextlib.suppress(OSError):  # the pipe is full: a stop is on its way already
                os.write(self._signal_w, bytes([signum]))

    def _watch_signals(self, r: int) -> None:
        """The first SIGTERM/SIGINT: stop, then a bounded shutdown. If the loop or close() hangs, leave anyway."""
        if not os.read(r, 64):  # the service closed without a signal
            os.close(r)
            return
        self.stop()
        # Two watchdogs: this thread logs and exits at shutdown_s. A hang that holds the GIL, or a lock this
        # thread needs (logging's), stops it too; faulthandler's watchdog is a C thread that needs neither: a
        # second later it writes every thread's stack to stderr (the service's log: where it hung) and exits 1.
        faulthandler.dump_traceback_later(self.cfg.service.shutdown_s + 1.0, exit=True)
        time.sleep(self.cfg.service.shutdown_s)
        self._hard_exit()

    def _hard_exit(self) -> None:
        self.log.error(f"shutdown took longer than {self.cfg.service.shutdown_s}s; exiting hard")
        logging.shutdown()
        os._exit(1)

    def start_http(self) -> int:
        port = self.cfg.service.http_port
        if port == 0 and self.name in registry().services and os.environ.get("CHARLES_HTTP_EPHEMERAL") != "1":
            port = registry().services[self.name].http_port
        try:
            srv = _CappedHttpServer((self.cfg.service.http_host, port), _HttpHandler)
        except OSError as e:
            self.log.warning(
                f"port {port} busy ({e.strerror}); serving /metrics on an ephemeral port instead"
            )
            srv = _CappedHttpServer((self.cfg.service.http_host, 0), _HttpHandler)
        srv.service = self  # type: ignore[attr-defined]
        self._http = srv
        threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="http", daemon=True
        ).start()
        self.http_port = srv.server_address[1]
        self.log.info(f"/metrics and /healthz on http://{self.cfg.service.http_host}:{self.http_port}")
        return self.http_port

    def start_heartbeat(self) -> None:
        """Publish a heartbeat every ``service.heartbeat_s`` from a thread with its own socket."""
        pub = self.publisher("heartbeat")

        # the heartbeat thread owns this socket from here on
        def beat() -> None:
            while not self.stop_event.wait(self.cfg.service.heartbeat_s):
                try:
                    hb = Heartbeat(
                        self.name,
                        self.instance,
                        self.health()["status"],  # health() notices a dead vital thread
                        time.monotonic() - self.started,
                        self.info_for_heartbeat(),
                    )
                    pub.send(f"heartbeat.{self.instance}", hb)
                except Exception:  # noqa: BLE001 - a heartbeat must never die silently
                    self.log.exception("heartbeat failed")

        self._hb_thread = threading.Thread(target=beat, name="heartbeat", daemon=True)
        self._hb_thread.start()

    def info_for_heartbeat(self) -> dict:
        info = dict(self.info)  # the loop may add keys meanwhile
        return {k: v for k, v in info.items() if isinstance(v, int | float | str | bool)}

    def ready(self) -> None:
        self.status = "ok"
        self.metrics.up.set(1)

    def close(self) -> None:
        self.stop_event.set()
        self.metrics.up.set(0)
        if self._signal_w >= 0:  # ends the signals thread if no signal came
            w, self._signal_w = self._signal_w, -1
            os.close(w)
        if self._hb_thread is not None:
            self._hb_thread.join(timeout=2)
        with self._sock_lock:
            for s in self._sockets:
                if s.closed:
                    continue
                with contextlib.suppress(zmq.ZMQError):
                    s.close(linger=0)
            self._sockets.clear()
        self.ctx.term()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
        self.log.info("stopped")

    def __enter__(self) -> Service:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def run_main(
    main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None
) -> NoReturn:
    """Run an entry point's ``main`` and end the process without interpreter teardown.

    Every process entry point (``python -m charles.<service>``, the ``charles`` commands) ends here. By the
    time ``main`` returns, a service has closed what it owns: sockets, files, checkpoints, storage. What is
    left are daemon threads that may be inside native code (matplotlib's FreeType reading a font through a
    Python callback, a torch kernel, OpenCV). Python's finalization ends such a thread with ``pthread_exit``
    the moment it asks for the GIL back, and that unwinds through C++ frames that cannot be unwound:
    ``std::terminate``, SIGABRT, exit status -6 after a clean "stopped" (the balancer's painter did this in
    half the runs on a slow box). So the process flushes its logs and standard streams and leaves with
    ``os._exit``: the exit status is main's, whatever a library's thread was doing.
    """
    rc = 1
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse's --help and errors, sys.exit() inside main
        if e.code is None or isinstance(e.code, int):
            rc = e.code
        else:
            print(e.code, file=sys.stderr)
            rc = 1
    except KeyboardInterrupt:
        rc = 130
    except BaseException:  # noqa: BLE001 - a traceback, then the same clean exit
        import traceback

        traceback.print_exc()
        rc = 1
    finally:
        exit_process(rc)


def exit_process(rc: int | None = 0) -> NoReturn:
    """Flush logs and standard streams, say which threads are abandoned, and ``os._exit`` (see run_main)."""
    left = [t.name for t in threading.enumerate() if t is not threading.main_thread() and t.is_alive()]
    if left:
        log.debug(f"exiting with threads still running: {', '.join(sorted(left))}")
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(0 if rc is None else int(rc) & 0xFF)


def run_service(name: str, cfg: Config, body: Callable[[Service], None], instance: str | None = None) -> int:
    """The thin main every service shares: logging, the Service, the body, a clean close."""
    setup_logging(cfg.service.log_level, cfg.service.log_format)
    svc = Service(name, cfg, instance)
    try:
        body(svc)
    except KeyboardInterrupt:
        pass
    finally:
        svc.close()
    return 0
