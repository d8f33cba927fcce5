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
                                                       1 within a factor BAND of it

Above 1: more data, please (the trainer reuses more than it aims at, or waits); below 1: less. Before the
first batch (buffers filling) it is DEMAND_MAX. It travels in the trainer's heartbeat info (``flow``).

The collector's side, :class:`Pace`: every ``SETTLE_S`` the newest demand heard moves the collector's pace
scale by ``demand ** gain``, within [``collector.flow_min``, 1] of its configured ``collector.pace`` (the
configured pace is the ceiling: a box was sized for it). Every collector does the same, so their total
follows. The trainer's figure is an average over its rate window (10 s), so a move is made only once the
window has seen the last one whole, and it corrects half the error (gain 0.5): a first version moved a
little every second and swung between 0.25x and 2.4x pace on a loaded box, each move answering a figure
from before the last. With several trainers the hungriest one wins; one not heard from for ``STALE_S`` is
forgotten, and with none left the scale walks back to 1 (the configured pace) at the same gain.
"""

from __future__ import annotations

import collections
import math

DEMAND_MIN = 0.125
DEMAND_MAX = 8.0
BAND = 2.0
"""A reuse within this factor of the target asks for no change (demand 1). The balancer sends sets as they
complete, so a 10 s window of inserts is lumpy: without the band every window moved the pace, and the
collectors swung between a fifth and one and a half of their pace on a loaded box."""
FILL_FIRST = 0.5
"""Until the emptiest buffer is this full, the trainer asks for no less data than it gets: nothing is
evicted yet, and a fuller buffer makes more varied batches."""
STALE_S = 15.0
"""A trainer not heard from for this long is not asking for anything any more."""
SETTLE_S = 10.0
"""Seconds between moves of a collector's pace: the trainer's rate window (RATE_WINDOW looks at its
console_hz, 10 s by default), so each demand acted on was measured after the previous move."""


class Demand:
    """The trainer's ask: inserts and draws over a window of looks, and the demand they make."""

    def __init__(self, target_reuse: float, window: int = 20):
        self.target_reuse = target_reuse
        self._looks: collections.deque[tuple[float, int, int, float]] = collections.deque(maxlen=window)
        self.value = DEMAND_MAX
        self.insert_per_s = 0.0
        self.draw_per_s = 0.0
        self.starved = 0.0
        """Share of the window the trainer waited for data."""

    @property
    def reuse(self) -> float:
        """Draws per inserted sample over the window (0 with no inserts)."""
        return self.draw_per_s / self.insert_per_s if self.insert_per_s > 0 else 0.0

    def look(
        self,
        now: float,
        inserted: int,
        drawn: int,
        *,
        trained: bool,
        starved_s: float = 0.0,
        fill: float = 1.0,
    ) -> float:
        """One look at the cumulative totals (summed over buffers) and the seconds the trainer has waited
        because its buffers could not give a batch (``Buffers.starved_s``); returns the demand.

        Starved half the window, it could use twice the data: the demand is at least 1 / (1 - starved).
        Waiting for the batch assembly (decoding on a busy CPU) is not starving: more data would not help.
        ``fill``: the emptiest buffer's fill; under FILL_FIRST nothing inserted is evicted undrawn, so the
        demand is at least 1 (a first e2e run cut the collectors to a third a minute in, its buffer 20 % full)."""
        self._looks.append((now, inserted, drawn, starved_s))
        t0, i0, d0, s0 = self._looks[0]
        dt = now - t0
        starved = 0.0
        if dt > 0:
            self.insert_per_s = (inserted - i0) / dt
            self.draw_per_s = (drawn - d0) / dt
            starved = min(1.0, max(0.0, (starved_s - s0) / dt))
        self.starved = starved
        if not trained or self.target_reuse <= 0 or dt <= 0:
            self.value = DEMAND_MAX
        elif self.insert_per_s <= 0:
            self.value = DEMAND_MAX if self.draw_per_s > 0 or len(self._looks) > 1 else 1.0
        else:
            want = self.draw_per_s / self.target_reuse / self.insert_per_s
            if 1 / BAND <= want <= BAND:  # near enough: balanced inserts come in lumps, leave the pace be
                want = 1.0
            hungry = 1.0 / max(1e-3, 1.0 - starved) if starved > 0.02 else 0.0
            filling = 1.0 if fill < FILL_FIRST else 0.0
            self.value = min(DEMAND_MAX, max(DEMAND_MIN, want, hungry, filling))
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
            "starved": round(self.starved, 3),
        }


class Pace:
    """A collector's pace scale in [floor, 1], moved by each demand it hears."""

    def __init__(self, floor: float, gain: float = 0.5, settle_s: float = SETTLE_S):
        if not 0 < floor <= 1:
            raise ValueError(f"the pace floor must be in (0, 1], got {floor}")
        self.floor = floor
        self.gain = gain
        self.settle_s = settle_s
        self.scale = 1.0
        self._moved: float | None = None
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

    def step(self, now: float, achieved: float | None = None) -> float:
        """Move the scale by the current demand (back towards 1 with none) if ``settle_s`` have passed
        since the last move; return it.

        ``achieved``: the share of the configured pace the collector actually ran at since the last move
        (a busy box runs a collector slower than asked). A move down starts from it, not from the scale:
        otherwise cuts that change nothing (asked 2x, running 1.5x anyway) pile up unseen by the trainer,
        and its answer, when it comes, overshoots."""
        if self._moved is not None and now - self._moved < self.settle_s:
            return self.scale
        demand = self.demand(now)
        factor = 1.0 / self.scale if demand is None else demand
        base = self.scale
        if factor < 1 and achieved is not None and 0 < achieved < base:
            base = achieved
        scale = min(1.0, max(self.floor, base * factor**self.gain))
        if scale != self.scale:
            self.scale, self._moved = scale, now
            self.updates += 1
        return self.scale

    @property
    def trainers(self) -> int:
        return len(self._heard)
