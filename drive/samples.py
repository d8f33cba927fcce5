"""From one tick of driving to one sample: the only place samples are built.

A source (the sim, a remote game, a Gymnasium env, the capture agent's screen) hands one :class:`Capture`
per 30 Hz tick of game time: the picture, what the driver meant (the label), what the car really got
(executed), speed and purpose. The :class:`SampleBuilder` turns the stream of captures into
:class:`Pending` samples and the :class:`Encoder` makes each a :class:`~charles.proto.Sample`:

- ``history``: the rows of the ticks *before* this one (executed action, speed, purpose), oldest first.
  The row of a tick is appended only after its sample is built, so a sample's history can never hold its
  own label (the seed's bug). The actions are the *executed* ones: what a model sees of its own past when
  it drives (charles.sim.session records the same), so training and driving agree.
- ``previous``: the executed action of the tick before (what a delta output is a change from; the
  player's previous is its own last action, the same thing).
- ``stack``: ``frames - 1`` past pictures ``frame_stride`` ticks apart, oldest first. Ticks that are not
  emitted (Unstuck fading and teleporting) still enter the rings, exactly as the player sees them.

A collector emits a tick when the source says the car is driving and the stack is full (a few ticks after
start or an episode reset); the capture agent (``wait_for_stack=False``) emits from its first tick with
the oldest picture standing in, as the player drives. Pictures stay as the source made them until the
encoder fits and encodes them (:func:`~charles.drive.frames.fit_frame`), so a collector's capture loop
never pays for JPEG. The player's DAgger samples go through the same encoder.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from charles.drive.controls import clean_control, clean_purpose, clean_speed
from charles.drive.frames import Image, fit_frame
from charles.drive.past import FrameStack, History
from charles.drive.shape import InputShape
from charles.proto import Frame, Sample

TICK_HZ = 30
"""Samples per second of game time: the seed's rate, and the sim's fixed step."""


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
    """(tick, picture) of the past frames, oldest first; the tick lets the encoder encode each once."""


class SampleBuilder:
    """Captures in, pending samples out (socket-free; the unit the tests pin down).

    ``wait_for_stack`` False emits from the first driving tick, the oldest past picture (or this one)
    standing in for those not seen yet.
    """

    def __init__(self, shape: InputShape, wait_for_stack: bool = True):
        self.shape = shape
        self.wait_for_stack = wait_for_stack
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
        if cap.driving and cap.image is not None and (self.stack.full or not self.wait_for_stack):
            pending = Pending(
                seq=self.seq,
                tick=self.tick,
                game_time=max(0.0, float(cap.game_time)),
                image=cap.image,
                label=(clean_control(cap.label[0]), clean_control(cap.label[1])),
                speed=speed,
                purpose=purpose,
                history=self.history.copy() if len(self.history) else None,
                previous=self.previous,
                source=cap.source,
                stack=self.stack.past((self.tick, cap.image)),
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


class Encoder:
    """Pending -> Sample: fit, encode, and remember the last few encoded frames for the stack.

    Each picture is encoded once, however many samples' stacks carry it (the cache is keyed by tick).
    """

    def __init__(self, collector: str, shape: InputShape, codec: str = "jpeg", quality: int = 90):
        self.collector = collector
        self.shape = shape
        self.codec = codec
        self.quality = quality
        self._cache: dict[int, Frame] = {}
        self._keep = shape.span + 1

    def frame(self, image: Image) -> Frame:
        """One picture for the wire: at the model's resolution, in this encoder's codec."""
        w, h = self.shape.width, self.shape.height
        if isinstance(image, Frame):
            if image.shape == (h, w, 3) and image.codec == self.codec:
                return image  # already what the wire wants: pass the bytes through untouched
            image = image.decode()
        if image.ndim == 3 and image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
        return Frame.encode(np.ascontiguousarray(fit_frame(image, w, h)), self.codec, self.quality)

    def _cached(self, tick: int, image: Image) -> Frame:
        f = self._cache.get(tick)
        if f is None:
            f = self._cache[tick] = self.frame(image)
        return f

    def sample(self, p: Pending) -> Sample:
        stack = [self._cached(t, img) for t, img in p.stack]
        frame = self._cached(p.tick, p.image) if self.shape.frames > 1 else self.frame(p.image)
        if len(self._cache) > self._keep:
            for t in sorted(self._cache)[: len(self._cache) - self._keep]:
                del self._cache[t]
        return Sample(
            collector=self.collector,
            seq=p.seq,
            game_time=p.game_time,
            frame=frame,
            steering=p.label[0],
            throttle_brake=p.label[1],
            speed=p.speed,
            purpose=p.purpose,
            history=p.history,
            stack=stack,
            previous=p.previous,
            source=p.source,
        )
