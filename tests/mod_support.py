"""A stand-in for the GTA V mod (DeepGTAV's protocol on loopback), shared by the agent tests and the stop tests.

``DeepGtavServer`` accepts one client on loopback, reads length-prefixed JSON messages (recording every
one), and once started sends frame+data pairs at the requested rate: 24-bit BGR bitmaps with rows padded to
4 bytes (the padding filled with 0xAB so that a client that forgets to strip it sees garbage), then the
dataset JSON. Frame ``i`` is painted with R = i % 256 and carries steering/throttle/brake labels that are a
function of ``i``, so a test can check that a sample's labels belong to its own picture.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from charles.agents.deepgtav import rgb_to_bitmap

PAD_BYTE = 0xAB


# ---------------------------------------------------------------------------------------------- the mod


def frame_rgb(i: int, w: int, h: int) -> np.ndarray:
    img = np.empty((h, w, 3), np.uint8)
    img[:, :, 0] = i % 256
    img[:, :, 1] = (np.arange(w) * 3 % 256)[None, :]
    img[:, :, 2] = (np.arange(h) * 7 % 256)[:, None]
    return img


def labels(i: int) -> dict:
    """Distinct from one frame to the next (consecutive i never share a steering value)."""
    return {
        "steering": ((i * 7) % 201 - 100) / 100.0,
        "throttle": 0.5 + (i % 5) / 10.0,
        "brake": (i % 3) / 10.0,
    }


class DeepGtavServer:
    """A DeepGTAV-protocol server on loopback (one client at a time, like the mod)."""

    def __init__(
        self, port: int = 0, moving: bool = True, size: tuple[int, int] = (161, 37), poison: list[bytes] = ()
    ):
        self.poison = list(poison)
        """Data payloads sent in place of the first good ones, one per connection (hostile tests)."""
        self.received: list[dict] = []
        self.moving = moving
        self.size = size
        self.rate = 30
        self.location = [100.0, 200.0, 30.0]
        self.sent = 0
        self.started = threading.Event()
        self._scenario_running = False
        self._closed = False
        self._conn: socket.socket | None = None
        self.lsock = socket.socket()
        self.lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.lsock.bind(("127.0.0.1", port))
        self.lsock.listen(1)
        self.lsock.settimeout(0.05)
        self.port = self.lsock.getsockname()[1]
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def messages(self, kind: str) -> list[dict]:
        return [m[kind] for m in list(self.received) if kind in m]

    def _serve(self) -> None:
        while not self._closed:
            try:
                conn, _ = self.lsock.accept()
            except (TimeoutError, OSError):
                continue
            conn.settimeout(None)
            self._conn = conn
            reader = threading.Thread(target=self._read, args=(conn,), daemon=True)
            reader.start()
            try:
                self._write(conn, reader)
            finally:
                # the client's last messages ("stop") may still be in the socket when writing fails:
                # the reader takes them before the socket closes (it ends at the client's EOF)
                if not self._closed:
                    reader.join(timeout=5.0)
                self._scenario_running = False
                conn.close()
                self._conn = None

    def _recv(self, conn: socket.socket, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = conn.recv(n - len(buf))
            if not chunk:
                raise ConnectionError("client gone")
            buf += chunk
        return buf

    def _read(self, conn: socket.socket) -> None:
        try:
            while True:
                (n,) = struct.unpack("<I", self._recv(conn, 4))
                msg = json.loads(self._recv(conn, n).decode("utf-8"))
                self.received.append(msg)
                self._on_message(msg)
                if "start" in msg and not self._scenario_running:
                    self._configure(msg["start"])
                    self._scenario_running = True
                    self.started.set()
                elif "config" in msg and self._scenario_running:
                    self._configure(msg["config"])
                elif "stop" in msg:
                    self._scenario_running = False
        except (ConnectionError, OSError, ValueError):
            self._scenario_running = False

    def _on_message(self, msg: dict) -> None:
        """A subclass's look at every message (the base mod only keeps them)."""

    def _configure(self, body: dict) -> None:
        # like the mod: config["scenario"] and config["dataset"] are read unconditionally
        sc, ds = body["scenario"], body["dataset"]
        if sc.get("location"):
            self.location = [float(sc["location"][0]), float(sc["location"][1]), 30.0]
        if ds.get("frame"):
            self.size = (int(ds["frame"][0]), int(ds["frame"][1]))
        if ds.get("rate"):
            self.rate = int(ds["rate"])

    def _write(self, conn: socket.socket, reader: threading.Thread) -> None:
        next_t = time.monotonic()
        while not self._closed and reader.is_alive():
            if not self._scenario_running:
                time.sleep(0.005)
                next_t = time.monotonic()
                continue
            i = self.sent + 1
            if self.moving:
                self.location[0] += 0.5
            frame, data = self._pair(i)
            payload = self.poison.pop(0) if self.poison else json.dumps(data).encode()
            try:
                conn.sendall(
                    struct.pack("<I", len(frame)) + frame + struct.pack("<I", len(payload)) + payload
                )
            except OSError:
                return
            self.sent = i
            next_t += 1.0 / self.rate
            time.sleep(max(0.0, next_t - time.monotonic()))

    def _pair(self, i: int) -> tuple[bytes, dict]:
        """Frame ``i``: the bitmap and the data message."""
        w, h = self.size
        data = {**labels(i), "speed": 15.0, "yawRate": 1.5, "location": list(self.location), "time": 12}
        return rgb_to_bitmap(frame_rgb(i, w, h), PAD_BYTE), data

    def close(self) -> None:
        self._closed = True
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.shutdown(socket.SHUT_RDWR)
        self.lsock.close()
        self._thread.join(timeout=2)


