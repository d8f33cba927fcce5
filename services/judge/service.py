"""The judge process around :class:`~charles.judge.judge.Judge`: ``weights.<line>*`` in, ``score.<run>`` out.

Three threads, each owning what it touches:

- the **feed** (``# irregular <- weights.<line>``, ``weights.<line>.<version>``; the broker's newest at
  start) checks every weights message on arrival (:meth:`Judge.offer`) and counts each refusal in
  ``charles_rejects_total{reason}``: another line's, another network, not safetensors, an older batch;
  a refused message never displaces the weights held;
- the **drive** thread, one judging at a time: the NPC once (the reference line), then each due
  version's newest weights through charles.evaluate.drive_towns, the code ``charles eval`` drives with
  (the player's ModelPolicy on the sim's towns, Unstuck active), on ``judge.seeds`` for ``judge.minutes``
  each;
- the **loop** (2 Hz) starts judgings when :meth:`Judge.due` says so and publishes what they found:
  ``score.<run>`` (a last value: the version's curve so far rides along), ``console.<instance>`` (the
  viewer's second curve on the loss tile), Prometheus gauges (``charles_judge_*``), TensorBoard scalars in
  the trainer's run (``<run dir>/tb/judge``: beside the loss in the same TensorBoard) and the heartbeat.

SIGTERM stops a drive within a game second (charles.sim.evaluate's ``should_stop``); a judging cut short
is not published.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path
from typing import Any

import prometheus_client as prom

from charles.config import Config
from charles.judge.judge import Candidate, Judge
from charles.model.config import ModelConfig
from charles.model.weights import WeightsError
from charles.proto import Console, Envelope, Score, Weights
from charles.runtime import Service, Subscriber

LOOP_S = 0.5
"""The loop's period: console and state refresh, and how soon a due judging starts."""
RECV_MS = 200
"""Longest wait of the feed thread: it looks at the stop flag this often."""
CONSOLE_S = 2.0
"""A console at least this often (the viewer picks a role's instance among those heard in 10 s)."""
RUN_DIR_ENV = "CHARLES_RUN_DIR"
"""Where the trainer's runs live (charles.trainer.runs keeps the layout: <root>/<line>/<run>/tb)."""
DRIVERS = ("model", "npc")


class JudgeMetrics:
    """``charles_judge_*``: the newest score of each version (model and NPC side by side), judgings, time."""

    def __init__(self, registry: prom.CollectorRegistry):
        labels = ["run", "driver"]
        self.kmbu = prom.Gauge(
            "charles_judge_km_between_unstucks",
            "km driven per Unstuck on the judge's towns, pooled (newest judging of each version)",
            labels,
            registry=registry,
        )
        self.on_road = prom.Gauge(
            "charles_judge_on_road_fraction", "Share of driving time on the road", labels, registry=registry
        )
        self.collisions = prom.Gauge(
            "charles_judge_collisions_per_km", "Collisions per km driven", labels, registry=registry
        )
        self.speed = prom.Gauge(
            "charles_judge_mean_speed_kmh", "Mean speed while driving, km/h", labels, registry=registry
        )
        self.batch = prom.Gauge(
            "charles_judge_batch", "Trainer batch of the weights judged last", ["run"], registry=registry
        )
        self.judgings = prom.Counter(
            "charles_judge_judgings_total", "Judgings finished and published", registry=registry
        )
        self.weights = prom.Counter(
            "charles_judge_weights_accepted_total",
            "Weights messages checked and held for judging (refusals: charles_rejects_total)",
            registry=registry,
        )
        self.seconds = prom.Histogram(
            "charles_judge_seconds",
            "Wall time of one judging (all towns)",
            buckets=(1, 2.5, 5, 10, 20, 40, 80, 160, 320, 640),
            registry=registry,
        )

    def show(self, score: Score) -> None:
        for driver, f in (("model", score.figures), ("npc", score.reference)):
            if f is None:
                continue
            self.kmbu.labels(score.run, driver).set(f.km_between_unstucks)
            self.on_road.labels(score.run, driver).set(f.on_road_fraction)
            self.collisions.labels(score.run, driver).set(f.collisions_per_km)
            self.speed.labels(score.run, driver).set(f.mean_speed_kmh)
        self.batch.labels(score.run).set(score.batch)
        self.judgings.inc()
        self.seconds.observe(score.wall_s)

    def forget(self, run: str) -> None:
        for g in (self.kmbu, self.on_road, self.collisions, self.speed):
            for driver in DRIVERS:
                with contextlib.suppress(KeyError):  # a series never set (no NPC reference)
                    g.remove(run, driver)
        with contextlib.suppress(KeyError):
            self.batch.remove(run)


