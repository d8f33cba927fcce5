"""From one tick of driving to one sample: the source interface and the socket-free sample builder.

A :class:`Source` (the sim, a remote game, a Gymnasium env) yields one :class:`Capture` per 30 Hz tick of
game time: the picture, what the driver meant (the label), what the car really got (executed), speed and
purpose. The :class:`SampleBuilder` turns the stream of captures into samples for the model line:

- ``history``: the rows of the ticks *before* this one (executed action, speed, purpose), oldest first.
  The row of a tick is appended only after its sample is built, so a sample's history can never hold its
  own label (the seed's bug). The actions are the *executed* ones: what a model sees of its own past when
  it drives (charles.sim.session records the same), so training and driving agree.
- ``previous``: the executed action of the tick before (what a delta output is a change from; the
  player's previous is its own last action, the same thing).
- ``stack``: ``frames - 1`` past pictures ``frame_stride`` ticks apart, oldest first. Ticks that are not
  emitted (Unstuck fading and teleporting) still enter the rings, exactly as the player sees them.

A tick is emitted when the source says the car is driving and the stack is full (a few ticks after start
or an episode reset). Pictures stay as the source made them; the sender thread fits and encodes them
(:func:`fit_frame`), so the capture loop never pays for JPEG.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field
from typing import Protocol

import cv2
import numpy as np

from charles.proto import Frame
from charles.proto.messages import HISTORY_FIELDS

TICK_HZ = 30
"""Samples per second of game time: the seed's rate, and the sim's fixed step."""

Image = np.ndarray | Frame
"""A picture as a source hands it over: RGB uint8 pixels, or an already encoded frame (remote games)."""


@dataclass(slots=True)
class Capture:
    """One tick of game time as a source saw it."""

    game_time: float
    """Seconds of game time since the source started."""
    image: Image | None
    """Hood camera; None only on ticks that are not driving when the model stacks no frames."""
    label: tuple[float, float]
    """(steering, throttle_brake) the driver meant: the NPC's corrective action, a game's controls."""
    executed: tuple[float, float]
    """(steering, throttle_brake) the car got (label plus injected noise; the brake while recovering)."""
    speed: float
    """m/s."""
    purpose: tuple[float, float]
    """Direction to the target (rad, positive left) and distance (m)."""
    driving: bool = True
    """False while Unstuck fades and teleports: those frames are not driving, so no sample."""
    source: str = "npc"
    """Who drove (Sample.source)."""
    distance_m: float = 0.0
    """Distance driven this tick (km on the consoles)."""
    unstuck: bool = False
    """An Unstuck teleport happened on this tick."""
    reset: bool = False
    """A new episode starts with this tick (gym): the rings start afresh."""


class Source(Protocol):
    """Where driving comes from. ``next`` returns the next tick, or None when none came within timeout_s."""

    name: str
    """sim, game:<id>, gym:<env id> (heartbeat and console show it)."""
    paced: bool
    """True when ``next`` waits for the game's own clock (a remote game); False when the collector paces
    it (sim, gym: as fast as the CPU allows, or to the wall clock with collector.realtime)."""

    def next(self, timeout_s: float) -> Capture | None: ...

    def info(self) -> dict:
        """Small numbers and strings for the console (seed, weather, episodes...)."""
        ...

    def close(self) -> None: ...


def fit_frame(image: np.ndarray, width: int, height: int) -> np.ndarray:
    """An RGB picture at exactly the model's resolution: the one resize collectors and players share.

    INTER_AREA averages the pixels a shrink drops (no aliasing of lane marks); growing uses bilinear.
    """
    h, w = image.shape[:2]
    if (w, h) == (width, height):
        return image
    interp = cv2.INTER_AREA if w >= width and h >= height else cv2.INTER_LINEAR
    return cv2.resize(image, (width, height), interpolation=interp)


def as_trainer_sees(
    image: np.ndarray, width: int, height: int, codec: str = "jpeg", quality: int = 90
) -> np.ndarray:
    """The picture a model trains on: fitted, then through the collector's codec and back."""
    fitted = fit_frame(image, width, height)
    if codec == "raw":
        return fitted
    return Frame.encode(fitted, codec, quality).decode()


@dataclass(frozen=True)
class SampleShape:
    """What the model line needs of each sample (from the model section)."""

    width: int
    height: int
    frames: int = 1
    """Stacked frames including the current one."""
    frame_stride: int = 1
    history_rows: int = 60

    @classmethod
    def of(cls, model_cfg, history_rows: int = 60) -> SampleShape:
        """From a charles.model.config.ModelConfig; history rows are at least what the model reads."""
        return cls(
            width=model_cfg.width,
            height=model_cfg.height,
            frames=model_cfg.frames,
            frame_stride=model_cfg.frame_stride,
            history_rows=max(history_rows, model_cfg.history_length if model_cfg.history != "none" else 0),
        )

    @property
    def span(self) -> int:
        """Past ticks the stack reaches back."""
        return (self.frames - 1) * self.frame_stride


