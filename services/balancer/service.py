"""The balancer process around :class:`Balancer`: ``sample.*`` in, balanced ``set.*`` out.

The logic is the socket-free :class:`~charles.balancer.balancer.Balancer`; this module only wires it to
the bus and to the operator: it counts per-collector sequence gaps as drops, turns samples the logic
refuses into counted rejects, exports the balancer's counts to Prometheus, keeps the heartbeat's
``info`` current, and hands a histogram picture to the viewer (``console.<instance>`` and
``/histogram.png``). On SIGTERM each group's set is flushed as it stands (one sample per filled bin, as a
timeout would); what that leaves held is counted as ``charles_drops_total{cause="shutdown"}``.
``/histogram.json`` serves the counts behind the picture (``charles balance-plot --from URL`` draws them).

Threads: the loop owns the balancer and every bus socket. A picture takes matplotlib about 0.1 s of CPU
(1-2.5 s when its axes are drawn again, :class:`~charles.balancer.plot.LivePicture`), so a painter
thread draws from a stats snapshot (a copy) and the loop publishes the result.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from collections.abc import Sequence
from typing import Any

import prometheus_client as prom

from charles.balancer.balancer import REJECT_NAN, REJECT_NO_BIN, REJECT_NO_PREVIOUS, Balancer, BalancerStats
from charles.balancer.metrics import BalancerMetrics
from charles.outputs import OutputSpec, outputs_signature
from charles.proto import Console, Envelope, Frame, Sample, SampleSet
from charles.runtime import Publisher, SeqGaps, Service, Subscriber
from charles.sections.balancer import BalancerConfig

REFRESH_S = 1.0
"""Metrics snapshot, heartbeat info and sets/s window (the launcher console redraws once a second)."""
MAX_WAIT_MS = 100
"""Longest receive wait: SIGTERM only sets a flag, so the loop must look at it this often."""
DRAIN = 256
"""Samples taken per loop turn when they queue up (bounds one turn's work, not the stream)."""
FLUSH_LINGER_S = 1.0
"""How long the sets flushed at shutdown may take to leave (Service.close closes with linger 0)."""
SOURCES = ("npc", "human", "dagger")
"""Who drove (Sample.source), counted apart in and out (DAgger's share of training); anything else is "other"."""

_REJECT_DETAIL = {
    REJECT_NO_BIN: "a label falls in no configured bin (balancer.bins leaves a gap)",
    REJECT_NO_PREVIOUS: "a delta output needs the previous action and the sample has none",
    REJECT_NAN: "a label or the previous action is not a finite number",
}


def set_topic(s: SampleSet) -> str:
    """``set.<output>`` for the per-output sets of v2..v4, ``set.all`` for v1's joint sets (registry)."""
    return "set.all" if s.version == 1 else f"set.{s.outputs[0]}"


class Painter:
    """Draws the histogram PNG on its own thread, newest request only (a slow draw never queues up)."""

    def __init__(self, log: logging.Logger, cpu: prom.Counter | None = None):
        self.log = log
        self.cpu = cpu
        """CPU seconds spent drawing, counted when given (charles_balancer_picture_cpu_seconds_total)."""
        self.png: bytes | None = None
        """The newest picture; the HTTP thread reads it (one reference swap, no lock needed)."""
        self.drawn = 0
        self._lock = threading.Lock()
        self._job: tuple[BalancerStats, dict] | None = None
        self._done: tuple[dict, Frame] | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="painter", daemon=True)
        self._thread.start()

    def submit(self, stats: BalancerStats, state: dict) -> None:
        with self._lock:
            self._job = (stats, state)
        self._wake.set()

    def take(self) -> tuple[dict, Frame] | None:
        """The newest finished picture with the state it shows, once (the loop publishes it)."""
        with self._lock:
            done, self._done = self._done, None
        return done

    def _run(self) -> None:
        from charles.balancer.plot import LivePicture  # matplotlib: imported off the loop thread

        picture = LivePicture()  # axes drawn once, bars blitted over them: ~0.1 s a picture, not 1-2.5 s
        while not self._stop.is_set():
            self._wake.wait()
            with self._lock:
                job, self._job = self._job, None
                self._wake.clear()
            if job is None or self._stop.is_set():
                continue
            stats, state = job
            started = time.thread_time()
            try:
                frame = Frame.encode(picture.render(stats), "png")
            except Exception:  # a picture is never worth the service
                self.log.exception("could not draw the balance histogram")
                continue
            finally:
                if self.cpu is not None:
                    self.cpu.inc(time.thread_time() - started)
            self.png = bytes(frame.data)
            self.drawn += 1
            with self._lock:
                self._done = (state, frame)

    def close(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)  # daemon: a draw still running past this dies with the process