class TensorBoard:
    """The judge's scalars in each trainer run's TensorBoard folder (``tb/judge``), step = batch."""

    def __init__(self, root: Path, line: str, log: Any, max_writers: int = 16):
        self.root, self.line, self.log = root, line, log
        self.max_writers = max_writers
        self.writers: dict[str, Any] = {}
        self.missing: set[str] = set()

    def write(self, score: Score) -> bool:
        """False when the run's folder is not on this machine (a trainer elsewhere): nothing written."""
        w = self._writer(score.run)
        if w is None:
            return False
        add = w.add_scalar
        for driver, f in (("", score.figures), ("npc_", score.reference)):
            if f is None:
                continue
            add(f"judge/{driver}km_between_unstucks", f.km_between_unstucks, score.batch)
            add(f"judge/{driver}on_road_fraction", f.on_road_fraction, score.batch)
            add(f"judge/{driver}collisions_per_km", f.collisions_per_km, score.batch)
            add(f"judge/{driver}mean_speed_kmh", f.mean_speed_kmh, score.batch)
        add("judge/wall_s", score.wall_s, score.batch)
        w.flush()
        return True

    def _writer(self, run: str) -> Any:
        if run in self.writers:
            return self.writers[run]
        folder = self.root / self.line / run
        if not folder.is_dir():
            if run not in self.missing and len(self.missing) < 1024:
                self.missing.add(run)
                self.log.info(f"no run folder {folder} here: the scores of {run} go to the bus only")
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            return None
        if len(self.writers) >= self.max_writers:
            _, old = self.writers.popitem()
            old.close()
        self.writers[run] = SummaryWriter(str(folder / "tb" / "judge"), flush_secs=30)
        return self.writers[run]

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()


