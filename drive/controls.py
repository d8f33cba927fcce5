"""Controls and the wire's ranges: the one throttle/brake split, the one angle wrap, the one purpose.

A car takes (steering, throttle_brake): steering in [-1, 1], negative left; throttle_brake in [-1, 1],
positive is throttle, negative is brake (GTA's combined pedal). A pad has two triggers instead, and some
model lines predict throttle and brake separately: :func:`combine` and :func:`split` go between the two.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any


def wrap_angle(a: Any) -> Any:
    """An angle in [-pi, pi) (radians); a float or a numpy array of them."""
    return (a + math.pi) % (2 * math.pi) - math.pi


def purpose(position: Sequence[float], heading: float, target: Sequence[float]) -> tuple[float, float]:
    """A sample's ``purpose`` from where the car is: the direction to ``target`` relative to ``heading``
    (radians in [-pi, pi), positive left) and the distance to it (m); positions are (x, y, ...) in m."""
    dx, dy = target[0] - position[0], target[1] - position[1]
    return wrap_angle(math.atan2(dy, dx) - heading), math.hypot(dx, dy)


def clamp(v: float, lo: float, hi: float) -> float:
    """``v`` within [lo, hi]; NaN and infinities count as 0 (a broken value must not floor a pedal)."""
    v = float(v)
    if not math.isfinite(v):
        return 0.0
    return min(hi, max(lo, v))


def clean_control(v: float) -> float:
    """A control value in [-1, 1] (the wire's range); NaN and infinities count as 0."""
    return clamp(v, -1.0, 1.0)


def clean_speed(v: float) -> float:
    """Speed in the wire's range, m/s [0, 200]."""
    return min(200.0, max(0.0, float(v)))


def clean_purpose(p: tuple[float, float]) -> tuple[float, float]:
    """Purpose in the wire's ranges: angle wrapped to [-pi, pi), distance in [0, 1e7] m."""
    return wrap_angle(float(p[0])), min(1e7, max(0.0, float(p[1])))


def combine(throttle: float, brake: float) -> float:
    """Two triggers -> the combined pedal, in [-1, 1]."""
    return clean_control(float(throttle) - float(brake))


def split(throttle_brake: float) -> tuple[float, float]:
    """The combined pedal -> (throttle, brake), both >= 0 and one of them 0 (like GTA's two triggers)."""
    tb = float(throttle_brake)
    return max(tb, 0.0), max(-tb, 0.0)


def control_pair(controls: Mapping[str, float]) -> tuple[float, float]:
    """Decoded outputs -> (steering, throttle_brake) as the car (and the history) takes them.

    A line with separate throttle and brake outputs combines them as throttle - brake.
    """
    st = controls.get("steering", 0.0)
    if "throttle_brake" in controls:
        tb = clean_control(controls["throttle_brake"])
    else:
        tb = combine(controls.get("throttle", 0.0), controls.get("brake", 0.0))
    return clean_control(st), tb


def signals(steering: float, throttle_brake: float) -> dict[str, float]:
    """Every signal the two controls give, under every output name a model line may have."""
    throttle, brake = split(throttle_brake)
    return {"steering": steering, "throttle_brake": throttle_brake, "throttle": throttle, "brake": brake}
