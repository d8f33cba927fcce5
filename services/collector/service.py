"""The collector process around the socket-free parts: a source, the SampleBuilder, the Sender.

At start the collector acquires the run configuration from the broker (:func:`acquire_config`): its
``model`` section says what a sample must look like (resolution, stacked frames, history), the
``collector``, ``sim``, ``npc`` and ``unstuck`` sections how to drive. Then one loop:

    # 30 Hz of game time <- source (sim/gym/dataset: as fast as the CPU allows, or the wall clock with
    #                                collector.realtime; game: as GameFrames arrive on game.<source>)
    #                    -> sample.<id> (sender thread)

Threads: the loop owns the source and the builder; the sender thread owns the sample socket and does the
encoding; the heartbeat thread reads ``svc.info`` (replaced, never mutated). On SIGTERM the loop ends, the
sender sends what is queued, and the socket lingers ``collector.linger_s`` for it to leave.
"""

from __future__ import annotations

import queue
import time
from collections.abc import Mapping, Sequence
from typing import Any

import msgspec
import prometheus_client as prom

from charles import config as config_mod
from charles.collector.sender import Sender
from charles.collector.sources import Source
from charles.drive.samples import TICK_HZ, Capture, Encoder, SampleBuilder
from charles.drive.shape import InputShape
from charles.flow import Pace
from charles.proto import Console, Sample
from charles.runtime import Publisher, Service
from charles.sections.collector import CollectorConfig
from charles.sim.town import BuildCancelled

MAX_IDLE_WAIT_S = 0.1
"""Longest wait for a remote game's frame: SIGTERM only sets a flag, so the loop looks at it this often."""
BEHIND_S = 0.5
"""realtime: a loop this far behind its schedule starts a fresh one instead of bursting to catch up."""


# ---------------------------------------------------------------------------------------------- config


def sample_shape(cfg: config_mod.Config) -> InputShape:
    return InputShape.of(cfg.model.resolve(), cfg.collector.history_rows)


def make_source(cfg: config_mod.Config, svc: Service, seed: int) -> Source:
    """The source ``collector.source`` names, shaped by the model section."""
    from charles.collector import sources

    c: CollectorConfig = cfg.collector
    kind, _, arg = c.source.partition(":")
    shape = sample_shape(cfg)
    if kind == "game":
        sub = svc.subscriber([f"game.{arg}"], late_join=False)
        drops = svc.metrics.drops
        return sources.GameSource(
            arg, sub, svc.reject, cfg.unstuck, drop=lambda cause, n: drops.labels(cause=cause).inc(n)
        )
    if kind == "dataset":
        return sources.DatasetSource(arg, c.dataset_loop, svc.reject)
    if kind == "gym":
        return sources.GymSource(arg, c.expert, seed, c.gym_kwargs, c.gym_action, c.gym_action_table)
    return sources.SimSource(
        seed,
        shape.width,
        shape.height,
        cfg.sim,
        cfg.npc,
        cfg.unstuck,
        look=c.look,
        render_idle=shape.frames > 1,
        restart_s=c.restart_s,
        restart_turn_deg=c.restart_turn_deg,
        restart_offset_m=c.restart_offset_m,
        repaint=c.repaint,
        should_stop=svc.stop_event.is_set,
    )