class JudgeService:
    """The loop: ``# 2 Hz: judge when due -> score.<run>, console.<instance>`` (see the module docstring).

    ``cfg`` is the run configuration (its ``judge`` section, and the ``sim``, ``npc``, ``unstuck`` and
    collector codec every judging drives with); tests may inject the weights ``sub`` and the ``judge``.
    """

    def __init__(
        self,
        svc: Service,
        cfg: Config,
        model_cfg: ModelConfig,
        sub: Subscriber | None = None,
        judge: Judge | None = None,
    ):
        self.svc = svc
        self.cfg = cfg
        self.config = cfg.judge
        self.judge = judge or Judge(self.config, model_cfg)
        self.sub = sub
        self.metrics = JudgeMetrics(svc.metrics.registry)
        self.score_pub = svc.publisher("score")
        self.console_pub = svc.publisher("console")
        self.tb = TensorBoard(Path(os.environ.get(RUN_DIR_ENV) or "runs"), self.judge.line, svc.log)
        self.reference: dict | None = None
        self.received = 0
        self.status = "waiting for weights"
        self._published: set[str] = set()
        self._job: threading.Thread | None = None
        self._result: tuple[Candidate | None, dict | None, float, BaseException | None] | None = None
        self._judging: Candidate | None = None
        self._next_console = 0.0
        self._ref_started = False
        # vital: without it no weights arrive, and /healthz and the heartbeat say degraded
        self._feed = svc.vital(threading.Thread(target=self._feed_run, name="weights", daemon=True))
        self.subscribed = threading.Event()

    # -- the feed thread ---------------------------------------------------------------------------------

    def _feed_run(self) -> None:
        if self.sub is None:
            # a prefix: weights.<line> and every weights.<line>.<version> (the broker's newest of each)
            self.sub = self.svc.subscriber([self.judge.topic])
        self.subscribed.set()
        while self.svc.running:
            try:
                env = self.sub.recv(RECV_MS)
                if env is not None:
                    self.handle(env)
            except Exception:  # noqa: BLE001 - the feed must outlive any one message
                self.svc.log.exception("weights feed: unexpected error")

    def handle(self, env: Envelope) -> bool:
        """One weights message: True when it became a version's newest."""
        if not isinstance(env.msg, Weights) or not self.judge.ours(env.topic):
            return False  # weights.<line>_memory: another line's topic that shares our prefix
        w: Weights = env.msg
        self.received += 1
        try:
            held = self.judge.offer(env.topic, w)
        except WeightsError as e:
            self.svc.reject(e.reason, f"weights {w.run[:64]} batch {w.batch} on {env.topic} refused: {e}")
            return False
        if held:
            self.metrics.weights.inc()
        return held

    # -- the drive thread --------------------------------------------------------------------------------

    def drive(self, policy: Any) -> dict:
        """charles.evaluate.drive_towns: ``policy`` is ``"npc"`` or a Candidate's weights."""
        from charles.drive.policy import ModelPolicy
        from charles.evaluate import drive_towns

        c = self.config
        if isinstance(policy, Candidate):
            policy = ModelPolicy.from_weights(
                policy.payload,
                expected_cfg=self.judge.model_cfg,
                codec=self.cfg.collector.codec,
                quality=self.cfg.collector.quality,
                device=c.device,
            )
        return drive_towns(
            policy, list(c.seeds), c.minutes, self.cfg, c.device, should_stop=lambda: not self.svc.running
        )

    def _drive_job(self, cand: Candidate | None) -> None:
        out = None
        wall_s = 0.0
        error: BaseException | None = None
        try:
            if self.config.reference and self.reference is None:
                ref = self.drive("npc")
                if self.svc.running and not any(r.get("stopped") for r in ref["per_seed"]):
                    self.reference = ref  # set before the result: the score it goes with carries it
            if cand is not None and self.svc.running:
                t0 = time.perf_counter()
                out = self.drive(cand)
                wall_s = time.perf_counter() - t0
        except BaseException as e:  # noqa: BLE001 - handed to the loop, which logs it and goes on
            error = e
        self._result = (cand, out, wall_s, error)

    # -- the loop ----------------------------------------------------------------------------------------

    def run(self) -> None:
        self._feed.start()
        self.subscribed.wait(10.0)
        self.svc.ready()
        try:
            while self.svc.running:
                self.step()
                self.svc.stop_event.wait(LOOP_S)
        finally:
            self.shutdown()

    def step(self, now: float | None = None) -> Score | None:
        """One turn: collect a finished judging (publish it), start a due one, refresh the console."""
        now = time.monotonic() if now is None else now
        score = self._collect() if self._result is not None else None
        if (self._job is None or not self._job.is_alive()) and self._result is None:
            self._job = None
            cand = self.judge.due(now)
            # the NPC's reference as soon as the judge is idle, not in the first judging's time
            if cand is not None or (
                self.config.reference and self.reference is None and not self._ref_started
            ):
                self._start(cand)
        if score is not None or now >= self._next_console:
            self._publish_console(now)
        return score

    def _start(self, cand: Candidate | None) -> None:
        self._judging = cand
        self._ref_started = True
        self.status = (
            f"judging {cand.run} batch {cand.batch}" if cand is not None else "driving the NPC (reference)"
        )
        self._job = threading.Thread(target=self._drive_job, args=(cand,), name="drive", daemon=True)
        self._job.start()

    def _collect(self) -> Score | None:
        cand, out, wall_s, error = self._result  # type: ignore[misc]
        self._result = None
        self._judging = None
        self.status = "idle" if self.judge.held() else "waiting for weights"
        if error is not None:
            self.svc.log.error(f"judging failed: {type(error).__name__}: {error}")
            self.svc.metrics.drops.labels(cause="judging_failed").inc()
            if self.config.reference and self.reference is None:
                self._ref_started = False  # try the reference again with the next judging
            return None
        if cand is None or out is None or any(r.get("stopped") for r in out["per_seed"]):
            return None  # the reference alone, or a judging cut short by SIGTERM
        score = self.judge.record(cand, out, self.reference, wall_s)
        self.publish(score)
        return score

    def publish(self, score: Score) -> None:
        self.score_pub.send(f"score.{score.run}", score)
        self.metrics.show(score)
        self._published.add(score.run)
        for run in self._published - set(self.judge.versions):  # forgotten past judge.max_versions
            self.metrics.forget(run)
        self._published &= set(self.judge.versions)
        try:
            self.tb.write(score)
        except Exception:  # noqa: BLE001 - a full disk must not stop the judging
            self.svc.log.exception(f"TensorBoard scalars of {score.run} not written")
        f = score.figures
        ref = score.reference
        self.svc.log.info(
            f"{score.run} batch {score.batch}: {f.km_between_unstucks:.3f} km between Unstucks, "
            f"{f.on_road_fraction:.0%} on the road, {f.collisions_per_km:.2f} collisions/km, "
            f"{f.mean_speed_kmh:.1f} km/h"
            + (f" (NPC {ref.km_between_unstucks:.3f} km, {ref.on_road_fraction:.0%})" if ref else "")
            + f" in {score.wall_s:.0f} s"
        )

    def state(self) -> dict[str, Any]:
        """What the console, the heartbeat and /state show."""
        scores = self.judge.scores()
        ref = self.reference
        return {
            "status": self.status,
            "line": self.judge.line,
            "seeds": list(self.config.seeds),
            "minutes": self.config.minutes,
            "judgings": self.judge.judgings,
            "received": self.received,
            "held": self.judge.held(),
            "reference": (
                {
                    k: ref[k]
                    for k in (
                        "km_between_unstucks",
                        "on_road_fraction",
                        "collisions_per_km",
                        "mean_speed_kmh",
                    )
                }
                if ref is not None
                else None
            ),
            "scores": {
                run: {
                    "batch": s.batch,
                    "km_between_unstucks": round(s.figures.km_between_unstucks, 4),
                    "on_road_fraction": round(s.figures.on_road_fraction, 4),
                    "collisions_per_km": round(s.figures.collisions_per_km, 3),
                    "mean_speed_kmh": round(s.figures.mean_speed_kmh, 2),
                }
                for run, s in scores.items()
            },
            # the viewer's loss tile: [[batch, km_between_unstucks, on_road_fraction], ...] per version
            "curves": {run: [[p[0], p[2], p[3]] for p in s.curve] for run, s in scores.items()},
        }

    def _publish_console(self, now: float) -> None:
        self._next_console = now + CONSOLE_S
        state = self.state()
        newest = max(self.judge.scores().values(), key=lambda s: s.batch, default=None)
        self.svc.info = {  # scalars only: the heartbeat and the launcher's console
            "status": self.status,
            "judgings": self.judge.judgings,
            "versions": len(state["held"]),
            **(
                {
                    "run": newest.run,
                    "batch": newest.batch,
                    "km_between_unstucks": round(newest.figures.km_between_unstucks, 4),
                    "on_road_fraction": round(newest.figures.on_road_fraction, 4),
                }
                if newest is not None
                else {}
            ),
        }
        self.console_pub.send(f"console.{self.svc.instance}", Console("judge", state))

    def shutdown(self) -> None:
        if self._job is not None:
            self._job.join(self.cfg.service.shutdown_s / 2)  # stops within a game second of SIGTERM
        self._feed.join(2.0)
        self.tb.close()
