"""A car: kinematic bicycle model with a grip limit, GTA-style combined throttle/brake, no reverse.

Controls: ``steering`` in [-1, 1] (negative is left, like a gamepad's left stick x) and ``throttle_brake``
in [-1, 1] (positive throttle, negative brake). The model is integrated at the sim's fixed 1/30 s step.
Collisions and surfaces are the world's business; :meth:`Car.propose` only says where the car would go.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from charles.drive.controls import wrap_angle
from charles.sim.town import Boxes, oriented_rect

DT = 1.0 / 30.0
"""Fixed step: 30 Hz of game time, the seed's sample rate."""

LENGTH, WIDTH, WHEELBASE = 4.5, 1.9, 2.7
"""A mid-size sedan, m."""
MAX_STEER = 0.65
"""Front wheel lock at standstill (rad, ~37 deg): a ~4.5 m turning radius for junctions."""
STEER_FADE_MS = 20.0
"""Speed (m/s) at which the available lock has halved, like a game's speed-sensitive steering."""
STEER_RATE = 4.0
"""How fast the wheels turn (rad/s): full lock in ~0.15 s, quick like a pad, not instant."""
ACCEL = 5.0
"""Full-throttle acceleration at standstill (m/s^2): 0-100 km/h in ~7 s."""
V_MAX = 50.0
"""Speed where the engine stops pulling (m/s); drag caps the real top speed near 120 km/h."""
BRAKE = 9.0
"""Full-brake deceleration (m/s^2), about 0.9 g."""
DRAG = 0.0025
"""Aerodynamic drag coefficient (1/m): deceleration DRAG * v^2."""
ROLL_ROAD, ROLL_OFFROAD = 0.15, 1.2
"""Rolling resistance (m/s^2) on asphalt and on grass or sand: leaving the road costs speed."""
GRIP_ROAD, GRIP_OFFROAD = 9.0, 5.0
"""Most lateral acceleration (m/s^2) the tyres give; beyond it the car understeers."""
WATER_DRAG = 0.85
"""Speed kept per step in water: a car that drives in stops within a second and stays (sinks)."""


def max_steer(speed: float) -> float:
    """Wheel angle (rad) full steering gives at ``speed``."""
    return MAX_STEER / (1.0 + speed / STEER_FADE_MS)


def engine_accel(throttle_brake: float, speed: float) -> float:
    """Longitudinal acceleration (m/s^2) from the pedals alone (no drag, no rolling resistance)."""
    if throttle_brake >= 0:
        return throttle_brake * ACCEL * max(0.0, 1.0 - speed / V_MAX)
    return throttle_brake * BRAKE if speed > 0 else 0.0


def resistance(speed: float, on_road: bool) -> float:
    """Deceleration (m/s^2, positive) from drag and rolling at ``speed``."""
    return DRAG * speed * speed + (ROLL_ROAD if on_road else ROLL_OFFROAD)


@dataclass
class Car:
    """Pose and motion of one car; the sim owns the rules, this owns the physics."""

    x: float
    y: float
    heading: float
    """Radians, counter-clockwise from +x."""
    color: tuple[int, int, int] = (200, 30, 30)
    speed: float = 0.0
    """m/s, >= 0 (no reverse)."""
    wheel: float = 0.0
    """Front wheel angle (rad), positive turns left."""
    in_water: bool = False

    def propose(
        self, steering: float, throttle_brake: float, on_road: bool, grip_scale: float = 1.0, dt: float = DT
    ) -> tuple[float, float, float, float, float]:
        """(x, y, heading, speed, wheel) after one step, without checking what is in the way."""
        steering = min(1.0, max(-1.0, float(steering)))
        throttle_brake = min(1.0, max(-1.0, float(throttle_brake)))
        v = self.speed
        if self.in_water:  # a car in water only sinks: nothing the driver does matters
            return self.x, self.y, self.heading, v * WATER_DRAG, self.wheel
        target = -steering * max_steer(v)
        step = STEER_RATE * dt
        wheel = self.wheel + min(step, max(-step, target - self.wheel))
        a = engine_accel(throttle_brake, v) - resistance(v, on_road)
        v_new = max(0.0, v + a * dt)
        # Kinematic bicycle about the centre: slip angle beta, yaw rate from the rear half wheelbase.
        lr = WHEELBASE / 2
        beta = math.atan(0.5 * math.tan(wheel))
        yaw = v_new / lr * math.sin(beta)
        grip = (GRIP_ROAD if on_road else GRIP_OFFROAD) * grip_scale
        if v_new > 0.1 and abs(yaw) * v_new > grip:  # beyond the tyres' grip: understeer
            yaw = math.copysign(grip / v_new, yaw)
        heading = self.heading + yaw * dt
        heading = wrap_angle(heading)
        x = self.x + v_new * math.cos(heading + beta) * dt
        y = self.y + v_new * math.sin(heading + beta) * dt
        return x, y, heading, v_new, wheel

    def footprint(
        self, x: float | None = None, y: float | None = None, heading: float | None = None
    ) -> np.ndarray:
        """[14, 2] points on the car's outline (bumpers densely: most crashes are head-on)."""
        x = self.x if x is None else x
        y = self.y if y is None else y
        heading = self.heading if heading is None else heading
        c, s = math.cos(heading), math.sin(heading)
        local = _OUTLINE
        return np.stack(
            [x + c * local[:, 0] - s * local[:, 1], y + s * local[:, 0] + c * local[:, 1]], axis=1
        )

    def boxes(self) -> Boxes:
        """Body and cabin as extruded quads for the cameras."""
        body = oriented_rect(self.x, self.y, self.heading, LENGTH, WIDTH)
        c, s = math.cos(self.heading), math.sin(self.heading)
        cabin = oriented_rect(self.x - 0.3 * c, self.y - 0.3 * s, self.heading, 2.4, 1.7)
        color = np.asarray(self.color, np.float32)
        return Boxes(
            np.stack([body, cabin]),
            np.array([0.25, 1.05], np.float32),
            np.array([1.05, 1.5], np.float32),
            np.stack([color, np.array((40, 46, 54), np.float32)]),
            np.array([0.0, 0.05], np.float32),
        )


def _outline() -> np.ndarray:
    hl, hw = LENGTH / 2, WIDTH / 2
    front = [(hl, w) for w in np.linspace(-hw, hw, 5)]
    rear = [(-hl, w) for w in np.linspace(-hw, hw, 3)]
    sides = [(a, s * hw) for a in (-hl / 2, 0.0, hl / 2) for s in (-1, 1)]
    return np.array(front + rear + sides, np.float64)


_OUTLINE = _outline()
