"""Decoded model outputs -> what the game gets: the car's (steering, throttle_brake) and gamepad values.

A game ignores a stick or trigger inside its dead zone: |x| < dz reads as 0 and dz..1 as 0..1. So a
prediction x != 0 is sent as ``sign(x) * (dz + (1 - dz) * |x|)``, which the game reads back as x; an
exact 0 stays 0 (centred stick, released trigger). Combined throttle/brake (GTA style: positive is
throttle, negative is brake) splits over the two triggers (charles.drive.controls.split); the seed's
3-output lines predict the two triggers directly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from charles.drive.controls import clamp, clean_control, split


@dataclass(frozen=True, slots=True)
class Gamepad:
    """Values for the virtual pad, already dead-zone compensated."""

    steering: float
    """Left stick x in [-1, 1], negative left."""
    throttle: float
    """Right trigger in [0, 1]."""
    brake: float
    """Left trigger in [0, 1]."""

    def as_dict(self) -> dict[str, float]:
        return {"steering": self.steering, "throttle": self.throttle, "brake": self.brake}


BRAKE_PAD = Gamepad(0.0, 0.0, 1.0)


def compensate(x: float, deadzone: float) -> float:
    """One axis: a value the game should see -> the value to send past its dead zone."""
    if not math.isfinite(x) or x == 0.0:
        return 0.0
    mag = min(1.0, abs(x))
    return math.copysign(deadzone + (1.0 - deadzone) * mag, x)


def to_gamepad(controls: Mapping[str, float], deadzones: Mapping[str, float] | None = None) -> Gamepad:
    """Decoded outputs (steering and throttle_brake, or steering, throttle and brake) -> pad values."""
    dz = deadzones or {}
    steering = clean_control(controls.get("steering", 0.0))
    if "throttle_brake" in controls:
        throttle, brake = split(clean_control(controls["throttle_brake"]))
    else:
        throttle = clamp(controls.get("throttle", 0.0), 0.0, 1.0)
        brake = clamp(controls.get("brake", 0.0), 0.0, 1.0)
    return Gamepad(
        compensate(steering, dz.get("steering", 0.0)),
        compensate(throttle, dz.get("throttle", 0.0)),
        compensate(brake, dz.get("brake", 0.0)),
    )
