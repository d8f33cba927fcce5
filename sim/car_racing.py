"""An expert for Gymnasium's Box2D car racing env (``CarRacing-v3``, ``pip install "gymnasium[box2d]"``).

Spec: ``charles.sim.car_racing:expert`` (collector.expert, ``charles eval --expert``). Like the sim's
NPC it reads the world, not the picture: the track's centre line and the car's pose and velocity. It
steers at a point ``LOOKAHEAD`` track points ahead (pure pursuit) and holds a speed that drops before
sharp bends, with the brake when it is too fast: its labels use all three of [steer, gas, brake].

Returns CarRacing's own action ([steer, gas, brake], steer positive right) so the env, the collector's
action adapter and a continuous=False env (through collector.gym_action_table, nearest entry) all take it
the way they take any expert's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np

from charles.drive.controls import clean_control, split, wrap_angle

LOOKAHEAD = 5
"""Track points ahead (about 3.5 m each) the car steers at: closer wobbles, further cuts corners."""
STEER_GAIN = 2.0
"""Steering per radian of heading error towards the look-ahead point."""
SPEED_FAST, SPEED_SLOW = 90.0, 40.0
"""Target speed (the env's units per second) on straights and before the sharpest bends."""
BEND_POINTS = 12
"""Track points ahead whose summed turning sets the target speed."""


def expert(env: Any) -> Callable[[Any, dict], np.ndarray]:
    """Expert factory: ``act(obs, info) -> [steer, gas, brake]`` driving ``env``'s car round its track."""
    inner = env.unwrapped
    cache: dict[str, Any] = {"track": None, "points": None, "turn": None}

    def line() -> tuple[np.ndarray, np.ndarray]:
        if cache["track"] is not inner.track:  # a new track each reset
            pts = np.array([(x, y) for _, _, x, y in inner.track], np.float64)
            seg = np.roll(pts, -1, axis=0) - pts
            heading = np.arctan2(seg[:, 1], seg[:, 0])
            turn = np.abs(wrap_angle(np.roll(heading, -1) - heading))
            cache.update(track=inner.track, points=pts, turn=turn)
        return cache["points"], cache["turn"]

    def act(obs: Any, info: dict) -> np.ndarray:
        pts, turn = line()
        hull = inner.car.hull
        pos = np.array([hull.position[0], hull.position[1]])
        i = int(np.argmin(((pts - pos) ** 2).sum(axis=1)))
        target = pts[(i + LOOKAHEAD) % len(pts)]
        heading = hull.angle + math.pi / 2  # Box2D's car faces its local +y
        error = wrap_angle(math.atan2(target[1] - pos[1], target[0] - pos[0]) - heading)
        steer = clean_control(-STEER_GAIN * error)  # CarRacing steers right for positive values
        bend = float(turn[np.arange(i, i + BEND_POINTS) % len(turn)].sum())
        want = SPEED_FAST - (SPEED_FAST - SPEED_SLOW) * min(1.0, bend / (math.pi / 2))
        speed = math.hypot(*hull.linearVelocity)
        pedal = clean_control((want - speed) / 10.0)
        gas, brake = split(pedal)
        return np.array([steer, 0.5 * gas, 0.8 * brake], np.float32)  # full gas spins the wheels

    return act
