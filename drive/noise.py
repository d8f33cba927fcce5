"""Noise injection: now and then the *executed* action is perturbed for a short burst while the label stays
the expert's, so the data shows how to recover from drift (the seed's recovery data).

One schedule for every source: the sim's NPC (``charles.sim.npc``) and the GTA capture agent (which sends
the perturbed action to the mod as an override and labels the frame with the autopilot's own controls).
"""

from __future__ import annotations

from typing import Any


class NoiseBursts:
    """Poisson-started bursts of a constant offset added to (steering, throttle_brake).

    ``rate_hz``: bursts per second of driving (0: off); ``duration_s``: (lo, hi) of a burst's length;
    ``steering`` / ``throttle``: the largest offsets, in [-1, 1] units. ``rng`` is a numpy Generator (its
    draws, in order: start?, length, side, steering size, pedal offset).
    """

    def __init__(
        self,
        rng: Any,
        rate_hz: float,
        duration_s: tuple[float, float],
        steering: float,
        throttle: float,
    ):
        self.rng = rng
        self.rate_hz = rate_hz
        self.duration_s = duration_s
        self.steering = steering
        self.throttle = throttle
        self.left = 0.0
        self.offset = (0.0, 0.0)
        self.noisy = False
        """Whether the last executed action was perturbed."""
        self.bursts = 0

    def reset(self) -> None:
        self.left = 0.0

    def step(self, label: tuple[float, float], dt: float) -> tuple[float, float]:
        """The executed action for this tick of ``dt`` seconds: the label, or the label plus the offset."""
        if self.left <= 0.0 and self.rate_hz > 0 and self.rng.random() < self.rate_hz * dt:
            lo, hi = self.duration_s
            self.left = float(self.rng.uniform(lo, hi))
            sign = self.rng.choice((-1.0, 1.0))
            # At least half the maximum: tiny offsets teach nothing about recovering.
            self.offset = (
                float(sign * self.rng.uniform(0.5, 1.0) * self.steering),
                float(self.rng.uniform(-1.0, 1.0) * self.throttle),
            )
            self.bursts += 1
        self.noisy = self.left > 0.0
        if not self.noisy:
            return label
        self.left -= dt
        return (
            min(1.0, max(-1.0, label[0] + self.offset[0])),
            min(1.0, max(-1.0, label[1] + self.offset[1])),
        )
