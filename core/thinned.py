"""A curve of a whole run at a fixed size: the trainer's loss plot, the judge's driving-score curve.

Past ``max_points`` every other point kept is dropped and later points are kept half as often, so the
curve always spans the run from its first point, at most ``max_points`` (+ the newest) long, however long
the run. Imports nothing of charles: services share it.
"""

from __future__ import annotations

from typing import Generic, TypeVar

P = TypeVar("P")


class Thinned(Generic[P]):
    """Points of a run, thinned by halves past ``max_points``; :meth:`snapshot` always ends at the newest."""

    def __init__(self, max_points: int = 500):
        self.max_points = max(4, max_points)
        self.points: list[P] = []
        self.stride = 1
        self._n = 0
        self._last: P | None = None

    def add(self, point: P) -> None:
        self._last = point
        if self._n % self.stride == 0:
            self.points.append(point)
            if len(self.points) > self.max_points:
                self.points = self.points[::2]
                self.stride *= 2
        self._n += 1

    def snapshot(self) -> list[P]:
        """The kept points plus the newest one (a plot always ends at the current batch)."""
        pts = list(self.points)
        if self._last is not None and (not pts or pts[-1] is not self._last):
            pts.append(self._last)
        return pts
