"""The player process: newest weights in, a car driven at frame rate, what it sees and thinks out.

The loop (:meth:`PlayerService.step`, one frame each) is::

    # sim: 30 Hz paced (or as fast as it goes) <- the sim's hood camera; remote: 30 Hz <- game.<source>
    #   -> action.<target> (remote), sample.<id> (dagger), console.<id> (<= console_hz),
    #      camera.<id> (<= camera_hz)
    view = source.next()              # the picture, speed, purpose, history rows, Unstuck phase
    swapper.maybe_swap(view.driving)  # ready weights take over between frames, by policy
    decider.decide(view, predictor)   # decide.py's table: the brake (Unstuck, no weights yet), the NPC
                                      # (before_weights), or charles.drive's ModelPolicy (fit + codec round
                                      # trip + stack, Predictor.predict, decoding by output type), with
                                      # gamepad values past the dead zones
    source.act(...)                   # and, with dagger, the frame as a sample labelled by the expert (the
                                      # sim's NPC, a remote game's autopilot: GameFrame.expert)

Threads: the loop owns the source, the predictors it drives and the sample publisher; the weights feed
(swap.py) owns the weights socket and loads into the spare predictor; the console painter and the camera
stream (console.py) own the console and camera sockets (the loop renders the chase camera, ~1 ms, once
per picture they need, after the action is out); the heartbeat thread reads ``svc.info`` (a new dict
each refresh).
"""

from __future__ import annotations

import collections
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import prometheus_client as prom
import torch

from charles.drive.policy import ModelPolicy
from charles.drive.samples import Encoder, Pending
from charles.drive.shape import InputShape
from charles.model.config import ModelConfig
from charles.model.predictor import Predictor
from charles.player.console import CameraStream, ConsolePainter
from charles.player.decide import Decider
from charles.player.gamepad import BRAKE_PAD, Gamepad
from charles.player.sources import RemoteSource, SimSource, View
from charles.player.swap import Swapper, WeightsFeed, local_weights
from charles.proto.versions import Follow
from charles.runtime import Publisher, RateLimitedLog, Service
from charles.sections.player import PlayerConfig

REFRESH_S = 1.0
"""Rates, gauges and heartbeat info (the launcher's console redraws once a second)."""
WAIT_S = 0.1
"""Longest wait for a frame: SIGTERM only sets a flag, so the loop must look at it this often."""
LATENCY_BUCKETS = (0.001, 0.002, 0.004, 0.006, 0.008, 0.01, 0.015, 0.02, 0.033, 0.05, 0.1, 0.25, 1.0)
RECENT = 4096
"""Ticks remembered for tests and the console (bounded)."""


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


