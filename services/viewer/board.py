"""The viewer's memory: the newest console of each instance, bounded, and the images ready to serve.

Socket-free and thread-safe: the receive loop calls :meth:`Board.update` (``console.*``, ~5 Hz per
instance) while HTTP threads read :meth:`Board.snapshot` and :meth:`Board.image`. Only the newest
console of each instance is kept; an instance silent for ``stale_s`` is forgotten and, past
``max_instances``, the longest-silent one goes first, so memory does not grow with restarts or replicas.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import cv2
import numpy as np

from charles.proto import Camera, Console, Frame

CONTENT_TYPES = {"jpeg": "image/jpeg", "png": "image/png"}
ROLES = ("player", "trainer", "balancer", "judge")
"""Services the page shows one instance of (the judge: the second curve on the loss tile); collectors are
listed, not shown."""
LIVE_S = 10.0
"""An instance heard from within this many seconds can be picked for a role (a restart takes over after)."""
_MAX_DEPTH = 8
_MAX_ITEMS = 4096


def jsonable(v: Any, depth: int = 0) -> Any:
    """State as strict JSON: non-finite numbers become null, keys text, odd types text, depth bounded.

    Browsers' JSON.parse refuses NaN, and a console's state is free-form, so this is where it is made safe.
    """
    if v is None or isinstance(v, bool | str):
        return v
    if isinstance(v, int):
        return v
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if depth >= _MAX_DEPTH:
        return None
    if isinstance(v, dict):
        return {str(k): jsonable(x, depth + 1) for k, x in list(v.items())[:_MAX_ITEMS]}
    if isinstance(v, list | tuple):
        return [jsonable(x, depth + 1) for x in v[:_MAX_ITEMS]]
    if isinstance(v, bytes | bytearray | memoryview):
        return f"<{len(v)} bytes>"
    if isinstance(v, np.generic):
        return jsonable(v.item(), depth)
    return str(v)


@dataclass(slots=True)
class Picture:
    """One image as the browser gets it: bytes that are already JPEG or PNG, encoded at most once."""

    frame: Frame
    seq: int
    captured: float = 0.0
    """Unix time the picture was taken (a console's: when it was sent)."""
    tick: int | None = None
    """The game tick of a camera picture, when the game source tags its frames (hood and cinematic of one
    moment share it)."""
    _served: tuple[bytes, str] | None = None

    def bytes_and_type(self) -> tuple[bytes, str]:
        if self._served is None:
            f = self.frame
            if f.codec in CONTENT_TYPES:
                self._served = (bytes(f.data), CONTENT_TYPES[f.codec])
            else:  # raw pixels: encode once, on the first request
                img = f.decode()
                bgr = img if img.shape[2] == 1 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
                ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, 85])
                if not ok:
                    raise ValueError(f"could not encode a raw {f.shape} frame as JPEG")
                self._served = (buf.tobytes(), "image/jpeg")
        return self._served


@dataclass(slots=True)
class Entry:
    """The newest console of one instance."""

    instance: str
    service: str
    state: dict
    images: dict[str, Picture]
    seq: int
    first_seen: float
    last_seen: float
    wall: float
    """Sender's Unix time of this console."""
    updates: int = 0
    json_state: Any = field(default=None)
    cameras: dict[str, Picture] = field(default_factory=dict)
    """The newest camera pictures (camera.<instance>, up to 30 Hz); they outrank the console's images."""


