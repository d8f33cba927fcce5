"""The viewer's HTTP side: the page, its JSON, its images, and the service's /metrics, /healthz, /state.

One server for everything, so a stream host and Prometheus both use the viewer's registry port. Routes:

| route | what |
| --- | --- |
| ``/`` | the stream page (``static/index.html``), 1920x1080, scales to any window |
| ``/static/<file>`` | the page's script and style |
| ``/api/state`` | roles (which instance each tile shows) and every instance's newest console state |
| ``/img/<who>/<name>[.jpg/.png]`` | newest image ``name`` of ``who`` (instance id, or player/trainer/balancer) |
| ``/metrics`` ``/healthz`` ``/state`` | as every service |

``/img`` takes ``?have=<seq>``: if the newest image is still that one the answer is ``204`` with no
body, so the page can ask ten times a second and move bytes only when a new picture arrived. Image
bytes go out exactly as the publisher encoded them (JPEG/PNG); raw frames are encoded to JPEG once.
``/api/state`` takes ``?client=<id>`` (counted as an active client) and ``?player=<instance>`` (and
``trainer``, ``balancer``) to pin a tile to one instance.
"""

from __future__ import annotations

import contextlib
import json
import logging
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
from charles.viewer.board import ROLES, Board

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

    def _image(self, rest: str, query: dict[str, str]) -> tuple[int, bytes, str, dict[str, str]]:
        who, _, name = rest.rpartition("/")
        for ext in (".jpg", ".jpeg", ".png"):
            if name.endswith(ext):
                name = name[: -len(ext)]
                break
        pic = self.board.image(who, name) if who and name else None
        if pic is None:
            return 404, b"no such image yet\n", "text/plain", {}
        headers = {"X-Seq": str(pic.seq)}
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
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
