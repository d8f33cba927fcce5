"""The viewer's HTTP side: the page, its JSON, its images, and the service's /metrics, /healthz, /state.

One server for everything, so a stream host and Prometheus both use the viewer's registry port. Routes:

| route | what |
| --- | --- |
| ``/`` | the stream page (``static/index.html``), 1920x1080, scales to any window |
| ``/static/<file>`` | the page's script and style |
| ``/api/state`` | roles (which instance each tile shows) and every instance's newest console state |
| ``/img/<who>/<name>[.jpg/.png]`` | newest image ``name`` of ``who`` (instance id, or player/trainer/balancer) |
| ``/stream/<who>/<name>[.mjpg]`` | every new picture ``name`` of ``who``, pushed as MJPEG (stream.py says why) |
| ``/api/paints`` | POST: what a page painted (picture, taken, painted); GET ``?client=``: the newest paints |
| ``/metrics`` ``/healthz`` ``/state`` | as every service |

``/img`` takes ``?have=<seq>``: if the newest image is still that one the answer is ``204`` with no
body, so the page can ask ten times a second and move bytes only when a new picture arrived. Image
bytes go out exactly as the publisher encoded them (JPEG/PNG); raw frames are encoded to JPEG once.
``/api/state`` takes ``?client=<id>`` (counted as an active client) and ``?player=<instance>`` (and
``trainer``, ``balancer``) to pin a tile to one instance.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import prometheus_client as prom

from charles.proto import registry
from charles.runtime import RateLimitedLog, Service
from charles.viewer.board import ROLES, Board, Picture
from charles.viewer.stream import Fanout, Feed

log = logging.getLogger("charles.viewer")

STATIC = Path(__file__).with_name("static")
_STATIC_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".png": "image/png",
}
ACTIVE_S = 10.0
"""A client that polled /api/state within this many seconds counts as watching."""
KEEPALIVE_S = 2.0
"""A stream with no new picture this long sends the newest again: a page that went away is noticed (the
write fails) and its thread freed, and a page that came in during a pause has a picture."""
MAX_POST = 65536
"""Bytes of a page's paint report at most (a second of paints is ~3 KB)."""
PAINT_LATENCY_BUCKETS = (0.01, 0.02, 0.033, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.0)


class Clients:
    """Who is watching: page ids (or addresses) and when each last polled; bounded."""

    def __init__(self, limit: int = 1024):
        self.limit = limit
        self._seen: dict[str, float] = {}
        self._lock = threading.Lock()
        self.total = 0

    def saw(self, client: str, now: float) -> bool:
        """Record a poll; True the first time this client is seen."""
        with self._lock:
            new = client not in self._seen
            self._seen[client] = now
            if new:
                self.total += 1
                if len(self._seen) > self.limit:
                    for k in sorted(self._seen, key=self._seen.__getitem__)[: len(self._seen) - self.limit]:
                        del self._seen[k]
            return new

    def active(self, now: float) -> int:
        with self._lock:
            for k in [k for k, t in self._seen.items() if now - t > ACTIVE_S * 6]:
                del self._seen[k]
            return sum(1 for t in self._seen.values() if now - t <= ACTIVE_S)


class Paints:
    """What pages say they painted: per client, the newest paints (picture name, seq, taken, painted).

    Bounded both ways (clients and paints per client). The stream page posts its paints once a second, so
    /metrics shows what viewers actually see and ``bench/viewer.py`` reads frame rate and latency from it.
    """

    def __init__(self, per_client: int = 2048, clients: int = 64):
        self.per_client = per_client
        self.clients = clients
        self._paints: dict[str, collections.deque[tuple[str, int, float, float]]] = {}
        self._lock = threading.Lock()

    def add(self, client: str, paints: list[tuple[str, int, float, float]]) -> None:
        with self._lock:
            mine = self._paints.pop(client, None)  # re-inserted last: the dict's order is recency
            if mine is None:
                mine = collections.deque(maxlen=self.per_client)
                while len(self._paints) >= self.clients:
                    del self._paints[next(iter(self._paints))]
            self._paints[client] = mine
            mine.extend(paints)

    def of(self, client: str) -> list[tuple[str, int, float, float]]:
        with self._lock:
            return list(self._paints.get(client, ()))


