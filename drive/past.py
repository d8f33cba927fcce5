"""What a driver remembers of the ticks before now: the history ring and the frame stack.

Both describe the *past*: a tick enters them only after everything about that tick was decided (its
sample built, its action chosen), so nothing ever sees its own tick in them. The rows' actions are the
*executed* ones: what a model sees of its own past when it drives.
"""

from __future__ import annotations

import collections
from typing import Any

import numpy as np

from charles.proto.messages import HISTORY_FIELDS


class History:
    """Rows of HISTORY_FIELDS for the ticks before now, oldest first; zeros before the first tick."""

    def __init__(self, rows: int):
        self.rows = np.zeros((max(0, rows), len(HISTORY_FIELDS)), np.float32)

    def __len__(self) -> int:
        return len(self.rows)

    def copy(self) -> np.ndarray:
        return self.rows.copy()

    def push(self, action: tuple[float, float], speed: float, purpose: tuple[float, float]) -> None:
        """The tick that just ended: its executed action, and the speed and purpose it started with."""
        if len(self.rows):
            self.rows[:-1] = self.rows[1:]
            self.rows[-1] = (action[0], action[1], speed, purpose[0], purpose[1])

    def clear(self) -> None:
        self.rows[:] = 0.0


class FrameStack:
    """The last ``span`` pictures, to stack ``frames - 1`` of them ``stride`` ticks apart."""

    def __init__(self, frames: int, stride: int = 1):
        self.frames = frames
        self.stride = stride
        self.ring: collections.deque[tuple[int, Any]] = collections.deque(
            maxlen=max(1, (frames - 1) * stride)
        )

    @property
    def full(self) -> bool:
        return self.frames <= 1 or (
            len(self.ring) == self.ring.maxlen and all(img is not None for _, img in self.ring)
        )

    def past(self, now: tuple[int, Any] | None = None) -> list[tuple[int, Any]]:
        """(tick, picture) of the stacked past pictures for the tick about to be pushed, oldest first.

        Before the ring is full the oldest picture it has stands in for older ones (the player must drive
        from its first frame; collectors wait until it is full instead). With an empty ring ``now`` (this
        tick's own (tick, picture)) stands in for all of them; without it the answer is empty.
        """
        if self.frames <= 1:
            return []
        if not self.ring:
            return [now] * (self.frames - 1) if now is not None else []
        out = []
        n = len(self.ring)
        for j in range(self.frames - 1, 0, -1):  # j ticks*stride back, oldest first
            k = max(0, n - j * self.stride)
            out.append(self.ring[k])
        return out

    def push(self, tick: int, image: Any) -> None:
        if self.frames > 1:
            self.ring.append((tick, image))

    def clear(self) -> None:
        self.ring.clear()