class BalancerService:
    """The loop: ``# 30 Hz x collectors <- sample.*  -> set.<output> (per completed set)``.

    ``sub`` and ``pub`` may be injected (tests); by default they are the service's own sockets.
    """

    def __init__(
        self,
        svc: Service,
        config: BalancerConfig,
        sub: Subscriber | None = None,
        pub: Publisher | None = None,
        model_outputs: Sequence[OutputSpec] = (),
    ):
        """``model_outputs``: the model line's (``cfg.model.resolve().outputs``), which classification and
        delta outputs are balanced by (BalancerConfig.output_specs)."""
        self.svc = svc
        self.config = config
        self.balancer = Balancer(config, config.output_specs(model_outputs))
        self.outputs = outputs_signature(self.balancer.specs)
        """What the sets mean, in the heartbeat: a trainer of another line refuses them (and says so)."""
        self.sub = sub or svc.subscriber(["sample."])
        self.pub = pub or svc.publisher("set")
        self.console_pub = svc.publisher("console")
        self.gaps = SeqGaps(drops=svc.metrics.drops)
        self.frame_shape: tuple[int, int, int] | None = None
        self.sets_sent = 0
        self.set_seq: dict[str, int] = {}
        """Next sequence number per set topic (a few: one per output); the trainer counts the gaps."""
        self.sources_in = dict.fromkeys((*SOURCES, "other"), 0)
        """Samples arrived, by who drove."""
        self.sources_out = dict.fromkeys((*SOURCES, "other"), 0)
        """Samples sent in sets, by who drove (a v3/v4 sample counts once per set it is in)."""

        r = svc.metrics.registry
        self.metrics = BalancerMetrics(self.balancer)
        self.metrics.refresh()  # before registering: a scrape must never walk the balancer itself
        r.register(self.metrics)
        self.m_odd_frames = prom.Counter(
            "charles_balancer_odd_frames_total",
            "Samples whose frame shape differs from the first one seen (accepted: the trainer resizes)",
            registry=r,
        )
        self._drops = svc.metrics.drops.labels(cause="seq_gap")
        self._loop_time = svc.metrics.loop.labels("balancer")
        self._rejected_seen = dict(self.balancer.rejected)

        self.painter = None
        if config.picture_s > 0:
            cpu = prom.Counter(
                "charles_balancer_picture_cpu_seconds",
                "CPU seconds the painter thread spent drawing histogram pictures (balancer.picture_s)",
                registry=r,
            )
            self.painter = Painter(svc.log, cpu)
        self.latest: BalancerStats = self.balancer.stats(mark=False)
        """The newest refresh's snapshot (a copy); the HTTP thread reads it (one reference swap, no lock)."""
        svc.http_routes["/histogram.png"] = self._histogram_route
        svc.http_routes["/histogram.json"] = self._histogram_json_route
        self._next_refresh = 0.0
        self._next_picture = 0.0  # the first picture as soon as the loop runs: a restarted viewer wants one

    # -- one sample ----------------------------------------------------------------------------------------

    def handle(self, sample: Sample, now: float) -> list[SampleSet]:
        """Count what the stream says about its health, then balance; returns the sets to publish."""
        self.sources_in[sample.source if sample.source in SOURCES else "other"] += 1
        gap = self.gaps.see(sample.collector, sample.seq)
        if gap:
            self._drops.inc(gap)
        shape = sample.frame.shape
        if self.frame_shape is None:
            self.frame_shape = shape
        elif shape != self.frame_shape:
            self.m_odd_frames.inc()
        accepted = self.balancer.accepted
        sets = self.balancer.add(sample, now)
        if self.balancer.accepted == accepted:
            self._count_reject(sample)
        return sets

    def _count_reject(self, sample: Sample) -> None:
        # The logic refused it (labels it cannot bin): the reason is whichever of its counters moved.
        now_rejected = self.balancer.rejected
        for reason, n in now_rejected.items():
            if n != self._rejected_seen.get(reason, 0):
                why = _REJECT_DETAIL.get(reason, reason)
                self.svc.reject(
                    reason,
                    f"sample {sample.collector}#{sample.seq} (steering {sample.steering:.3f}, "
                    f"throttle_brake {sample.throttle_brake:.3f}, previous {sample.previous}): {why}",
                )
        self._rejected_seen = dict(now_rejected)

    def publish(self, sets: list[SampleSet]) -> None:
        for s in sets:
            topic = set_topic(s)
            # numbered whether or not it leaves: a set lost anywhere on the way is a gap the trainer counts
            s.seq = self.set_seq.get(topic, 0)
            self.set_seq[topic] = s.seq + 1
            if self.pub.send(topic, s):  # never blocks; a drop at the high-water mark is counted
                self.sets_sent += 1
                for x in s.samples:
                    self.sources_out[x.source if x.source in SOURCES else "other"] += 1

    # -- the loop ------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Until SIGTERM (``svc.stop``); then flush what is held and publish it before returning."""
        self.svc.ready()
        try:
            while self.svc.running:
                self.step()
        finally:
            self.shutdown()

    def step(self) -> None:
        envs: list[Envelope] = self.sub.drain(DRAIN)
        if not envs:
            env = self.sub.recv(self._wait_ms(time.monotonic()))
            if env is not None:
                envs = [env]
        t0 = now = time.monotonic()
        for env in envs:
            self.publish(self.handle(env.msg, now))
        if not envs:
            self.publish(self.balancer.poll(now))  # idle: a set that waited too long leaves now
        if now >= self._next_refresh:
            self.refresh(now)
        done = self.painter.take() if self.painter is not None else None
        if done is not None:
            state, frame = done
            console = Console("balancer", state, images={"histogram": frame})
            self.console_pub.send(f"console.{self.svc.instance}", console)
        if envs:
            self._loop_time.observe(time.monotonic() - t0)

    def _wait_ms(self, now: float) -> int:
        wait = min(MAX_WAIT_MS / 1000.0, self._next_refresh - now)
        deadline = self.balancer.next_deadline()
        if deadline is not None:
            wait = min(wait, deadline - now)
        return max(0, math.ceil(wait * 1000))

    def refresh(self, now: float) -> BalancerStats:
        """~1 Hz: metrics snapshot, heartbeat info, and now and then a picture for the viewer."""
        self._next_refresh = now + REFRESH_S
        stats = self.balancer.stats(now)  # marks: sets/s covers the time since the previous refresh
        self.latest = stats
        self.metrics.refresh(stats=stats)
        state = self.state(stats)
        self.svc.info = state  # a new dict, never mutated: the heartbeat thread reads it
        if self.painter is not None and now >= self._next_picture:
            self._next_picture = now + self.config.picture_s
            groups = {
                g.name: {
                    "held": g.held,
                    "filled": g.cells_filled,
                    "required": g.cells_required,
                    "sets": g.sets,
                }
                for g in stats.groups.values()
            }
            self.painter.submit(stats, {**state, "groups": groups})
        return stats

    def state(self, stats: BalancerStats) -> dict[str, Any]:
        """What the heartbeat and the console show (the launcher shows accepted, sets, acceptance, held)."""
        sets = stats.sets
        return {
            "version": stats.version,
            "outputs": self.outputs,
            "arrived": stats.arrived,
            "accepted": stats.accepted,
            "acceptance": round(stats.acceptance_rate, 3),
            "sets": sets["complete"] + sets["flushed"],
            "sets_per_s": round(stats.sets_per_s, 2),
            "samples_per_s": round(stats.samples_per_s, 1),
            "held": sum(g.held for g in stats.groups.values()),
            "capacity": self.balancer.capacity,
            "rejected": sum(stats.rejected.values()),
            "seq_gaps": self.gaps.missing,
            "emit_rate": round(stats.emit_rate, 3),
            "emitted": sum(self.sources_out.values()),
            # flat keys: heartbeats carry scalars only
            **{f"arrived_{k}": n for k, n in self.sources_in.items() if n},
            **{f"emitted_{k}": n for k, n in self.sources_out.items() if n},
        }

    def shutdown(self) -> None:
        """Take in what already arrived, flush every held set, and let those sets leave before closing."""
        now = time.monotonic()
        for env in self.sub.drain(10 * DRAIN):
            self.publish(self.handle(env.msg, now))
        # One flushed set per group, as a timeout would send: balanced among the bins it covers. Samples
        # beyond the first in a bin would only unbalance it; they are counted, never lost silently.
        flushed = self.balancer.flush()
        self.publish(flushed)
        left = self.balancer.held
        if left:
            self.svc.metrics.drops.labels(cause="shutdown").inc(left)
        self.refresh(now)
        if self.painter is not None:
            self.painter.close()
        # Service.close closes every socket with linger 0, which would discard sets still queued here.
        self.pub.sock.close(linger=int(FLUSH_LINGER_S * 1000))
        self.svc.log.info(
            f"flushed {sum(len(s.samples) for s in flushed)} held samples in {len(flushed)} sets"
        )

    def _histogram_route(self) -> tuple[bytes, str]:
        png = self.painter.png if self.painter is not None else None
        if png is None:
            return b"no histogram drawn yet (balancer.picture_s sets how often)\n", "text/plain"
        return png, "image/png"

    def _histogram_json_route(self) -> tuple[bytes, str]:
        # as of the last refresh (REFRESH_S): the loop owns the balancer, this runs on the HTTP thread
        return json.dumps(self.latest.to_dict()).encode(), "application/json"
