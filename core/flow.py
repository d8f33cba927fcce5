"""Flow control from learning back to collection: the trainer says how much fresh data it can use, and
collectors that pace themselves follow it.

Why: on a 2-core box two collectors at 4x real time took ~95 % of a core while the trainer drew each
balanced sample ~0.5 times; the CPU went to data nobody trained on. Reverb's rate limiter bounds the
sample-to-insert ratio inside the buffer (``trainer.buffer.samples_per_insert`` does that here); this
carries the same idea upstream, so the CPU the unused data cost goes to training instead.

The trainer's side, :class:`Demand`: over the rate window it measures the samples inserted into its buffers
and drawn for batches. Drawn per inserted is the *reuse*; ``trainer.flow_reuse`` is the reuse it aims at.
The demand is the factor the inserts should change by to reach it::

    demand = (draws/s / flow_reuse) / inserts/s        clamped to [DEMAND_MIN, DEMAND_MAX]

Above 1: more data, please (the trainer reuses more than it aims at, or waits); below 1: less. Before the
first batch (buffers filling) it is DEMAND_MAX. It travels in the trainer's heartbeat info (``flow``).

The collector's side, :class:`Pace`: once a second (its console refresh) the newest demand heard moves the
collector's pace scale by ``demand ** gain``, within [``collector.flow_min``, 1] of its configured ``collector.pace`` (the configured
pace is the ceiling: a box was sized for it). Every collector does the same, so their total follows; a small
gain because the trainer's figure is an average over its window, and a big step on a stale figure would
overshoot. With several trainers the hungriest one wins; one not heard from for ``STALE_S`` is forgotten,
and with none left the scale walks back to 1 (the configured pace) at the same gain.
"""

from __future__ import annotations

import collections
import math

DEMAND_MIN = 0.125
DEMAND_MAX = 8.0
STALE_S = 15.0
"""A trainer not heard from for this long is not asking for anything any more."""


class Demand:
    """The trainer's ask: inserts and draws over a window of looks, and the demand they make."""

    def __init__(self, target_reuse: float, window: int = 20):
        self.target_reuse = target_reuse
        self._looks: collections.deque[tuple[float, int, int]] = collections.deque(maxlen=window)
        self.value = DEMAND_MAX
        self.insert_per_s = 0.0
        self.draw_per_s = 0.0

    @property
    def reuse(self) -> float:
        """Draws per inserted sample over the window (0 with no inserts)."""
        return self.draw_per_s / self.insert_per_s if self.insert_per_s > 0 else 0.0

    def look(self, now: float, inserted: int, drawn: int, *, trained: bool, data_wait: float = 0.0) -> float:
        """One look at the cumulative totals (summed over buffers) and the share of the window the trainer
        waited for data; returns the demand. Waiting half the time, it could use twice the data: the demand
        is at least 1 / (1 - data_wait)."""
        self._looks.append((now, inserted, drawn))
        t0, i0, d0 = self._looks[0]
        dt = now - t0
        if dt > 0:
            self.insert_per_s = (inserted - i0) / dt
            self.draw_per_s = (drawn - d0) / dt
        if not trained or self.target_reuse <= 0 or dt <= 0:
            self.value = DEMAND_MAX
        elif self.insert_per_s <= 0:
            self.value = DEMAND_MAX if self.draw_per_s > 0 or len(self._looks) > 1 else 1.0
        else:
            want = self.draw_per_s / self.target_reuse / self.insert_per_s
            starved = 1.0 / max(1e-3, 1.0 - min(1.0, max(0.0, data_wait)))
            self.value = min(DEMAND_MAX, max(DEMAND_MIN, want, starved if data_wait > 0.02 else 0.0))
        return self.value

    def info(self) -> dict[str, float]:
        """What the console shows and the heartbeat carries (``demand``); no demand when asking for none."""
        if self.target_reuse <= 0:
            return {"insert_per_s": round(self.insert_per_s, 2), "draw_per_s": round(self.draw_per_s, 2)}
        return {
            "demand": round(self.value, 4),
            "reuse": round(self.reuse, 3),
            "target_reuse": self.target_reuse,
            "insert_per_s": round(self.insert_per_s, 2),
            "draw_per_s": round(self.draw_per_s, 2),
        }


class Pace:
    """A collector's pace scale in [floor, 1], moved by each demand it hears."""

    def __init__(self, floor: float, gain: float = 0.15):
        if not 0 < floor <= 1:
            raise ValueError(f"the pace floor must be in (0, 1], got {floor}")
        self.floor = floor
        self.gain = gain
        self.scale = 1.0
        self._heard: dict[str, tuple[float, float]] = {}
        """trainer instance -> (demand, monotonic time heard)"""
        self.updates = 0

    def hear(self, trainer: str, demand: object, now: float) -> bool:
        """A trainer's demand from its heartbeat; False (ignored) when it is not a finite positive number."""
        if not isinstance(demand, int | float) or isinstance(demand, bool) or not math.isfinite(demand):
            return False
        if demand <= 0:
            return False
        self._heard[trainer] = (min(DEMAND_MAX, max(DEMAND_MIN, float(demand))), now)
        return True

    def demand(self, now: float) -> float | None:
        """The hungriest trainer's demand among those heard within STALE_S; None when none."""
        for name, (_, t) in list(self._heard.items()):
            if now - t > STALE_S:
                del self._heard[name]
        return max((d for d, _ in self._heard.values()), default=None)

    def step(self, now: float) -> float:
        """Move the scale once by the current demand (back towards 1 with none) and return it."""
        demand = self.demand(now)
        factor = 1.0 / self.scale if demand is None else demand
        self.scale = min(1.0, max(self.floor, self.scale * factor**self.gain))
        self.updates += 1
        return self.scale

    @property
    def trainers(self) -> int:
        return len(self._heard)
