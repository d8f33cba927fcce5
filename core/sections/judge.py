"""The judge's configuration section (``judge:`` in the run configuration).

The judge drives the newest weights of each live version on held-out sim towns now and then and
publishes a driving score beside the loss. What it drives with is shared with the rest of the run: the
``sim``, ``npc`` and ``unstuck`` sections (the towns, the reference driver, when a car counts as stuck)
and the collectors' codec (``collector.codec``/``quality``: the pixels the model trained on), as
``charles eval`` uses them.
"""

from __future__ import annotations

from dataclasses import dataclass

from charles.config import knob

DEFAULT_SEEDS = [9001, 9002]
"""Towns no collector drives: the launcher's collectors take seeds 1..K, its player 1000, compose's
collectors a CRC of their host name; bench/e2e.py evaluates on 9001-9003 at the end, so the judge's curve
ends where that evaluation begins."""


@dataclass
class JudgeConfig:
    """The live driving score: when to judge, on which towns, for how long, and how gently."""

    every_batches: int = knob(
        200,
        "Judge a version again once it has trained this many batches since its last judging (0: off)",
        min=0,
    )
    every_minutes: float = knob(
        5.0,
        "...or once this many minutes have passed since its last judging and it has newer weights (0: off)",
        min=0.0,
    )
    seeds: list = knob(
        list(DEFAULT_SEEDS), "Held-out towns (sim seeds) every judging drives, the same each time"
    )
    minutes: float = knob(
        1.0, "Game minutes driven in each town per judging (30 Hz, Unstuck active)", min=0.01, max=600.0
    )
    reference: bool = knob(
        True, "Also drive the NPC (noise off) on the same towns once, the reference line of every score"
    )
    nice: int = knob(
        10,
        "os.nice increment at start: on a shared CPU box the trainer keeps its cores (0: none). The judge "
        "also runs torch on threads (below)",
        min=0,
        max=19,
    )
    threads: int = knob(1, "torch threads for the model's forward passes (a small budget)", min=1, max=64)
    device: str = knob("cpu", "torch device the judged weights run on (cpu, cuda)")
    history: int = knob(
        200, "Points kept per version's curve (thinned by half past it, so a long run stays in view)", min=4
    )
    max_versions: int = knob(
        16, "Versions followed at once; past it the one judged longest ago is forgotten (counted)", min=1
    )

    def __post_init__(self) -> None:
        if not self.seeds or not all(isinstance(s, int) and 0 <= s < 2**31 for s in self.seeds):
            raise ValueError(f"judge.seeds must be a non-empty list of sim seeds (ints), got {self.seeds!r}")
        if len(self.seeds) > 64:
            raise ValueError(f"judge.seeds: at most 64 towns, got {len(self.seeds)}")
        if self.every_batches == 0 and self.every_minutes == 0:
            raise ValueError(
                "judge.every_batches and judge.every_minutes are both 0: the judge would never judge"
            )