# ---------------------------------------------------------------------------------------------- extended


def msvc_rand_stream(seed: int):
    """``srand(seed)`` then ``rand()``, ``rand()``, ... as the Microsoft C runtime the mod is built with."""
    state = seed & 0xFFFFFFFF
    while True:
        state = (state * 214013 + 2531011) & 0xFFFFFFFF
        yield (state >> 16) & 0x7FFF


def cam_rgb(tick: int, cinematic: bool, w: int, h: int) -> np.ndarray:
    """A flat picture that says its tick (R = 8 * tick mod 256, JPEG-proof) and its camera (G)."""
    img = np.zeros((h, w, 3), np.uint8)
    img[:, :, 0] = (tick * 8) % 256
    img[:, :, 1] = 255 if cinematic else 0
    return img


class ExtendedMod(DeepGtavServer):
    """The public mod's behaviour where Charles depends on it, plus Charles' protocol extension.

    - **The speed bug** (public ``Scenario::parseScenarioConfig``): ``start`` calls ``srand(time(NULL))``,
      draws one ``rand()`` per null field (location x, y, hour, minute, weather, vehicle, style), and for a
      *given* speed draws ``rand() % 20`` instead of reading it; ``config`` keeps the speed. The car's
      ``speed`` telemetry is that autopilot speed.
    - ``honours_speed``: a mod that reads the speed (a fixed build): no bug.
    - **Extension** (when ``extended``): ``gameTime`` (ms, 1000/rate per frame), ``tick``; with ``cameras``
      [hood, cinematic] in the dataset, even ticks show the cinematic camera and odd ticks the hood;
      ``commands`` with ``override`` drive over the autopilot for 100 ms, and ``autopilot`` always says
      what the autopilot wants ([throttle, brake, steering]).
    """

    def __init__(self, *a, extended: bool = True, honours_speed: bool = False, clock=time.time, **kw):
        self.extended = extended
        self.honours_speed = honours_speed
        self.clock = clock
        self.autopilot_speed = 0.0
        self.speeds: list[float] = []
        """The autopilot speed each start/config left the car with."""
        self.alternate = False
        self.override: tuple[float, float, float] | None = None
        self.override_until = 0.0
        self.overridden_ticks: list[int] = []
        super().__init__(*a, **kw)

    def _on_message(self, msg: dict) -> None:
        if "commands" in msg and msg["commands"].get("override") and self.extended:
            c = msg["commands"]
            self.override = (float(c["throttle"]), float(c["brake"]), float(c["steering"]))
            self.override_until = time.monotonic() + 0.1
        elif "stop" in msg:
            self.override = None

    def _configure(self, body: dict) -> None:
        starting = not self._scenario_running
        super()._configure(body)
        sc, ds = body["scenario"], body["dataset"]
        self.alternate = self.extended and "cinematic" in (ds.get("cameras") or [])
        mode = sc.get("drivingMode")
        if not isinstance(mode, list):
            return
        if self.honours_speed:
            self.autopilot_speed = float(mode[1])
        elif starting:
            draws = msvc_rand_stream(int(self.clock()))
            loc, tm = sc.get("location"), sc.get("time")
            nulls = [
                *(loc[:2] if isinstance(loc, list) else [None, None]),
                *(tm[:2] if isinstance(tm, list) else [None, None]),
                sc.get("weather"),
                sc.get("vehicle"),
                mode[0],
            ]
            for v in nulls:
                if v is None:
                    next(draws)
            if mode[1] is not None:  # the inverted check: a given speed is replaced by a random one
                self.autopilot_speed = float(next(draws) % 20)
        self.speeds.append(self.autopilot_speed)

    def _pair(self, i: int) -> tuple[bytes, dict]:
        frame, data = super()._pair(i)
        data["speed"] = self.autopilot_speed
        if not self.extended:
            return frame, data
        want = labels(i)
        data["autopilot"] = [want["throttle"], want["brake"], want["steering"]]
        if self.override is not None and time.monotonic() < self.override_until:
            data["throttle"], data["brake"], data["steering"] = self.override
            self.overridden_ticks.append(i)
        data["tick"] = i
        data["gameTime"] = 1_000_000 + i * 1000.0 / self.rate
        if self.alternate:
            w, h = self.size
            cinematic = i % 2 == 0
            data["camera"] = "cinematic" if cinematic else "hood"
            frame = rgb_to_bitmap(cam_rgb(i, cinematic, w, h), PAD_BYTE)
        return frame, data


@contextlib.contextmanager
def mod_servers(cls: type) -> Iterator[Callable[..., Any]]:
    """make(**kw) -> a new ``cls`` stand-in mod; every one made is closed at the end (the tests' fixtures)."""
    servers: list[Any] = []

    def make(**kw: Any) -> Any:
        servers.append(cls(**kw))
        return servers[-1]

    try:
        yield make
    finally:
        for s in servers:
            s.close()