def serve(
    svc: Service,
    local: config_mod.Config,
    overrides: Sequence[str] = (),
    seed: int | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """The whole life of a collector process: configuration from the broker, the source, the loop.

    ``seed`` None derives the replica's sim seed from its id and ``sim.seed``.
    """
    from charles.collector.sources import replica_seed

    cfg = svc.acquire_run_config(local, overrides, environ, role="collector")
    if cfg is None:
        return  # stopped while waiting
    seed = replica_seed(svc.instance, cfg.sim.seed) if seed is None else seed
    svc.log.info(
        f"run configuration from the broker: model {cfg.model.preset}, source {cfg.collector.source}, seed {seed}"
    )
    try:
        source = make_source(cfg, svc, seed)
    except BuildCancelled:
        svc.log.info("stopped while building the town")
        return
    CollectorService(svc, cfg, source).run()


# ---------------------------------------------------------------------------------------------- service


class CollectorService:
    """One collector replica: ``step`` is one tick; ``run`` loops until SIGTERM, then flushes.

    ``pub`` may be injected (tests: a slow bus); by default it is the service's own sample publisher.
    """

    def __init__(self, svc: Service, cfg: config_mod.Config, source: Source, pub: Any = None):
        self.svc = svc
        self.cfg = cfg
        self.config: CollectorConfig = cfg.collector
        self.source = source
        self.shape = sample_shape(cfg)
        self.builder = SampleBuilder(self.shape)
        self.topic = f"sample.{svc.instance}"
        self.pub = pub if pub is not None else svc.publisher("sample")
        self.console_pub = svc.publisher("console")
        self.encoder = Encoder(svc.instance, self.shape, self.config.codec, self.config.quality)

        r = svc.metrics.registry
        self.m_samples = prom.Counter(
            "charles_collector_samples_total", "Samples sent to the bus", registry=r
        )
        self.m_unstucks = prom.Counter("charles_collector_unstucks_total", "Unstuck teleports", registry=r)
        self.m_frame = prom.Histogram(
            "charles_collector_frame_seconds",
            "Capture work per tick (observe, act, step, queue); a 30 Hz game leaves 0.033 s",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.m_jitter = prom.Histogram(
            "charles_collector_jitter_seconds",
            "realtime sim/gym: how late each tick started against its 30 Hz schedule; game: how far each "
            "tick's game-time interval from the one before strays from 1/30 s",
            buckets=(0.0001, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.1),
            registry=r,
        )
        self.m_encode = prom.Histogram(
            "charles_collector_encode_seconds",
            "Sender thread: fitting and encoding one sample's frames",
            buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05),
            registry=r,
        )
        self._drop_queue = svc.metrics.drops.labels(cause="send_queue")
        self.hwm_drops = 0
        self.sender = Sender(
            self.encoder,
            self._publish,
            self.config.send_queue,
            on_drop=self._drop_queue.inc,
            on_sent=self._sent,
        )
        # flow control (charles.flow): a self-paced collector follows the trainers' demand
        self.flow: Pace | None = None
        self.flow_sub = None
        if self.config.flow and self.config.realtime and not source.paced:
            self.flow = Pace(self.config.flow_min, settle_s=self.config.flow_settle_s)
            self.flow_sub = svc.subscriber(["heartbeat.trainer"], late_join=False)
        self._flow_mark = (time.monotonic(), 0)
        """(time, samples sent) at the pace's last move: what the collector achieved since"""
        self.m_flow = prom.Gauge(
            "charles_collector_flow_scale",
            "Flow control: the share of collector.pace this collector runs at (1 without flow control)",
            registry=r,
        )
        self.m_flow.set(1.0)
        self.ticks = 0
        self.replayed = 0
        self.unstucks = 0
        self.metres = 0.0
        self._due: float | None = None
        self._last_game_time: float | None = None
        self._next_refresh = 0.0
        self._last_refresh: tuple[float, int] | None = None
        self.sps = 0.0

    # -- the sender thread's side ----------------------------------------------------------------------------

    def _publish(self, sample: Sample) -> bool:
        ok = self.pub.send(self.topic, sample)  # never blocks; a drop at the high-water mark is counted
        if not ok:
            self.hwm_drops += 1
        return ok

    def _sent(self, sample: Sample, encode_s: float) -> None:
        self.m_samples.inc()
        self.m_encode.observe(encode_s)

    # -- the loop --------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM (``svc.stop``); then send what is queued and close."""
        self.sender.start()
        self.svc.ready()
        self.svc.log.info(
            f"collecting from {self.source.name} as {self.topic}: {self.shape.width}x{self.shape.height}, "
            f"{self.shape.frames} frame(s) every {self.shape.frame_stride}, {self.shape.history_rows} history rows, "
            f"{self.config.codec}"
            + (" q" + str(self.config.quality) if self.config.codec == "jpeg" else "")
            + (
                f", paced at {self.config.pace:g}x real time"
                if self.config.realtime and not self.source.paced
                else ""
            )
        )
        try:
            while self.svc.running:
                self.step()
        finally:
            self.shutdown()

    def step(self) -> Capture | None:
        """One tick: wait for its time (realtime), capture, build, queue."""
        if self.config.realtime and not self.source.paced:
            self._pace()
            if not self.svc.running:
                return None
        t0 = time.perf_counter()
        cap = self.source.next(MAX_IDLE_WAIT_S)
        if isinstance(cap, Sample):  # a recorded sample: built and encoded already, only renumbered
            self._replay(cap)
            return None
        if cap is None and getattr(self.source, "finished", False):
            self.svc.log.info(f"{self.source.name}: the end of the dataset (collector.dataset_loop is off)")
            self.svc.stop()
        if cap is not None:
            self.ticks += 1
            if self.source.paced:
                self._game_jitter(cap.game_time)
            pending = self.builder.push(cap)
            if pending is not None:
                self.sender.offer(pending)  # never blocks: a full queue drops and counts
            self.metres += cap.distance_m
            if cap.unstuck:
                self.unstucks += 1
                self.m_unstucks.inc()
            self.m_frame.observe(time.perf_counter() - t0)
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh(now)
        return cap

    def _replay(self, sample: Sample) -> None:
        """A dataset's sample leaves as this collector's (its id, its seq: the balancer sees one stream
        without gaps, a loop included); frames, labels, history and timing are the recorded ones."""
        self.ticks += 1
        out = msgspec.structs.replace(sample, collector=self.svc.instance, seq=self.replayed)
        # a file has no deadline: wait for room in the send queue rather than drop (bounded all the same)
        while self.svc.running:
            try:
                self.sender.queue.put(out, timeout=MAX_IDLE_WAIT_S)
                break
            except queue.Full:
                continue
        self.replayed += 1
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh(now)

    def _pace(self) -> None:
        """Sleep until this tick's slot on a 30 Hz x ``collector.pace`` wall-clock grid; record how late it starts."""
        now = time.monotonic()
        if self._due is None or now - self._due > BEHIND_S:
            self._due = now
        wait = self._due - now
        if wait > 0:
            self.svc.stop_event.wait(wait)
            now = time.monotonic()
        self.m_jitter.observe(max(0.0, now - self._due))
        scale = self.flow.scale if self.flow is not None else 1.0
        self._due += 1.0 / (TICK_HZ * self.config.pace * scale)

    def _follow_demand(self, now: float) -> None:
        """Hear the trainers' heartbeats since the last refresh, then move the pace once (charles.flow)."""
        for env in self.flow_sub.drain():
            msg = env.msg
            if getattr(msg, "service", None) != "trainer" or "demand" not in msg.info:
                continue
            if not self.flow.hear(msg.instance, msg.info["demand"], now):
                self.svc.reject("bad_demand", f"{msg.instance} asked for {msg.info['demand']!r}")
        sent = self.sender.sent
        t0, n0 = self._flow_mark
        achieved = (sent - n0) / (now - t0) / (TICK_HZ * self.config.pace) if now > t0 else None
        before = self.flow.scale
        self.m_flow.set(self.flow.step(now, achieved))
        if self.flow.scale != before or now - t0 > 4 * self.config.flow_settle_s:
            self._flow_mark = (now, sent)  # what it achieves from here on

    def _game_jitter(self, game_time: float) -> None:
        """A game keeps its own clock: record how far its tick intervals stray from one 30 Hz step (a lost
        or late frame shows here as a long interval)."""
        last, self._last_game_time = self._last_game_time, game_time
        if last is not None and game_time > last:  # an earlier time: the game restarted its clock
            self.m_jitter.observe(abs(game_time - last - 1.0 / TICK_HZ))

    # -- what people see -------------------------------------------------------------------------------------

    @property
    def drops(self) -> int:
        return self.sender.dropped + self.hwm_drops + self.sender.failed

    def state(self) -> dict[str, Any]:
        """Heartbeat info and console state (the launcher shows samples, sps, unstucks, km, drops)."""
        return {
            "samples": self.sender.sent,
            "sps": round(self.sps, 1),
            "unstucks": self.unstucks,
            "km": round(self.metres / 1000.0, 3),
            "drops": self.drops,
            "source": self.source.name,
            "resolution": f"{self.shape.width}x{self.shape.height}",
            "frames": self.shape.frames,
            "queued": self.sender.queue.qsize(),
            **(
                {"pace": round(self.config.pace * self.flow.scale, 3), "flow": round(self.flow.scale, 3)}
                if self.flow is not None
                else {}
            ),
            **{k: v for k, v in self.source.info().items() if k != "unstucks"},
        }

    def refresh(self, now: float) -> dict[str, Any]:
        """~1 Hz: samples/s over the last window, heartbeat info, console."""
        self._next_refresh = now + self.config.console_s
        sent = self.sender.sent
        if self._last_refresh is not None:
            t, n = self._last_refresh
            if now > t:
                self.sps = (sent - n) / (now - t)
        self._last_refresh = (now, sent)
        if self.flow is not None:
            self._follow_demand(now)
        state = self.state()
        self.svc.info = state  # a new dict, never mutated: the heartbeat thread reads it
        self.console_pub.send(f"console.{self.svc.instance}", Console("collector", state))
        return state

    def shutdown(self) -> None:
        """Send what is queued, let it leave (``collector.linger_s``), count what could not."""
        left = self.sender.close(timeout_s=max(1.0, self.config.linger_s))
        if left:
            self.svc.metrics.drops.labels(cause="shutdown").inc(left)
        self.refresh(time.monotonic())
        try:
            self.source.close()
        except Exception:  # noqa: BLE001 - a source that fails to close must not block the shutdown
            self.svc.log.exception(f"closing {self.source.name} failed")
        # Service.close closes every socket with linger 0, which would discard samples still queued here.
        if isinstance(self.pub, Publisher) and not self.sender.alive:
            self.pub.close(self.config.linger_s)
        self.svc.log.info(f"sent {self.sender.sent} samples ({self.drops} dropped, {left} left at shutdown)")
