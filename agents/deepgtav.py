"""A client for game mods that speak the DeepGTAV protocol (github.com/aitorzip/DeepGTAV, "v2").

DeepGTAV is a ScriptHookV mod: a TCP server inside GTA V (port 8000) that drives a car with the game's
autopilot (or lets a client steer it), teleports it, and streams the screen and the car's telemetry.
Charles uses it as the NPC (autopilot labels), as Unstuck (a ``config`` with a new location rebuilds the
scenario there), and as the source of speed and position.

Wire format, as the public mod's ``Server.cpp`` and VPilot's ``deepgtav/client.py`` implement it
(the assumptions this module makes are marked *assumed*):

* Every message in either direction is ``uint32 length`` (4 bytes, little-endian: the mod sends a C
  ``int`` from x86, VPilot reads ``struct.unpack('I')``) followed by ``length`` bytes of payload.
* Client -> mod: one UTF-8 JSON object per message, exactly one of ``{"start": {"scenario", "dataset"}}``,
  ``{"config": {"scenario", "dataset"}}``, ``{"commands": {"throttle", "brake", "steering"}}``,
  ``{"stop": {}}``. The mod reads ``config["scenario"]`` and ``config["dataset"]`` unconditionally, so
  this client always sends both, complete (a ``null`` field means "random" on start and "keep" on config).
  *Assumed*: messages stay well under 4 KB (the mod parses into a fixed buffer); ours are ~400 bytes.
* ``start`` is ignored while a scenario runs; ``config`` re-parses and rebuilds the scenario (new car at
  the road node closest to ``location``): that is our teleport. Dropping the connection stops the scenario,
  so after a reconnect the client sends ``start`` again.
* Mod -> client, at the dataset's ``rate`` (Hz), always in pairs: first the **frame**, a length-prefixed
  24-bit Windows DIB of the whole screen scaled to ``dataset.frame`` = [width, height]: **BGR** byte order,
  rows **top-down** (the mod asks GDI for a negative ``biHeight``), each row padded to a multiple of
  4 bytes, so ``length == ((width*3 + 3) // 4 * 4) * height``; then the **data**, a length-prefixed UTF-8
  JSON object with one key per field the dataset switched on: ``throttle`` [0, 1], ``brake`` [0, 1],
  ``steering`` [-1, 1] (the wheel angle / -0.7: *assumed* negative = left, as the mod's README says
  "left to right"), ``speed`` m/s, ``yawRate`` deg/s, ``location`` [x, y, z] m (world coordinates,
  x east, y north), ``time`` (hour), and others (``vehicles``, ``peds``, ``direction``, ``reward``) that
  Charles ignores. *Assumed*: a frame whose length disagrees with the requested size is an error (it is
  skipped and counted, never guessed at).

:class:`DeepGtavClient` is the blocking protocol (connect, send, receive one frame+data pair);
:class:`DeepGtavFeed` runs it on a thread with reconnection and exponential back-off and always holds the
newest message, so a 30 Hz loop never waits on the game.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from charles.drive.controls import clamp, clean_control, combine

log = logging.getLogger("charles.agents.deepgtav")

DEFAULT_PORT = 8000
MAX_FRAME_BYTES = 4096 * 4096 * 3
"""Largest frame accepted (a bound, so a garbled length cannot make us allocate gigabytes)."""
MAX_DATA_BYTES = 16 * 1024 * 1024
"""Largest data message (vehicle and pedestrian lists can be long, not this long)."""
_LEN = struct.Struct("<I")

DATASET_FIELDS = ("throttle", "brake", "steering", "speed", "yawRate", "location", "time")
"""Telemetry fields Charles switches on; everything else in a dataset is switched off (null)."""
EXTENSION_FIELDS = ("gameTime", "tick", "autopilot")
"""Fields of Charles' protocol extension, asked for in every dataset (a mod without them ignores the keys:
the public mod reads only the keys it knows): the game's clock in ms, its frame counter, and the
autopilot's wanted [throttle, brake, steering] (also while a client's ``commands`` override it)."""
CAMERAS = ("hood", "cinematic")


def _finite(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


class DeepGtavError(ConnectionError):
    """The mod broke the protocol or the connection; the feed reconnects."""


class BadModMessage(DeepGtavError):
    """The mod sent something we refuse (too big, not JSON, numbers or nesting beyond reason): the
    connection is dropped and remade like any other error, and the message is counted (``bad_message``)."""


# ---------------------------------------------------------------------------------------------- framing


def pack(payload: bytes) -> bytes:
    """One message on the wire: little-endian uint32 length, then the payload."""
    return _LEN.pack(len(payload)) + payload


def pack_json(msg: dict) -> bytes:
    return pack(json.dumps(msg, separators=(",", ":")).encode("utf-8"))


def row_stride(width: int) -> int:
    """Bytes per row of a 24-bit DIB: rows are padded to a multiple of 4 bytes."""
    return (width * 3 + 3) // 4 * 4


def frame_nbytes(width: int, height: int) -> int:
    return row_stride(width) * height


def bitmap_to_rgb(buf: bytes | bytearray | memoryview, width: int, height: int) -> np.ndarray:
    """A top-down, row-padded BGR bitmap as a contiguous H x W x 3 RGB array (a copy)."""
    stride = row_stride(width)
    if len(buf) != stride * height:
        raise DeepGtavError(
            f"frame of {len(buf)} bytes; {width}x{height} needs {stride * height} (stride {stride})"
        )
    rows = np.frombuffer(buf, dtype=np.uint8).reshape(height, stride)
    bgr = rows[:, : width * 3].reshape(height, width, 3)
    return np.ascontiguousarray(bgr[:, :, ::-1])


def rgb_to_bitmap(rgb: np.ndarray, pad_byte: int = 0) -> bytes:
    """The inverse, for test servers and fakes: RGB H x W x 3 -> padded top-down BGR rows."""
    h, w, _ = rgb.shape
    stride = row_stride(w)
    out = np.full((h, stride), pad_byte, dtype=np.uint8)
    out[:, : w * 3] = rgb[:, :, ::-1].reshape(h, w * 3)
    return out.tobytes()


# ---------------------------------------------------------------------------------------------- messages


@dataclass
class Scenario:
    """Where and how the mod sets the car up (``start`` and ``config``)."""

    location: list[float] | None = None
    """[x, y] m; the mod snaps it to the closest road node. None: random (start) or unchanged (config)."""
    time: list[int] | None = field(default_factory=lambda: [12, 0])
    """[hour, minute] of game time."""
    weather: str | None = "CLEAR"
    """CLEAR, EXTRASUNNY, CLOUDS, OVERCAST, RAIN, CLEARING, THUNDER, SMOG, FOGGY, XMAS, SNOWLIGHT, ..."""
    vehicle: str | None = "blista"
    driving_mode: int = 786603
    """Autopilot driving-style flags (TASK_VEHICLE_DRIVE_WANDER); -1: manual (the client's commands drive)."""
    driving_speed: float = 15.0
    """Autopilot cruise speed, m/s."""

    def to_json(self) -> dict:
        mode: Any = -1 if self.driving_mode < 0 else [int(self.driving_mode), float(self.driving_speed)]
        return {
            "location": None if self.location is None else [float(v) for v in self.location[:2]],
            "time": self.time,
            "weather": self.weather,
            "vehicle": self.vehicle,
            "drivingMode": mode,
        }


def dataset(rate: float, frame: tuple[int, int], cameras: tuple[str, ...] = ("hood",)) -> dict:
    """The dataset part of ``start``/``config``: rate, frame size and the telemetry Charles reads.

    ``cameras``: ``("hood", "cinematic")`` asks an extended mod to render the two cameras on alternate
    frames (each data message then says which one in ``camera``); ``rate`` counts frames of both.
    """
    d: dict[str, Any] = {
        "rate": max(1, int(round(rate))),
        "frame": [int(frame[0]), int(frame[1])],
        "vehicles": False,
        "peds": False,
        "trafficSigns": None,
        "direction": None,
        "reward": None,
        "drivingMode": None,
    }
    d.update({k: True for k in DATASET_FIELDS})
    d.update({k: True for k in EXTENSION_FIELDS})
    d["cameras"] = list(cameras)
    return d


def start_message(scenario: Scenario, ds: dict) -> dict:
    return {"start": {"scenario": scenario.to_json(), "dataset": ds}}


def config_message(scenario: Scenario, ds: dict) -> dict:
    return {"config": {"scenario": scenario.to_json(), "dataset": ds}}


def commands_message(throttle: float, brake: float, steering: float, override: bool = False) -> dict:
    """Driving commands; clamped: throttle, brake [0, 1], steering [-1, 1].

    The public mod applies them in manual mode only. ``override`` (extension) asks an extended mod to apply
    them over its running autopilot for ``OVERRIDE_HOLD_MS`` (the agent repeats them every frame of a
    noise burst), while it keeps reporting what the autopilot wants in ``autopilot``.
    """
    body: dict[str, Any] = {
        "throttle": clamp(throttle, 0.0, 1.0),
        "brake": clamp(brake, 0.0, 1.0),
        "steering": clamp(steering, -1.0, 1.0),
    }
    if override:
        body["override"] = True
    return {"commands": body}


OVERRIDE_HOLD_MS = 100
"""An extended mod drops an override this long after the last ``commands`` with ``override`` (three frames
at 30 Hz): a burst ends by itself, and a client that dies mid-burst gives the car back to the autopilot."""


# ---------------------------------------------------------------------------------------------- speed bug


def msvc_rand(seed: int, n: int) -> int:
    """The ``n``-th (from 1) value of MSVC's ``rand()`` after ``srand(seed)`` (its documented LCG)."""
    state = seed & 0xFFFFFFFF
    for _ in range(n):
        state = (state * 214013 + 2531011) & 0xFFFFFFFF
    return (state >> 16) & 0x7FFF


def rand_calls_before_speed(scenario: dict) -> int:
    """How many ``rand()`` calls the public mod's ``start`` makes before it draws the autopilot speed.

    Its parser draws one value per field left null, in order: location x and y, hour and minute, weather,
    vehicle, the driving style; then the speed (drawn whenever the speed is *given*: the inverted check).
    """
    n = 0
    loc, tm = scenario.get("location"), scenario.get("time")
    n += 2 if not isinstance(loc, list) else sum(v is None for v in loc[:2])
    n += 2 if not isinstance(tm, list) else sum(v is None for v in tm[:2])
    n += scenario.get("weather") is None
    n += scenario.get("vehicle") is None
    mode = scenario.get("drivingMode")
    if isinstance(mode, list) and mode[0] is None:
        n += 1
    return n


def start_speed(unix_s: int, scenario: dict) -> float:
    """The autopilot speed (m/s) the public mod sets on a ``start`` it processes in second ``unix_s``:
    it calls ``srand(time(NULL))`` and then, for a given speed, draws ``rand() % 20`` instead of reading it."""
    return float(msvc_rand(unix_s, rand_calls_before_speed(scenario) + 1) % 20)


def plan_speed_start(
    now_s: float, want: float, scenario: dict, horizon_s: int = 60, lead_s: float = 1.0
) -> int:
    """The first second (Unix) from ``now_s + lead_s`` on, within ``horizon_s``, whose ``start`` gives the
    speed closest to ``want``: the moment to restart the scenario so the public mod drives at ``want``."""
    first = int(now_s + lead_s) + 1
    best = min(range(first, first + horizon_s), key=lambda t: (abs(start_speed(t, scenario) - want), t))
    return best


def stop_message() -> dict:
    return {"stop": {}}


@dataclass(slots=True)
class Telemetry:
    """One data message, in Charles' units (absent fields are None)."""

    throttle: float | None = None
    brake: float | None = None
    steering: float | None = None
    speed: float | None = None
    yaw_rate: float | None = None
    """deg/s, as the mod sends it."""
    location: tuple[float, float, float] | None = None
    hour: int | None = None
    # Charles' extension of the protocol (EXTENSION_FIELDS); the public mod sends none of these
    game_ms: float | None = None
    """``gameTime``: the game's clock (ms) when the frame was taken."""
    tick: int | None = None
    """``tick``: the game's frame counter of the frame."""
    camera: str | None = None
    """``camera``: which camera the frame shows (``hood`` or ``cinematic``) when the mod alternates them."""
    autopilot: tuple[float, float, float] | None = None
    """``autopilot``: [throttle, brake, steering] the autopilot wants on this frame, also while the client
    overrides it (noise bursts): the label of a frame whose controls were not the autopilot's."""

    @classmethod
    def from_json(cls, d: dict, steering_sign: float = 1.0) -> Telemetry:
        def num(key: str) -> float | None:
            v = d.get(key)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                return None
            return float(v)

        loc = d.get("location")
        location = None
        if (
            isinstance(loc, list)
            and len(loc) >= 2
            and all(isinstance(v, int | float) and not isinstance(v, bool) for v in loc[:3])
        ):
            xyz = [float(v) for v in loc[:3]] + [0.0] * (3 - min(3, len(loc)))
            if all(math.isfinite(v) for v in xyz):
                location = (xyz[0], xyz[1], xyz[2])
        steering = num("steering")
        hour = d.get("time")
        tick = d.get("tick")
        cam = d.get("camera")
        ap = d.get("autopilot")
        autopilot = None
        if isinstance(ap, list) and len(ap) == 3 and all(_finite(v) for v in ap):
            autopilot = (float(ap[0]), float(ap[1]), float(ap[2]) * steering_sign)
        return cls(
            throttle=num("throttle"),
            brake=num("brake"),
            steering=None if steering is None else steering * steering_sign,
            speed=num("speed"),
            yaw_rate=num("yawRate"),
            location=location,
            hour=hour if isinstance(hour, int) and not isinstance(hour, bool) else None,
            game_ms=num("gameTime"),
            tick=tick if isinstance(tick, int) and not isinstance(tick, bool) and 0 <= tick < 2**53 else None,
            camera=cam if cam in CAMERAS else None,
            autopilot=autopilot,
        )

    @property
    def controls(self) -> tuple[float, float] | None:
        """(steering, throttle_brake) clamped to [-1, 1], or None without all three pedals/wheel."""
        if self.steering is None or self.throttle is None or self.brake is None:
            return None
        return clean_control(self.steering), combine(self.throttle, self.brake)

    @property
    def autopilot_controls(self) -> tuple[float, float] | None:
        """(steering, throttle_brake) the autopilot wants (extension), or None when the mod does not say."""
        if self.autopilot is None:
            return None
        throttle, brake, steering = self.autopilot
        return clean_control(steering), combine(throttle, brake)


@dataclass(slots=True)
class GameMessage:
    """One frame+data pair from the mod."""

    index: int
    """Count of pairs received by this feed (across reconnects), from 1."""
    received: float
    """time.monotonic() when the data message was complete."""
    frame: np.ndarray | None
    """RGB H x W x 3 uint8, or None if the frame did not match the requested size."""
    telemetry: Telemetry
    raw: dict
    cinematic: np.ndarray | None = None
    """The third-person picture paired with this (hood) frame when the mod alternates cameras."""


# ---------------------------------------------------------------------------------------------- client


class DeepGtavClient:
    """One TCP connection to the mod, blocking. Not thread-safe except ``send`` vs ``recv``."""

    def __init__(self, host: str, port: int = DEFAULT_PORT, timeout_s: float = 1.0, stall_s: float = 10.0):
        self.host = host
        self.port = port
        self.timeout_s = timeout_s
        """Socket timeout: how often a blocked receive looks up (and may report silence)."""
        self.stall_s = stall_s
        self.sock: socket.socket | None = None
        self._send_lock = threading.Lock()

    def connect(self, timeout_s: float = 2.0) -> None:
        s = socket.create_connection((self.host, self.port), timeout=timeout_s)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # a half-open connection (cable pulled, game PC asleep) must not hang the feed forever
        s.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        s.settimeout(self.timeout_s)
        self.sock = s

    def close(self) -> None:
        s, self.sock = self.sock, None
        if s is not None:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    @property
    def connected(self) -> bool:
        return self.sock is not None

    def send(self, msg: dict) -> None:
        s = self.sock
        if s is None:
            raise DeepGtavError("not connected")
        data = pack_json(msg)
        with self._send_lock:
            try:
                s.sendall(data)
            except OSError as e:
                raise DeepGtavError(f"send failed: {e}") from e

    def _recv_exact(self, n: int, idle_ok: bool = False) -> bytearray:
        """Exactly n bytes. A timeout before the first byte of a pair raises TimeoutError (the caller
        decides whether silence is fatal); a stall in the middle of a message longer than ``stall_s``
        is a broken connection (we could never find the next message boundary again)."""
        s = self.sock
        if s is None:
            raise DeepGtavError("not connected")
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        started = time.monotonic()
        while got < n:
            try:
                r = s.recv_into(view[got:], n - got)
            except TimeoutError:
                if idle_ok and got == 0:
                    raise
                if time.monotonic() - started > self.stall_s:
                    raise DeepGtavError(f"stalled {self.stall_s:.0f}s inside a message") from None
                continue
            except OSError as e:
                raise DeepGtavError(f"receive failed: {e}") from e
            if r == 0:
                raise DeepGtavError("the mod closed the connection")
            got += r
        return buf

    def recv_raw(self, limit: int, idle_ok: bool = False) -> bytearray:
        """One length-prefixed payload (``idle_ok``: TimeoutError if nothing starts in ``timeout_s``)."""
        (n,) = _LEN.unpack(self._recv_exact(4, idle_ok))
        if n > limit:
            raise BadModMessage(f"message of {n} bytes exceeds the {limit}-byte bound")
        return self._recv_exact(n)

    def recv(self, frame_size: tuple[int, int], steering_sign: float = 1.0) -> GameMessage:
        """One frame+data pair. A frame of the wrong size is reported as ``frame=None`` (the data is kept).

        Raises TimeoutError if no pair starts within ``timeout_s``, DeepGtavError on a broken connection.
        """
        raw_frame = self.recv_raw(MAX_FRAME_BYTES, idle_ok=True)
        raw_data = self.recv_raw(MAX_DATA_BYTES)
        now = time.monotonic()
        try:
            data = json.loads(bytes(raw_data).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadModMessage(f"data message is not JSON ({e})") from None
        except (RecursionError, ValueError, OverflowError, MemoryError) as e:
            # JSON that parses in principle but not here: nested 100000 deep, a number of 5000 digits
            raise BadModMessage(f"data message refused ({type(e).__name__})") from None
        if not isinstance(data, dict):
            raise BadModMessage("data message is not a JSON object")
        w, h = frame_size
        frame = bitmap_to_rgb(raw_frame, w, h) if len(raw_frame) == frame_nbytes(w, h) else None
        if frame is None:
            data = {**data, "_frame_bytes": len(raw_frame)}
        try:
            telemetry = Telemetry.from_json(data, steering_sign)
        except (ValueError, OverflowError, TypeError, RecursionError) as e:  # float() of a 400-digit int
            raise BadModMessage(f"data message refused ({type(e).__name__}: {str(e)[:80]})") from None
        return GameMessage(0, now, frame, telemetry, data)


# ---------------------------------------------------------------------------------------------- feed


class Backoff:
    """Exponential back-off between reconnection attempts: min_s, 2*min_s, ... up to max_s."""

    def __init__(self, min_s: float = 0.25, max_s: float = 10.0):
        self.min_s, self.max_s = min_s, max_s
        self.next_s = min_s

    def delay(self) -> float:
        d = self.next_s
        self.next_s = min(self.max_s, self.next_s * 2)
        return d

    def reset(self) -> None:
        self.next_s = self.min_s


class CameraPairer:
    """Pairs the hood and cinematic frames of a mod that renders them on alternate frames.

    A pair is a hood frame and the cinematic frame of the game tick just before it (``max_gap`` ticks at
    most), tagged with the hood's tick (the model's frame). A hood frame never waits: with no such
    cinematic (the first frame, a lost one) it goes out alone, counted ``camera_unpaired``. Frames the mod
    did not tag go out as they are (a mod that does not alternate).
    """

    def __init__(self, on_event: Callable[[str], None] | None = None, max_gap: int = 1):
        self.on_event = on_event or (lambda _e: None)
        self.max_gap = max_gap
        self._cine: GameMessage | None = None

    def push(self, msg: GameMessage) -> list[GameMessage]:
        """What is ready to go out after ``msg`` arrived (hood frames, with ``cinematic`` when paired)."""
        cam = msg.telemetry.camera
        if cam is None:
            return [msg]
        if cam == "cinematic":
            self._cine = msg
            return []
        c, self._cine = self._cine, None
        t, tc = msg.telemetry.tick, c.telemetry.tick if c is not None else None
        if c is not None and t is not None and tc is not None and 0 < t - tc <= self.max_gap:
            msg.cinematic = c.frame
        else:
            self.on_event("camera_unpaired")
        return [msg]


class DeepGtavFeed:
    """Keeps a connection to the mod alive on a thread and holds the newest frame+data pair.

    On every (re)connection it sends ``start`` with the current scenario, so the car comes back where the
    last teleport put it. Connection loss, a protocol error, or ``silence_s`` without data close the socket
    and reconnect after an exponentially growing pause (``backoff_min_s`` .. ``backoff_max_s``).
    ``on_event(name)`` is told ``connected``, ``disconnected``, ``bad_frame``, ``skipped`` (a pair
    overwritten before the loop took it) for metrics.
    """

    def __init__(
        self,
        host: str,
        port: int,
        scenario: Scenario,
        ds: dict,
        *,
        steering_sign: float = 1.0,
        silence_s: float = 10.0,
        backoff_min_s: float = 0.25,
        backoff_max_s: float = 10.0,
        on_event: Callable[[str], None] | None = None,
        speed_fix: bool = False,
        recent: int = 64,
    ):
        self.client = DeepGtavClient(host, port, timeout_s=min(1.0, silence_s), stall_s=silence_s)
        self.speed_fix = speed_fix and scenario.driving_mode >= 0
        """Work around the public mod's speed bug: restart the scenario in a second whose ``start`` draws
        the speed we want (see :func:`plan_speed_start`); once per connection."""
        self.expected_speed: float | None = None
        """The autopilot speed the last ``start`` gave the car, as far as we can tell (None: not known)."""
        self._restart_at: float | None = None
        self._restart_speed = 0.0
        self.recent: deque[GameMessage] = deque(maxlen=recent)
        """The last pairs received (telemetry for frames taken by someone else: dxcam), oldest first."""
        self.pairer = (
            CameraPairer(lambda e: self.on_event(e)) if "cinematic" in ds.get("cameras", ()) else None
        )
        self.scenario = scenario
        self.dataset = ds
        self.steering_sign = steering_sign
        self.silence_s = silence_s
        self.backoff = Backoff(backoff_min_s, backoff_max_s)
        self.on_event = on_event or (lambda _e: None)
        self.state = "disconnected"
        self.connections = 0
        self._stop = threading.Event()
        self._cond = threading.Condition()
        self._latest: GameMessage | None = None
        self._taken = 0
        self._count = 0
        self._thread: threading.Thread | None = None
        self._warned_unreachable = False

    @property
    def frame_size(self) -> tuple[int, int]:
        return int(self.dataset["frame"][0]), int(self.dataset["frame"][1])

    # -- the loop's side ---------------------------------------------------------------------------------

    def latest(self) -> GameMessage | None:
        with self._cond:
            return self._latest

    def next(self, timeout_s: float) -> GameMessage | None:
        """The newest pair not yet taken, waiting up to timeout_s; None if none arrived."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._latest is None or self._latest.index <= self._taken:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    return None
                self._cond.wait(remaining)
            msg = self._latest
            self._taken = msg.index
            return msg

    def newer(self, t: float, timeout_s: float) -> list[GameMessage]:
        """The recent pairs (oldest first) once one received after monotonic time ``t`` is among them, or
        whatever there is after ``timeout_s``: a frame taken at ``t`` is matched to telemetry on both sides."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while not (self.recent and self.recent[-1].received >= t):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._stop.is_set():
                    break
                self._cond.wait(remaining)
            return list(self.recent)

    def send(self, msg: dict) -> bool:
        """Send a message now; False (and the feed reconnects) if there is no connection."""
        try:
            self.client.send(msg)
            return True
        except DeepGtavError as e:
            log.debug(f"DeepGTAV send dropped: {e}")
            return False

    def commands(self, throttle: float, brake: float, steering: float, override: bool = False) -> bool:
        """Drive (Charles' steering sign): the mod gets steering in its own sign, as its telemetry says it."""
        return self.send(commands_message(throttle, brake, steering * self.steering_sign, override))

    def teleport(self, location: list[float]) -> bool:
        """Rebuild the scenario at a new [x, y] (the mod snaps it to a road). Also used after reconnects."""
        self.scenario.location = [float(location[0]), float(location[1])]
        log.info(f"DeepGTAV: teleport to ({location[0]:.1f}, {location[1]:.1f})")
        return self.send(config_message(self.scenario, self.dataset))

    # -- lifecycle ---------------------------------------------------------------------------------------

    def start(self) -> DeepGtavFeed:
        self._thread = threading.Thread(target=self._run, name="deepgtav", daemon=True)
        self._thread.start()
        return self

    def close(self, stop_scenario: bool = True) -> None:
        self._stop.set()
        if stop_scenario and self.client.connected:
            self.send(stop_message())
        self.client.close()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=3)

    def _set_state(self, state: str, detail: str = "") -> None:
        if state != self.state:
            self.state = state
            where = f"{self.client.host}:{self.client.port}"
            msg = f"DeepGTAV {where}: {state}" + (f" ({detail})" if detail else "")
            (log.warning if state == "disconnected" else log.info)(msg)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.client.connect()
            except OSError as e:
                delay = self.backoff.delay()
                if not self._warned_unreachable:
                    log.warning(
                        f"DeepGTAV {self.client.host}:{self.client.port} unreachable ({e}); retrying with back-off up to {self.backoff.max_s:.0f}s"
                    )
                    self._warned_unreachable = True
                self._stop.wait(delay)
                continue
            self._warned_unreachable = False
            self.connections += 1
            try:
                self.client.send(start_message(self.scenario, self.dataset))
                self._restart_at = None
                self.expected_speed = None if self.speed_fix else self.scenario.driving_speed
                self._set_state(
                    "connected",
                    f"started, {self.frame_size[0]}x{self.frame_size[1]} at {self.dataset['rate']} Hz",
                )
                self.on_event("connected")
                self._receive()
            except DeepGtavError as e:
                if isinstance(e, BadModMessage):
                    self.on_event("bad_message")
                if not self._stop.is_set():
                    self._set_state("disconnected", str(e))
            except Exception as e:  # noqa: BLE001 - whatever a mod sends, the feed reconnects, never dies
                self.on_event("bad_message")
                log.warning(f"DeepGTAV message broke the connection ({type(e).__name__}: {str(e)[:120]})")
                self._set_state("disconnected", f"{type(e).__name__}")
            finally:
                self.client.close()
                if not self._stop.is_set():
                    self.on_event("disconnected")
            self._stop.wait(self.backoff.delay())

    def _fix_speed(self) -> None:
        """Once per connection: plan the restart after the first data, then stop and start on time."""
        now = time.time()
        if self._restart_at is None:
            sc = self.scenario.to_json()
            t = plan_speed_start(now, self.scenario.driving_speed, sc)
            self._restart_at = t + 0.5  # mid-second: the mod reads its clock a frame or two after we send
            self._restart_speed = start_speed(t, sc)
            log.info(
                f"DeepGTAV: the public mod ignores the autopilot speed sent with start; restarting the scenario "
                f"in {t + 0.5 - now:.1f}s, a second whose start draws {self._restart_speed:.0f} m/s "
                f"(asked {self.scenario.driving_speed:g})"
            )
        elif self.expected_speed is None and now >= self._restart_at:
            self.client.send(stop_message())
            self.client.send(start_message(self.scenario, self.dataset))
            self.expected_speed = self._restart_speed
            self.on_event("speed_restart")

    def _receive(self) -> None:
        last = time.monotonic()
        got_data = False
        while not self._stop.is_set():
            if self.speed_fix and got_data:
                self._fix_speed()
            try:
                msg = self.client.recv(self.frame_size, self.steering_sign)
            except TimeoutError:
                if time.monotonic() - last > self.silence_s:
                    raise DeepGtavError(f"no data for {self.silence_s:.0f}s") from None
                continue
            last = msg.received
            got_data = True
            self.backoff.reset()
            if msg.frame is None:
                self.on_event("bad_frame")
            ready = self.pairer.push(msg) if self.pairer is not None else [msg]
            with self._cond:
                self.recent.append(msg)
                for m in ready:
                    self._count += 1
                    m.index = self._count
                    if self._latest is not None and self._latest.index > self._taken:
                        self.on_event("skipped")
                    self._latest = m
                self._cond.notify_all()