class PlayerMetrics:
    """The player's own families (charles.topology.METRICS lists exactly these)."""

    def __init__(self, registry: prom.CollectorRegistry):
        r = registry
        self.predictions = prom.Counter(
            "charles_player_predictions_total", "Predictions made (frames the model drove)", registry=r
        )
        self.fps = prom.Gauge("charles_player_fps", "Hood camera frames in per second", registry=r)
        self.pps = prom.Gauge("charles_player_pps", "Predictions out per second", registry=r)
        self.batch = prom.Gauge(
            "charles_player_weights_batch",
            "Trainer batch of the weights being driven (-1: none yet)",
            registry=r,
        )
        self.lag = prom.Gauge(
            "charles_player_policy_lag_batches",
            "Batches the driven weights trail the newest loaded",
            registry=r,
        )
        self.swaps = prom.Counter(
            "charles_player_swaps_total", "Weight swaps (after the first weights)", registry=r
        )
        self.unstucks = prom.Counter("charles_player_unstucks_total", "Unstuck manoeuvres", registry=r)
        self.latency = prom.Histogram(
            "charles_player_latency_seconds",
            "Frame ready to action decided",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch.set(-1)


@dataclass(frozen=True, slots=True)
class TickRecord:
    """One frame of the drive (tests and the console read the recent ones)."""

    seq: int
    batch: int
    """Batch of the weights that predicted it; -1 when nothing predicted (brake, NPC)."""
    predicted: bool
    action: tuple[float, float]
    """What the car got: (steering, throttle_brake)."""
    wall: float
    """time.perf_counter() at the end of the frame."""


class PlayerService:
    """Drive one game with the newest weights. ``source`` may be injected (tests); else from the config."""

    def __init__(
        self,
        svc: Service,
        model_cfg: ModelConfig | None = None,
        *,
        source: SimSource | RemoteSource | None = None,
        sample_pub: Publisher | None = None,
    ):
        self.svc = svc
        run = svc.cfg
        config: PlayerConfig = run.player
        self.config = config
        model_cfg = model_cfg or run.model.resolve()
        self.cfg = (
            model_cfg.replace(convcam_layer=config.convcam_layer) if config.convcam_layer else model_cfg
        )
        if config.threads:
            torch.set_num_threads(config.threads)
        self.device = resolve_device(config.device)
        convcam = config.convcam and bool(self.cfg.backbone)

        def make() -> Predictor:
            p = Predictor(self.cfg, self.device, compile=config.compile, convcam=convcam)
            p.warmup(1)  # first-call costs (allocations, cuDNN plans) before the car depends on it
            return p

        # which weights: checked before anything is built, so a bad one ends the start with what was asked
        self.follow = Follow.parse(config.follow, self.cfg.name)
        local = local_weights(self.follow.path, self.cfg) if self.follow.mode == "file" else None
        pinned = self.follow.mode in ("version", "batch")
        self._waiting = "waiting for weights" + (
            f" of {self.follow.describe(self.cfg.name)}" if pinned else ""
        )
        self.swapper = Swapper(make, config.swap, config.swap_every_s, config.swap_max_wait_s)
        self.feed = WeightsFeed(
            svc,
            self.swapper,
            self.cfg,
            trusted=config.weights_from if svc.cfg.bus.secure else None,
            accept_older=config.accept_older,
            follow=self.follow,
        )
        if local is not None:
            self.swapper.load(*local)  # all or nothing (shapes, finite values); the bus is not read
            svc.log.info(f"driving {local[1].run} batch {local[1].batch} from {self.follow.path}")
        # The collectors' codec: the model trained on pictures that went through it, so it drives on them too.
        collector = run.sections.get("collector")
        self.codec = getattr(collector, "codec", "jpeg")
        self.quality = getattr(collector, "quality", 90)
        # A capture agent's frames already went through its codec (as in collect mode): decode only, then.
        remote = source.kind == "remote" if source is not None else config.source == "remote"
        self.policy = ModelPolicy(self.swapper.predictors[0], "raw" if remote else self.codec, self.quality)
        if source is None:
            unstuck = run.sections.get("unstuck")
            if config.source == "remote":
                source = RemoteSource(svc, config, self.cfg, unstuck)
            else:
                expert = config.dagger or config.before_weights == "npc"
                source = SimSource(
                    config,
                    self.cfg,
                    run.sections.get("sim"),
                    unstuck,
                    expert=expert,
                    should_stop=svc.stop_event.is_set,
                )
        self.source = source
        self.source.teleport_hooks.append(self.policy.reset)
        self.deadzones = config.deadzones
        self.metrics = PlayerMetrics(svc.metrics.registry)
        self.painter = (
            ConsolePainter(svc, config.jpeg_quality, config.console_width, terminal=config.terminal)
            if config.console_hz > 0
            else None
        )
        self.cameras = (
            CameraStream(svc, config.camera_quality, config.camera_width) if config.camera_hz > 0 else None
        )
        self.sample_pub = sample_pub or (svc.publisher("sample") if config.dagger else None)
        self.decider = Decider(
            self.policy,
            self.source,
            before_weights=config.before_weights,
            deadzones=config.deadzones,
            dagger=self.sample_pub is not None,
            skip_standstill=config.dagger_skip_standstill,
        )
        self.encoder = Encoder(svc.instance, InputShape.of(self.cfg, 0), self.codec, self.quality)
        self._loop_time = svc.metrics.loop.labels("player")

        self.frames = 0
        self.predictions = 0
        self.dagger_samples = 0
        self.recent: collections.deque[TickRecord] = collections.deque(maxlen=RECENT)
        self.latencies: collections.deque[float] = collections.deque(maxlen=300)
        self.last_raw: dict[str, Any] = {}
        self.last_pad: Gamepad = BRAKE_PAD
        self.fps = self.pps = 0.0
        self._unstucks_seen = 0
        self._swaps_seen = 0
        self._late_seen = 0
        self._unlabelled_seen = 0
        self._warn = RateLimitedLog(svc.log, 60.0)
        self._marks = (time.monotonic(), 0, 0)
        self._next_refresh = 0.0
        self._next_console = 0.0
        self._next_camera = 0.0
        self._status = "waiting for weights"

    # -- the loop ------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM (``svc.stop``)."""
        if self.follow.mode != "file":
            self.feed.start()
        self.svc.ready()
        self.svc.status = "waiting"  # healthy, but no weights yet
        try:
            # 30 Hz (sim: paced, or as fast as it goes) <- sim hood camera | game.<source>
            #   -> action.<target> (remote), sample.<id> (dagger), console.<id> (console_hz),
            #      camera.<id> (camera_hz)
            while self.svc.running:
                self.step()
        finally:
            self.shutdown()

    def step(self) -> View | None:
        """One frame: observe, maybe swap, decide, act, publish. None when no frame came in WAIT_S."""
        view = self.source.next(WAIT_S)
        now = time.monotonic()
        if view is None:
            self._status = f"waiting for frames from {self.source.name}"
            if self.painter is not None and now >= self._next_console:
                self._next_console = now + 1.0 / self.config.console_hz
                self.painter.submit(self.state(), {}, None)
            if now >= self._next_refresh:
                self.refresh(now)
            return None
        t0 = time.perf_counter()
        self.swapper.maybe_swap(view.driving)
        predictor = self.swapper.active
        decision = self.decider.decide(view, predictor)
        self._status = decision.status
        if decision.driver == "model":
            self.metrics.latency.observe(lat := time.perf_counter() - view.arrived)
            self.latencies.append(lat)
            self.predictions += 1
            self.metrics.predictions.inc()
        label = self.decider.demonstration(view, decision)
        if self.decider.unlabelled != self._unlabelled_seen:
            self._unlabelled()
        executed = self.source.act(*decision.action, decision.pad)
        self.frames += 1
        if label is not None:
            self._publish_dagger(view, label, decision.stack)
        raw, pad = decision.raw, decision.pad
        if raw is not None:
            self.last_raw = raw
        self.last_pad = pad if view.driving else BRAKE_PAD
        meta = self.swapper.meta
        self.recent.append(
            TickRecord(
                view.seq,
                meta.batch if raw is not None and meta else -1,
                raw is not None,
                executed,
                time.perf_counter(),
            )
        )
        self._count()
        self._pictures(view, now, predictor)
        if now >= self._next_refresh:
            self.refresh(now)
        self._loop_time.observe(time.perf_counter() - t0)
        return view

    def _pictures(self, view: View, now: float, predictor: Predictor | None) -> None:
        """The camera stream (camera_hz) and the console (console_hz): the chase camera rendered once for both.

        With the stream on, the console leaves the cameras to it and carries state and the Convcam only.
        """
        camera = False
        if self.cameras is not None:
            period = 1.0 / self.config.camera_hz
            # a quarter period of slack: a 30 Hz source's frames, a hair early, still make a 30 Hz stream
            camera = now + period / 4 >= self._next_camera
            if camera:
                self._next_camera = max(self._next_camera + period, now)
        console = self.painter is not None and now >= self._next_console
        if not camera and not console:
            return
        cameras = {"cinematic": self.source.cinematic(), "hood": view.frame}
        if camera:
            assert self.cameras is not None
            # the picture's moment: when the frame came in, on the wall clock the page reads too
            self.cameras.submit(cameras, time.time() - (time.perf_counter() - view.arrived), view.tick)
        if console:
            assert self.painter is not None
            self._next_console = now + 1.0 / self.config.console_hz
            self.painter.submit(self.state(), {} if self.cameras is not None else cameras, predictor)

    def _count(self) -> None:
        u = self.source.unstucks
        if u != self._unstucks_seen:
            self.metrics.unstucks.inc(u - self._unstucks_seen)
            self._unstucks_seen = u
        late = self.source.late
        if late != self._late_seen:
            # paced sim: a frame that started more than half a frame late is a stutter people see
            self.svc.metrics.drops.labels(cause="late_frame").inc(late - self._late_seen)
            self._late_seen = late
        s = self.swapper.swaps
        if s != self._swaps_seen:
            self.metrics.swaps.inc(s - self._swaps_seen)
            self._swaps_seen = s
            m = self.swapper.meta
            self.svc.log.info(f"swapped in {m.run} batch {m.batch} ({self.config.swap})")
        meta = self.swapper.meta
        if meta is not None:
            if self.svc.status == "waiting":
                self.svc.status = "ok"
                self.svc.log.info(f"driving with {meta.run} batch {meta.batch}")
            self.metrics.batch.set(meta.batch)
        self.metrics.lag.set(self.swapper.lag)

    def _unlabelled(self) -> None:
        """Frames the model drove that the game gave no expert label for: counted, said once a minute."""
        n = self.decider.unlabelled - self._unlabelled_seen
        self._unlabelled_seen = self.decider.unlabelled
        self.svc.metrics.drops.labels(cause="dagger_unlabelled").inc(n)
        self._warn.warn(
            "dagger_unlabelled",
            f"dagger: {self.source.name} does not say what its autopilot wants (GameFrame.expert: a capture "
            "agent with capture.dagger and a mod with Charles' extension): the model's frames make no "
            "samples; a label of what was driven would only teach the model itself",
        )

    def _publish_dagger(self, view: View, label: tuple[float, float], stack: list[tuple[int, Any]]) -> None:
        """The frame the model just drove, labelled with what the NPC expert would have done (DAgger).

        Made by the collectors' encoder: the picture through their codec, the history rows before it, the
        previous executed action, and (stacked lines) the past pictures, only once the stack is full.
        """
        pending = Pending(
            seq=self.dagger_samples,
            tick=self.policy.tick,  # the tick this frame has in the policy's stack: encoded once
            game_time=view.game_time,
            image=view.wire if view.wire is not None else view.frame,
            label=(float(label[0]), float(label[1])),
            speed=float(view.speed),
            purpose=(float(view.purpose[0]), float(view.purpose[1])),
            history=view.history if len(view.history) else None,
            previous=view.previous,
            source="dagger",
            stack=stack,
        )
        sample = self.encoder.sample(pending)
        assert self.sample_pub is not None
        if self.sample_pub.send(f"sample.{self.svc.instance}", sample):
            self.dagger_samples += 1

    # -- what people see -----------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        """~1 Hz: rates, gauges, heartbeat info."""
        self._next_refresh = now + REFRESH_S
        t, frames, preds = self._marks
        dt = now - t
        if dt > 0:
            self.fps = (self.frames - frames) / dt
            self.pps = (self.predictions - preds) / dt
        self._marks = (now, self.frames, self.predictions)
        self.metrics.fps.set(self.fps)
        self.metrics.pps.set(self.pps)
        meta = self.swapper.meta
        info: dict[str, Any] = {
            "model_batch": meta.batch
            if meta is not None
            else -1,  # -1 before the first weights, as the gauge
            "fps": round(self.fps, 1),
            "pps": round(self.pps, 1),
            "swaps": self.swapper.swaps,
            "unstucks": self.source.unstucks,
            "status": self._status,
            "frames": self.frames,
        }
        if meta is not None:
            info["model"] = meta.run
        if self.config.dagger:
            info["dagger_samples"] = self.dagger_samples
            info["dagger_skipped"] = self.decider.skipped
            info["dagger_unlabelled"] = self.decider.unlabelled
        self.svc.info = info  # a new dict, never mutated: the heartbeat thread reads it

    def state(self) -> dict[str, Any]:
        """The Player Console (services/viewer/README.md names the keys)."""
        meta = self.swapper.meta
        lat = np.fromiter(self.latencies, float) * 1000 if self.latencies else None
        state: dict[str, Any] = {
            "status": self._status,
            "source": self.source.name,
            "model": meta.run if meta is not None else self._waiting,
            "model_line": self.cfg.name,
            "follow": self.follow.describe(self.cfg.name),
            "raw": {
                k: (float(v[0]) if v.size == 1 else [float(x) for x in v]) for k, v in self.last_raw.items()
            },
            "controls": self.last_pad.as_dict(),
            "fps": round(self.fps, 1),
            "pps": round(self.pps, 1),
            "swaps": self.swapper.swaps,
            "unstucks": self.source.unstucks,
            "policy_lag": self.swapper.lag,
            "policy_lag_unit": "batches",
            "swap_policy": self.config.swap,
            "frames": self.frames,
            "predictions": self.predictions,
            "late_frames": self.source.late,
        }
        if meta is not None:
            state["model_created"] = meta.created
            state["model_batch"] = meta.batch
            state["model_version"] = meta.version
        pending = self.swapper.pending
        if pending is not None:
            state["pending_batch"] = pending.batch
        if lat is not None:
            state["latency_ms"] = {
                "p50": round(float(np.percentile(lat, 50)), 2),
                "p99": round(float(np.percentile(lat, 99)), 2),
            }
        if self.feed.last_error:
            state["weights_error"] = self.feed.last_error
        if self.config.dagger:
            state["dagger_samples"] = self.dagger_samples
            state["dagger_skipped"] = self.decider.skipped
            state["dagger_unlabelled"] = self.decider.unlabelled
        return state

    def shutdown(self) -> None:
        self.feed.close()
        if self.painter is not None:
            self.painter.close()
        if self.cameras is not None:
            self.cameras.close()
        self.source.close()
        self.refresh(time.monotonic())
        self.svc.log.info(
            f"stopped after {self.frames} frames, {self.predictions} predictions, {self.swapper.swaps} swaps"
        )