class Board:
    def __init__(self, stale_s: float = 120.0, max_instances: int = 64, clock: Any = time.monotonic):
        self.stale_s = stale_s
        self.max_instances = max_instances
        self.clock = clock
        self._entries: dict[str, Entry] = {}
        self._lock = threading.Lock()
        self._seq = 0
        self.evicted = 0

    # -- writing (the receive loop) ----------------------------------------------------------------------

    def update(self, instance: str, console: Console, wall: float | None = None) -> Entry:
        """Keep this console as the newest of its instance. Image bytes are copied out of the socket frame.

        ``wall`` is the sender's Unix time: a console that was already old when it arrived (the broker's
        last value of a service that has since died) counts as heard that long ago, so it is not shown
        as live and is forgotten on schedule. Hosts' clocks must agree to well within ``stale_s``.
        """
        now_wall = time.time()
        wall = now_wall if wall is None else wall
        now = self.clock()
        heard = now - min(max(0.0, now_wall - wall), self.stale_s * 2)
        with self._lock:
            old = self._entries.get(instance)
            if old is not None and wall < old.wall:
                return old  # an older copy (the broker's snapshot racing a live message): keep the newer
            self._seq += 1
            seq = self._seq
            images = {
                str(name): Picture(Frame(f.codec, tuple(f.shape), bytes(f.data)), seq, wall)
                for name, f in console.images.items()
            }
            state = console.state if isinstance(console.state, dict) else {}
            entry = Entry(
                instance=instance,
                service=console.service,
                state=state,
                images=images,
                seq=seq,
                first_seen=old.first_seen if old is not None else heard,
                last_seen=max(heard, old.last_seen) if old is not None else heard,
                wall=wall,
                updates=(old.updates + 1) if old is not None else 1,
                json_state=jsonable(state),
                cameras=old.cameras if old is not None else {},
            )
            self._entries[instance] = entry
            self._prune(now)
            return entry

    def camera(self, instance: str, camera: Camera) -> dict[str, Picture]:
        """Keep these camera pictures as the newest of an instance the board knows; the pictures kept.

        An instance must have sent a console first (it says which service it is; the broker serves the
        newest console to a viewer that starts late, so a player is known within a console period). An
        older picture than the one held (reordered on the way) is not kept.
        """
        with self._lock:
            e = self._entries.get(instance)
            if e is None:
                return {}
            kept = {}
            for name, f in camera.images.items():
                old = e.cameras.get(name)
                if old is not None and camera.captured < old.captured:
                    continue
                self._seq += 1
                kept[str(name)] = Picture(
                    Frame(f.codec, tuple(f.shape), bytes(f.data)), self._seq, camera.captured, camera.tick
                )
            e.cameras.update(kept)
            return kept

    def _prune(self, now: float) -> None:
        for k in [k for k, e in self._entries.items() if now - e.last_seen > self.stale_s]:
            del self._entries[k]
            self.evicted += 1
        while len(self._entries) > self.max_instances:
            oldest = min(self._entries.values(), key=lambda e: e.last_seen)
            del self._entries[oldest.instance]
            self.evicted += 1

    # -- reading (HTTP threads) --------------------------------------------------------------------------

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def roles(self, pins: dict[str, str] | None = None) -> dict[str, str | None]:
        """Which instance the page shows for each role.

        A pinned instance (``?player=player-2``) wins while it is known. Otherwise, among instances heard
        within LIVE_S, the one seen first keeps the tile (two players do not make the page flicker);
        with none live, the most recently heard.
        """
        pins = pins or {}
        now = self.clock()
        with self._lock:
            self._prune(now)
            out: dict[str, str | None] = {}
            for role in ROLES:
                pinned = pins.get(role)
                if pinned and pinned in self._entries:
                    out[role] = pinned
                    continue
                mine = [e for e in self._entries.values() if e.service == role]
                live = [e for e in mine if now - e.last_seen <= LIVE_S]
                if live:
                    out[role] = min(live, key=lambda e: (e.first_seen, e.instance)).instance
                elif mine:
                    out[role] = max(mine, key=lambda e: e.last_seen).instance
                else:
                    out[role] = None
            return out

    def snapshot(self, pins: dict[str, str] | None = None) -> dict:
        """Everything the page draws, as strict JSON-able data (no image bytes)."""
        roles = self.roles(pins)
        now = self.clock()
        with self._lock:
            instances = {
                e.instance: {
                    "service": e.service,
                    "age_s": round(now - e.last_seen, 2),
                    "sent": e.wall,
                    "seq": e.seq,
                    "updates": e.updates,
                    "state": e.json_state,
                    "images": {
                        n: {"seq": p.seq, "codec": p.frame.codec, "shape": list(p.frame.shape)}
                        for n, p in {**e.images, **e.cameras}.items()
                    },
                }
                for e in sorted(self._entries.values(), key=lambda e: (e.service, e.instance))
            }
        return {"now": time.time(), "roles": roles, "instances": instances}

    def resolve(self, who: str) -> str | None:
        """An instance id, or a role/service name standing for the instance the page shows for it."""
        with self._lock:
            if who in self._entries:
                return who
        if who in ROLES:
            return self.roles().get(who)
        with self._lock:
            mine = [e for e in self._entries.values() if e.service == who]
            return max(mine, key=lambda e: e.last_seen).instance if mine else None

    def image(self, who: str, name: str) -> Picture | None:
        instance = self.resolve(who)
        if instance is None:
            return None
        with self._lock:
            e = self._entries.get(instance)
            return (e.cameras.get(name) or e.images.get(name)) if e is not None else None
