"""The judge's memory and timing, socket-free: which weights each version has, which one is due, its curve.

:class:`Judge` takes every weights message of the line (:meth:`Judge.offer`: checked, or refused with a
``WeightsError`` reason), keeps the newest weights of each version (a run, ``<line>_v<N>``), says which
version is due for a judging (:meth:`Judge.due`: never judged yet, or ``every_batches`` trained or
``every_minutes`` passed since its last judging, with newer weights than that one) and turns a judging's
figures into the :class:`~charles.proto.Score` that goes on the bus (:meth:`Judge.record`), keeping each
version's curve bounded (:class:`Curve`). The driving itself is the caller's (charles.evaluate).

Threads: the service's feed thread calls ``offer``, its loop ``due`` and ``record``; one lock guards the
versions.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from charles.model.config import ModelConfig
from charles.model.weights import WeightsError, check_state_dict, read_weights
from charles.proto import Score, ScoreFigures, Weights
from charles.proto.wire import MAX_SCORE_POINTS
from charles.sections.judge import JudgeConfig
from charles.thinned import Thinned

FIGURES = ("km", "km_between_unstucks", "on_road_fraction", "collisions_per_km", "mean_speed_kmh", "unstucks")
"""What a score says of each driver (charles.evaluate.pool's names)."""


@dataclass(frozen=True, slots=True)
class Candidate:
    """The newest weights of one version, checked, waiting to be judged."""

    model: str
    run: str
    version: str
    """The weights topic's suffix after the line (``weights.<line>.<version>``), "" without one."""
    batch: int
    created: float
    sha256: str
    payload: bytes
    received: float
    """time.monotonic() when they arrived."""


class Curve(Thinned[tuple[int, float, float, float]]):
    """A version's score points ``(batch, judged, km_between_unstucks, on_road_fraction)``, bounded
    (charles.thinned: a long run stays in view at a fixed size, as the trainer's loss history)."""

    def __init__(self, max_points: int = 200):
        super().__init__(min(max_points, MAX_SCORE_POINTS - 1))

    def add(self, batch: int, judged: float, km_between_unstucks: float, on_road_fraction: float) -> None:  # type: ignore[override]
        super().add((int(batch), float(judged), float(km_between_unstucks), float(on_road_fraction)))


@dataclass
class Version:
    """What the judge knows of one version (run)."""

    run: str
    newest: Candidate | None = None
    judged_batch: int | None = None
    judged_sha: str = ""
    judged_at: float | None = None
    """time.monotonic() of its last judging."""
    score: Score | None = None
    curve: Curve = field(default_factory=Curve)


def figures(pooled: dict[str, Any]) -> ScoreFigures:
    """charles.evaluate.pool's figures as the wire carries them (bounded, non-negative)."""
    return ScoreFigures(
        km=max(0.0, float(pooled["km"])),
        km_between_unstucks=max(0.0, float(pooled["km_between_unstucks"])),
        on_road_fraction=min(1.0, max(0.0, float(pooled["on_road_fraction"]))),
        collisions_per_km=max(0.0, float(pooled["collisions_per_km"])),
        mean_speed_kmh=max(0.0, float(pooled["mean_speed_kmh"])),
        unstucks=int(pooled["unstucks"]),
    )


class Judge:
    """Newest weights per version, when each is due, and its scores (see the module docstring)."""

    def __init__(
        self,
        config: JudgeConfig,
        model_cfg: ModelConfig,
        shape_model: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        """``shape_model``: a network of ``model_cfg`` that arriving weights are checked against (every
        tensor there with its shape), so a file that would fail at judging time is refused on arrival and
        never displaces good weights; None builds one."""
        self.config = config
        self.model_cfg = model_cfg
        self.line = model_cfg.name
        self.topic = f"weights.{self.line}"
        if shape_model is None:
            from charles.model.net import build_model

            shape_model = build_model(model_cfg.replace(pretrained=False))
        self.shape_model = shape_model
        self.clock = clock
        self.versions: dict[str, Version] = {}
        self.forgotten = 0
        """Versions dropped past ``max_versions`` (the one judged longest ago goes)."""
        self.judgings = 0
        self._lock = threading.Lock()

    # -- weights in (the feed thread) --------------------------------------------------------------------

    def ours(self, topic: str) -> bool:
        """``weights.<line>`` or ``weights.<line>.<version>``: a prefix subscription also brings
        ``weights.<line>_memory`` (another line's, not ours to judge, nor a bad message)."""
        return topic == self.topic or topic.startswith(self.topic + ".")

    def offer(self, topic: str, w: Weights, now: float | None = None) -> bool:
        """One weights message of our topic; True when it became its version's newest. Raises WeightsError
        (its reason for the rejects metric) when it is refused: another line's, another network, not
        safetensors of this model, or an older batch of a version than the one held."""
        now = self.clock() if now is None else now
        if w.model != self.line:
            raise WeightsError(
                "wrong_model",
                f"weights of run {w.run!r} on {topic} are for line {w.model!r}; we judge {self.line!r}",
            )
        version = topic[len(self.topic) + 1 :] if topic != self.topic else ""
        with self._lock:
            held = self.versions.get(w.run)
            newest = held.newest if held is not None else None
        if newest is not None and (w.batch, w.sha256) == (newest.batch, newest.sha256):
            return False  # the broker's snapshot and the live message: the same weights twice
        if newest is not None and w.batch < newest.batch:
            raise WeightsError("older_batch", f"we hold batch {newest.batch} of {w.run}, not {w.batch}")
        payload = bytes(w.payload)
        loaded = read_weights(payload, self.model_cfg)  # header, the config inside, every value finite
        check_state_dict(self.shape_model, loaded.state_dict, f"weights of {w.run} batch {w.batch}")
        cand = Candidate(w.model, w.run, version, int(w.batch), float(w.created), w.sha256, payload, now)
        with self._lock:
            v = self.versions.get(w.run)
            if v is None:
                if len(self.versions) >= self.config.max_versions:
                    self._forget_one()
                v = self.versions[w.run] = Version(w.run, curve=Curve(self.config.history))
            v.newest = cand
        return True

    def _forget_one(self) -> None:
        oldest = min(
            self.versions.values(),
            key=lambda v: (
                v.judged_at if v.judged_at is not None else (v.newest.received if v.newest else 0.0)
            ),
        )
        del self.versions[oldest.run]
        self.forgotten += 1

    # -- judging (the loop) ------------------------------------------------------------------------------

    def due(self, now: float | None = None) -> Candidate | None:
        """The weights to judge now, or None: of the versions whose newest weights were not judged yet, one
        never judged, else one that trained ``every_batches`` or waited ``every_minutes`` since its last
        judging; the one judged longest ago first (several versions take turns)."""
        now = self.clock() if now is None else now
        c = self.config
        ready: list[tuple[float, Candidate]] = []
        with self._lock:
            for v in self.versions.values():
                n = v.newest
                if n is None or (n.batch == v.judged_batch and n.sha256 == v.judged_sha):
                    continue
                if v.judged_at is None:
                    ready.append((-float("inf"), n))
                    continue
                by_batches = c.every_batches > 0 and n.batch - (v.judged_batch or 0) >= c.every_batches
                by_time = c.every_minutes > 0 and now - v.judged_at >= c.every_minutes * 60
                if by_batches or by_time:
                    ready.append((v.judged_at, n))
        if not ready:
            return None
        return min(ready, key=lambda r: r[0])[1]

    def record(
        self,
        cand: Candidate,
        pooled: dict[str, Any],
        reference: dict[str, Any] | None,
        wall_s: float,
        judged: float | None = None,
        now: float | None = None,
    ) -> Score:
        """A finished judging of ``cand`` (pooled figures, the NPC's or None): the version's curve grows
        and its Score (with the curve so far) is returned for the bus."""
        judged = time.time() if judged is None else judged
        now = self.clock() if now is None else now
        mine = figures(pooled)
        with self._lock:
            v = self.versions.get(cand.run)
            if v is None:  # forgotten while it drove (many versions): judged all the same
                v = self.versions[cand.run] = Version(cand.run, curve=Curve(self.config.history))
            v.judged_batch, v.judged_sha, v.judged_at = cand.batch, cand.sha256, now
            v.curve.add(cand.batch, judged, mine.km_between_unstucks, mine.on_road_fraction)
            score = Score(
                model=cand.model,
                run=cand.run,
                version=cand.version,
                batch=cand.batch,
                created=max(0.0, cand.created),
                seeds=list(self.config.seeds),
                minutes=float(self.config.minutes),
                figures=mine,
                reference=figures(reference) if reference is not None else None,
                wall_s=max(0.0, float(wall_s)),
                curve=v.curve.snapshot(),
            )
            v.score = score
            self.judgings += 1
        return score

    def scores(self) -> dict[str, Score]:
        """The newest score of each version judged (the console and /state)."""
        with self._lock:
            return {run: v.score for run, v in self.versions.items() if v.score is not None}

    def held(self) -> dict[str, int]:
        """Version -> batch of the newest weights held (judged or not)."""
        with self._lock:
            return {run: v.newest.batch for run, v in self.versions.items() if v.newest is not None}