@dataclass(slots=True)
class Pending:
    """A sample before encoding: what the capture loop hands the sender thread."""

    seq: int
    tick: int
    game_time: float
    image: Image
    label: tuple[float, float]
    speed: float
    purpose: tuple[float, float]
    history: np.ndarray | None
    previous: tuple[float, float] | None
    source: str
    stack: list[tuple[int, Image]] = field(default_factory=list)
    """(tick, picture) of the past frames, oldest first; the tick lets the sender encode each once."""


class FrameStack:
    """The last ``span`` pictures, to stack ``frames - 1`` of them ``stride`` ticks apart."""

    def __init__(self, frames: int, stride: int = 1):
        self.frames = frames
        self.stride = stride
        self.ring: collections.deque[tuple[int, Image | None]] = collections.deque(
            maxlen=max(1, (frames - 1) * stride)
        )

    @property
    def full(self) -> bool:
        return self.frames <= 1 or (
            len(self.ring) == self.ring.maxlen and all(img is not None for _, img in self.ring)
        )

    def past(self) -> list[tuple[int, Image]]:
        """The stacked past pictures for the tick about to be pushed, oldest first.

        Before the ring is full the oldest picture it has stands in for older ones (the player must drive
        from its first frame; collectors wait until it is full instead).
        """
        if self.frames <= 1 or not self.ring:
            return []
        out = []
        n = len(self.ring)
        for j in range(self.frames - 1, 0, -1):  # j ticks*stride back, oldest first
            k = max(0, n - j * self.stride)
            out.append(self.ring[k])
        return out

    def push(self, tick: int, image: Image | None) -> None:
        if self.frames > 1:
            self.ring.append((tick, image))

    def clear(self) -> None:
        self.ring.clear()


class History:
    """Rows of HISTORY_FIELDS for the ticks before now, oldest first; zeros before the first tick."""

    def __init__(self, rows: int):
        self.rows = np.zeros((rows, len(HISTORY_FIELDS)), np.float32)

    def copy(self) -> np.ndarray:
        return self.rows.copy()

    def push(self, action: tuple[float, float], speed: float, purpose: tuple[float, float]) -> None:
        if len(self.rows):
            self.rows[:-1] = self.rows[1:]
            self.rows[-1] = (action[0], action[1], speed, purpose[0], purpose[1])

    def clear(self) -> None:
        self.rows[:] = 0.0


def clean_control(v: float) -> float:
    """A control value in [-1, 1] (the wire's range)."""
    return min(1.0, max(-1.0, float(v)))


def clean_speed(v: float) -> float:
    """Speed in the wire's range, m/s [0, 200]."""
    return min(200.0, max(0.0, float(v)))


def clean_purpose(p: tuple[float, float]) -> tuple[float, float]:
    """Purpose in the wire's ranges: angle wrapped to [-pi, pi), distance in [0, 1e7] m."""
    angle = (float(p[0]) + np.pi) % (2 * np.pi) - np.pi
    return angle, min(1e7, max(0.0, float(p[1])))


class SampleBuilder:
    """Captures in, pending samples out (socket-free; the unit the tests pin down)."""

    def __init__(self, shape: SampleShape):
        self.shape = shape
        self.history = History(shape.history_rows)
        self.stack = FrameStack(shape.frames, shape.frame_stride)
        self.previous: tuple[float, float] | None = None
        self.tick = -1
        self.seq = 0
        """Sequence number of the next sample (gaps downstream mean drops)."""

    def push(self, cap: Capture) -> Pending | None:
        """Record one tick; returns its sample when the tick is emitted."""
        if cap.reset:
            self.reset()
        self.tick += 1
        speed = clean_speed(cap.speed)
        purpose = clean_purpose(cap.purpose)
        pending = None
        if cap.driving and cap.image is not None and self.stack.full:
            pending = Pending(
                seq=self.seq,
                tick=self.tick,
                game_time=max(0.0, float(cap.game_time)),
                image=cap.image,
                label=(clean_control(cap.label[0]), clean_control(cap.label[1])),
                speed=speed,
                purpose=purpose,
                history=self.history.copy() if len(self.history.rows) else None,
                previous=self.previous,
                source=cap.source,
                stack=self.stack.past(),
            )
            self.seq += 1
        # Only now does this tick become history: its sample above never sees its own row.
        executed = (clean_control(cap.executed[0]), clean_control(cap.executed[1]))
        self.history.push(executed, speed, purpose)
        self.stack.push(self.tick, cap.image)
        self.previous = executed
        return pending

    def reset(self) -> None:
        """A new episode: no past to speak of (history zeros, the stack refills before emitting)."""
        self.history.clear()
        self.stack.clear()
        self.previous = None
