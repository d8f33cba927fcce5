"""Purpose: where the driver is asked to go, and the marker that shows it on the hood camera.

The sim and the GTA capture agent both give the model a *purpose* (direction and distance to a target,
:func:`charles.drive.controls.purpose`) and draw the same compass arrow on the hood frame, so a model
trained on one reads the other's marker. Both pick a new target once the car is within ``reach_m`` of
the current one; the sim picks street points of its town, a game source picks from :class:`Targets`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import cv2
import numpy as np


def draw_purpose_arrow(img: np.ndarray, angle: float, distance_m: float) -> None:
    """A compass arrow at the top centre pointing at the purpose target (angle: radians, positive left)."""
    h, w = img.shape[:2]
    cx, cy, r = w / 2, 0.09 * h, 0.06 * h
    # Image up is straight ahead; positive (left) angles rotate the arrow counter-clockwise on screen.
    ca, sa = math.cos(angle), math.sin(angle)
    shape = [(0.0, 1.0), (0.55, -0.6), (0.0, -0.25), (-0.55, -0.6)]
    pts = [(cx + r * (-sa * fy + ca * fx), cy - r * (ca * fy + sa * fx)) for fx, fy in shape]
    near = float(np.clip(1.0 - distance_m / 400.0, 0.55, 1.0))  # closer target, brighter arrow
    color = (255 * near, 60 * near, 220 * near)
    arr = np.round(np.array(pts) * 16).astype(np.int32)
    cv2.fillPoly(img, [arr], color, cv2.LINE_8, 4)


class Targets:
    """Purpose targets for a game whose road graph we cannot read: waypoints in order, or random points.

    ``waypoints`` are visited in order and start over after the last; without them a target is a random
    point of ``box`` (x_min, x_max, y_min, y_max) at least ``min_m`` from the car (like the sim's, minus the
    snap to a street: the protocol does not expose GTA's road nodes, and a direction needs no road).
    ``update`` picks the next target once the car is within ``reach_m`` (the sim's rule).
    """

    def __init__(
        self,
        waypoints: Sequence[Sequence[float]] = (),
        box: tuple[float, float, float, float] = (-2500.0, 2500.0, -2000.0, 6000.0),
        reach_m: float = 15.0,
        min_m: float = 150.0,
        seed: int = 0,
    ):
        self.waypoints = [(float(p[0]), float(p[1])) for p in waypoints]
        self.box = box
        self.reach_m = reach_m
        self.min_m = min_m
        self.rng = random.Random(seed)
        self.target: tuple[float, float] | None = None
        self.target_id = 0
        """Count of targets picked (1 for the first)."""
        self.reached = 0
        self._next = 0

    def _pick(self, pos: Sequence[float]) -> tuple[float, float]:
        if self.waypoints:
            p = self.waypoints[self._next % len(self.waypoints)]
            self._next += 1
            return p
        x0, x1, y0, y1 = self.box
        for _ in range(30):
            p = (self.rng.uniform(x0, x1), self.rng.uniform(y0, y1))
            if math.hypot(p[0] - pos[0], p[1] - pos[1]) >= self.min_m:
                break
        return p

    def update(self, pos: Sequence[float]) -> bool:
        """Follow the car at ``pos`` (x, y, ...); True when it reached its target (a new one is picked)."""
        if self.target is None:
            self.target = self._pick(pos)
            self.target_id += 1
            return False
        if math.hypot(self.target[0] - pos[0], self.target[1] - pos[1]) >= self.reach_m:
            return False
        self.reached += 1
        self.target = self._pick(pos)
        self.target_id += 1
        return True