def parse_paints(body: bytes) -> tuple[str, list[tuple[str, int, float, float]]]:
    """A page's report ``{client, paints: [[name, seq, taken_s, painted_s], ...]}``; ValueError if odd."""
    doc = json.loads(body)
    if (
        not isinstance(doc, dict)
        or not isinstance(doc.get("client"), str)
        or not isinstance(doc.get("paints"), list)
    ):
        raise ValueError("a paint report is {client: str, paints: [[name, seq, taken, painted], ...]}")
    out = []
    for p in doc["paints"][:1024]:
        if not (isinstance(p, list) and len(p) == 4 and isinstance(p[0], str)):
            raise ValueError(f"a paint is [name, seq, taken, painted], not {str(p)[:80]}")
        seq, taken, painted = (float(x) for x in p[1:])
        if not all(map(math.isfinite, (seq, taken, painted))):
            raise ValueError("a paint's numbers must be finite")
        out.append((p[0][:32], int(seq), taken, painted))
    return doc["client"][:64], out


class ViewerMetrics:
    def __init__(self, svc: Service):
        r = svc.metrics.registry
        self.requests = prom.Counter(
            "charles_viewer_requests_total", "HTTP requests by route", ["route"], registry=r
        )
        self.clients_seen = prom.Counter(
            "charles_viewer_clients_seen_total", "Distinct page clients served since start", registry=r
        )
        self.clients = prom.Gauge("charles_viewer_clients", "Pages polling right now (last 10 s)", registry=r)
        self.images = prom.Counter(
            "charles_viewer_images_served_total", "Images sent (not counting 204 unchanged)", registry=r
        )
        self.image_bytes = prom.Counter("charles_viewer_image_bytes_total", "Image bytes sent", registry=r)
        self.unchanged = prom.Counter(
            "charles_viewer_images_unchanged_total", "Image polls answered 204 (nothing new)", registry=r
        )
        self.instances = prom.Gauge("charles_viewer_instances", "Console instances held", registry=r)
        self.errors = prom.Counter(
            "charles_viewer_errors_total", "Requests that failed inside the viewer (500)", registry=r
        )
        self.busy = prom.Counter(
            "charles_viewer_busy_total", "Requests refused because too many were in flight", registry=r
        )
        self.cameras = prom.Counter(
            "charles_viewer_camera_pictures_total", "Camera pictures received (camera.*)", registry=r
        )
        self.streams = prom.Gauge("charles_viewer_streams", "Picture streams open to pages now", registry=r)
        self.streamed = prom.Counter(
            "charles_viewer_stream_pictures_total", "Pictures written to streaming pages", registry=r
        )
        self.stream_drops = prom.Counter(
            "charles_viewer_stream_drops_total",
            "Pictures a streaming page was too slow for (dropped, oldest first)",
            registry=r,
        )
        self.painted = prom.Counter(
            "charles_viewer_painted_total", "Pictures pages reported painted", ["name"], registry=r
        )
        self.paint_latency = prom.Histogram(
            "charles_viewer_paint_latency_seconds",
            "Picture taken (player) to painted (page), as pages report it",
            buckets=PAINT_LATENCY_BUCKETS,
            registry=r,
        )


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    max_in_flight = 64
    """Concurrent requests at most; one more is answered 503 at once (a thread per request, but bounded)."""

    def __init__(self, addr: tuple[str, int], viewer: Viewer):
        self.viewer = viewer
        self._slots = threading.BoundedSemaphore(self.max_in_flight)
        super().__init__(addr, _Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            self.viewer.metrics.busy.inc()
            with contextlib.suppress(OSError):
                request.sendall(
                    b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nRetry-After: 1\r\n\r\n"
                )
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except Exception:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "charles-viewer"
    timeout = 10  # a client that connects and says nothing gives its slot back

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        v = self.server.viewer
        url = urlsplit(self.path)
        path = unquote(url.path)
        query = {k: vals[-1] for k, vals in parse_qs(url.query).items()}
        try:
            code, body, ctype, headers = v.route(path, query, self.client_address[0])
        except Exception as e:  # a bug must not take the page down: say so, count it, keep serving
            v.metrics.errors.inc()
            v.errors.warn(type(e).__name__, f"{path} failed: {e!r}")
            code, body, ctype, headers = 500, b"internal error\n", "text/plain", {}
        if code == 0:  # a stream: body is empty, the handler writes as pictures come
            v.stream(self, ctype, headers["instance"], headers["name"])
            return
        self.reply(code, body, ctype, headers)

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        v = self.server.viewer
        path = unquote(urlsplit(self.path).path)
        try:
            n = int(self.headers.get("Content-Length", "-1"))
        except ValueError:
            n = -1
        if path != "/api/paints":
            code, body = 404, b"not found\n"
        elif not 0 <= n <= MAX_POST:
            code, body = 413, b"a paint report is at most 64 KB with a Content-Length\n"
        else:
            code, body = v.paints_posted(self.rfile.read(n))
        self.reply(code, body, "text/plain", {})

    def reply(self, code: int, body: bytes, ctype: str, headers: dict[str, str]) -> None:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for k, val in headers.items():
                self.send_header(k, val)
            self.end_headers()
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet: the page polls often
        pass


class Viewer:
    """Routes requests to the board and the service; owns the HTTP server."""

    def __init__(self, svc: Service, board: Board):
        self.svc = svc
        self.board = board
        self.clients = Clients()
        self.metrics = ViewerMetrics(svc)
        self.errors = RateLimitedLog(log, svc.cfg.service.reject_log_period_s)
        self.fanout = Fanout(on_drop=self.metrics.stream_drops.inc)
        self.paints = Paints()
        self._http: _Server | None = None
        self.port = 0

    # -- routing ----------------------------------------------------------------------------------------

    def route(self, path: str, query: dict[str, str], addr: str) -> tuple[int, bytes, str, dict[str, str]]:
        if path in ("/", "/index.html"):
            self.metrics.requests.labels("page").inc()
            return self._static("index.html")
        if path.startswith("/static/"):
            self.metrics.requests.labels("static").inc()
            return self._static(path[len("/static/") :])
        if path == "/api/state":
            self.metrics.requests.labels("state").inc()
            return self._api_state(query, addr)
        if path.startswith("/img/"):
            self.metrics.requests.labels("image").inc()
            return self._image(path[len("/img/") :], query)
        if path.startswith("/stream/"):
            self.metrics.requests.labels("stream").inc()
            return self._open_stream(path[len("/stream/") :])
        if path == "/api/paints":
            self.metrics.requests.labels("paints").inc()
            paints = [list(p) for p in self.paints.of(query.get("client", ""))]
            return 200, json.dumps({"paints": paints}).encode(), "application/json", {}
        if path == "/metrics":
            self.metrics.requests.labels("metrics").inc()
            self.refresh()
            return 200, self.svc.metrics.render(), prom.CONTENT_TYPE_LATEST, {}
        if path == "/healthz":
            h = self.svc.health()
            return (200 if h["healthy"] else 503), json.dumps(h).encode(), "application/json", {}
        if path == "/state":
            self.refresh()
            return 200, json.dumps(self.svc.state(), default=str).encode(), "application/json", {}
        return 404, b"not found\n", "text/plain", {}

    def _static(self, name: str) -> tuple[int, bytes, str, dict[str, str]]:
        # only plain files directly in static/: no folders, no dot files, nothing outside
        if "/" in name or "\\" in name or name.startswith(".") or not name:
            return 404, b"not found\n", "text/plain", {}
        f = STATIC / name
        ctype = _STATIC_TYPES.get(f.suffix)
        if ctype is None or not f.is_file():
            return 404, b"not found\n", "text/plain", {}
        return 200, f.read_bytes(), ctype, {}

    def _api_state(self, query: dict[str, str], addr: str) -> tuple[int, bytes, str, dict[str, str]]:
        client = (query.get("client") or addr)[:64]
        if self.clients.saw(client, time.monotonic()):
            self.metrics.clients_seen.inc()
        pins = {r: query[r] for r in ROLES if query.get(r)}
        snap = self.board.snapshot(pins)
        return 200, json.dumps(snap, allow_nan=False, separators=(",", ":")).encode(), "application/json", {}

    @staticmethod
    def _who_and_name(rest: str) -> tuple[str, str]:
        who, _, name = rest.rpartition("/")
        for ext in (".jpg", ".jpeg", ".png", ".mjpg"):
            if name.endswith(ext):
                return who, name[: -len(ext)]
        return who, name

    def _image(self, rest: str, query: dict[str, str]) -> tuple[int, bytes, str, dict[str, str]]:
        who, name = self._who_and_name(rest)
        pic = self.board.image(who, name) if who and name else None
        if pic is None:
            return 404, b"no such image yet\n", "text/plain", {}
        headers = {"X-Seq": str(pic.seq)}
        if pic.tick is not None:
            headers["X-Game-Tick"] = str(pic.tick)
        if query.get("have") == str(pic.seq):
            self.metrics.unchanged.inc()
            return 204, b"", "text/plain", headers
        try:
            body, ctype = pic.bytes_and_type()
        except ValueError as e:  # a raw frame whose bytes disagree with its shape
            self.svc.reject("bad_image", f"{who}/{name}: {e}")
            return 404, b"image unreadable\n", "text/plain", {}
        self.metrics.images.inc()
        self.metrics.image_bytes.inc(len(body))
        return 200, body, ctype, headers

    # -- pushed pictures ----------------------------------------------------------------------------------

    def pictures(self, instance: str, pictures: dict[str, Picture], camera: bool) -> None:
        """New pictures of an instance (the receive loop): to every page streaming them."""
        if camera:
            self.metrics.cameras.inc()
            if not pictures:  # of an instance with no console yet, or older than those held
                self.svc.metrics.drops.labels(cause="camera_not_kept").inc()
        self.fanout.publish(instance, pictures)

    def _open_stream(self, rest: str) -> tuple[int, bytes, str, dict[str, str]]:
        """Code 0 tells the handler to stream; the instance is resolved once, when the page asks."""
        who, name = self._who_and_name(rest)
        instance = self.board.resolve(who) if who and name else None
        if instance is None:
            return 404, b"nobody by that name yet\n", "text/plain", {}
        return 0, b"", "multipart/x-mixed-replace; boundary=frame", {"instance": instance, "name": name}

    def stream(self, handler: _Handler, ctype: str, instance: str, name: str) -> None:
        """Write every new picture of ``instance``'s ``name`` as one part until the page goes or we stop."""
        feed = self.fanout.open(instance, name)
        if feed is None:
            self.metrics.busy.inc()
            handler.reply(503, b"too many streams\n", "text/plain", {"Retry-After": "1"})
            return
        self.metrics.streams.set(len(self.fanout))
        handler.close_connection = True
        try:
            handler.send_response(200)
            handler.send_header("Content-Type", ctype)
            handler.send_header("Cache-Control", "no-store")
            handler.send_header("Connection", "close")
            handler.end_headers()
            last = self.board.image(instance, name)  # the newest at once: a page never starts blank
            if last is not None:
                self._part(handler, feed, last)
            while self.svc.running and not feed.closed:
                pic = feed.get(KEEPALIVE_S)
                if pic is None:
                    pic = self.board.image(instance, name)  # a keep-alive: the newest again
                    if pic is None:
                        break  # the instance was forgotten: the page asks again for whoever plays now
                elif last is not None and (pic.seq, pic.captured) == (last.seq, last.captured):
                    # published between opening the feed and reading the board: already sent above
                    continue
                self._part(handler, feed, pic)
                last = pic
        except (OSError, ValueError):
            pass  # the page went away (broken pipe, reset, a write timed out) or a raw frame was odd
        finally:
            self.fanout.close(feed)
            self.metrics.streams.set(len(self.fanout))

    def _part(self, handler: _Handler, feed: Feed, pic: Picture) -> None:
        body, ctype = pic.bytes_and_type()
        head = (
            f"--frame\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            f"X-Seq: {pic.seq}\r\nX-Captured: {pic.captured:.6f}\r\n"
            + ("" if pic.tick is None else f"X-Game-Tick: {pic.tick}\r\n")
            + "\r\n"
        ).encode()
        handler.wfile.write(head + body + b"\r\n")
        handler.wfile.flush()
        feed.sent += 1
        self.metrics.streamed.inc()
        self.metrics.image_bytes.inc(len(body))

    def paints_posted(self, body: bytes) -> tuple[int, bytes]:
        try:
            client, paints = parse_paints(body)
        except (ValueError, TypeError, OverflowError) as e:
            self.svc.reject("bad_paints", str(e)[:200])
            return 400, b"bad paint report\n"
        self.paints.add(client, paints)
        for name, _, taken, painted in paints:
            self.metrics.painted.labels(name).inc()
            if taken > 0:
                self.metrics.paint_latency.observe(max(0.0, painted - taken))
        return 204, b""

    # -- lifecycle --------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Update the gauges and heartbeat info (cheap; called by the loop and on scrapes)."""
        active = self.clients.active(time.monotonic())
        self.metrics.clients.set(active)
        n = len(self.board)
        self.metrics.instances.set(n)
        self.svc.info.update(clients=active, clients_total=self.clients.total, instances=n, port=self.port)

    def start(self, host: str | None = None, port: int | None = None) -> int:
        """Serve on the configured port (0: the registry's viewer port, ephemeral in tests)."""
        cfg = self.svc.cfg.service
        host = cfg.http_host if host is None else host
        if port is None:
            port = cfg.http_port
            if port == 0 and os.environ.get("CHARLES_HTTP_EPHEMERAL") != "1":
                port = registry().services["viewer"].http_port
        try:
            srv = _Server((host, port), self)
        except OSError as e:
            log.warning(f"port {port} busy ({e.strerror}); serving the page on an ephemeral port instead")
            srv = _Server((host, 0), self)
        self._http = srv
        self.port = srv.server_address[1]
        threading.Thread(
            target=srv.serve_forever, kwargs={"poll_interval": 0.2}, name="viewer-http", daemon=True
        ).start()
        log.info(f"stream page on http://{host}:{self.port}/ (also /metrics, /healthz)")
        return self.port

    def close(self) -> None:
        self.fanout.close_all()
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
