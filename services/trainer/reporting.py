"""What the trainer shows and logs, apart from training: Prometheus families, rates, TensorBoard.

Plain classes without sockets or threads, so each is tested on its own; ``TrainerService`` owns one of each
and feeds them from its train loop and its console thread (~console_hz).
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

import prometheus_client as prom

from charles.flow import Demand
from charles.trainer.console import LossHistory

RATE_WINDOW = 20
"""Console refreshes the batches/s and samples/s figures average over (10 s at 2 Hz)."""


class TrainerMetrics:
    """The trainer's Prometheus families (names fixed: the Grafana dashboard and charles.topology use them)."""

    def __init__(self, registry: prom.CollectorRegistry):
        r = registry
        self.batches = prom.Counter(
            "charles_trainer_batches_total", "Batches trained by this process", registry=r
        )
        self.samples = prom.Counter(
            "charles_trainer_samples_trained_total", "Samples trained by this process (all ranks)", registry=r
        )
        self.fill = prom.Gauge(
            "charles_trainer_buffer_fill_ratio",
            "Buffer size / capacity, per balanced output",
            ["output"],
            registry=r,
        )
        self.loss = prom.Gauge(
            "charles_trainer_loss", "Loss of the last batch per output (and total)", ["output"], registry=r
        )
        self.inserted = prom.Counter(
            "charles_trainer_samples_inserted_total",
            "Samples of balanced sets put into the buffers, per balanced output (the data rate learning gets)",
            ["output"],
            registry=r,
        )
        self.drawn = prom.Counter(
            "charles_trainer_samples_drawn_total",
            "Samples drawn from the buffers for batches, per balanced output (with inserted: the reuse ratio)",
            ["output"],
            registry=r,
        )
        self.reused = prom.Counter(
            "charles_trainer_samples_reused_total",
            "Draws of a sample already trained on (buffer.samples_per_insert > 1), per balanced output",
            ["output"],
            registry=r,
        )
        self.wait = prom.Gauge(
            "charles_trainer_data_wait_fraction",
            "Share of recent wall time the step waited for a batch",
            registry=r,
        )
        self.published = prom.Counter(
            "charles_trainer_weights_published_total", "Weights sent to players", registry=r
        )
        self.publish_s = prom.Histogram(
            "charles_trainer_publish_seconds",
            "Time to serialise and send the weights",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batches_per_s = prom.Gauge(
            "charles_trainer_batches_per_second", "Recent training rate", registry=r
        )
        self.samples_per_s = prom.Gauge(
            "charles_trainer_samples_per_second", "Recent samples trained per second", registry=r
        )
        self.batch = prom.Gauge(
            "charles_trainer_batch", "The run's batch counter (continues across restarts)", registry=r
        )
        self.demand = prom.Gauge(
            "charles_trainer_flow_demand",
            "Flow control: the factor by which the trainer asks collectors to change the data they send "
            "(>1 more, <1 less; 0: trainer.flow_reuse 0 asks for nothing; charles.flow)",
            registry=r,
        )
        self.reuse = prom.Gauge(
            "charles_trainer_flow_reuse",
            "Draws per inserted sample over the rate window (flow control aims at trainer.flow_reuse)",
            registry=r,
        )


class Rates:
    """Batches/s, samples/s and the share of time spent waiting for data, over the last ``window`` looks.

    The counters are cumulative (the batch counter, samples trained, the prefetcher's seconds waited);
    a rate is their change over the window's span, so a stall shows within one window.
    """

    def __init__(self, window: int = RATE_WINDOW):
        self._looks: collections.deque[tuple[float, int, int, float]] = collections.deque(maxlen=window)
        self.batches_per_s = 0.0
        self.samples_per_s = 0.0
        self.data_wait = 0.0

    def look(self, now: float, batch: int, samples: int, wait_s: float, trained: bool = True) -> None:
        """One look at the counters; ``trained``: a batch was trained yet (waiting before it is not idling)."""
        self._looks.append((now, batch, samples, wait_s))
        t0, b0, s0, w0 = self._looks[0]
        dt = now - t0
        if dt > 0:
            self.batches_per_s = (batch - b0) / dt
            self.samples_per_s = (samples - s0) / dt
            self.data_wait = min(1.0, (wait_s - w0) / dt) if trained else 0.0


class Deltas:
    """Turns cumulative totals kept elsewhere (buffer reuses, evictions) into increments for counters."""

    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def step(self, key: str, total: int) -> int:
        """How much ``total`` grew since the last call for ``key`` (0 when it did not, or went back)."""
        grew = max(0, total - self.seen.get(key, 0))
        self.seen[key] = total
        return grew


class Report:
    """The numbers the trainer shows, kept current: its Prometheus families, the last losses and the loss
    plot, the rates, and the counters it derives from totals kept elsewhere (buffer reuses, evictions,
    storage overflows as ``charles_drops_total{cause}``).

    The train loop calls ``trained`` after each batch; the console thread calls ``look`` (~console_hz)
    and reads ``summary`` for the console state.
    """

    def __init__(
        self,
        metrics: TrainerMetrics,
        drops: prom.Counter,
        *,
        loss_history: int = 500,
        world: int = 1,
        target_reuse: float = 0.0,
    ):
        self.metrics = metrics
        self._drops_family = drops
        """The runtime's ``charles_drops_total`` (labelled by cause)."""
        self.world = world
        self.history = LossHistory(loss_history)
        self.losses: dict[str, float] = {}
        self.loss_total: float | None = None
        self.rates = Rates()
        self.demand = Demand(target_reuse, RATE_WINDOW)
        self.reused = Deltas()
        self.inserted = Deltas()
        self.drawn = Deltas()
        self.drops = Deltas()

    def trained(self, batch: int, res: Any) -> None:
        """One batch trained (``res``: its ``StepResult``); every rank trained ``res.samples`` too."""
        self.losses, self.loss_total = res.losses, res.loss
        self.history.add(batch, res.loss)
        m = self.metrics
        m.batches.inc()
        m.samples.inc(res.samples * self.world)
        m.batch.set(batch)
        m.loss.labels("total").set(res.loss)
        for name, v in res.losses.items():
            m.loss.labels(name).set(v)

    def look(
        self,
        now: float,
        batch: int,
        samples: int,
        wait_s: float,
        *,
        trained: bool,
        buffers: Mapping[str, Mapping[str, Any]],
        storage_dropped: int | None = None,
        starved_s: float = 0.0,
    ) -> None:
        """Rates and gauges from the counters and ``Buffers.stats()["buffers"]``; ``storage_dropped``: the
        storage's overflow total (None: storage off); ``starved_s``: ``Buffers.stats()["starved_s"]``."""
        rates = self.rates
        rates.look(now, batch, samples, wait_s, trained=trained)
        m = self.metrics
        for name, s in buffers.items():
            m.fill.labels(name).set(s["fill"])
            if grew := self.reused.step(name, s["reused"]):
                m.reused.labels(name).inc(grew)
            if grew := self.inserted.step(name, s["inserted"]):
                m.inserted.labels(name).inc(grew)
            if grew := self.drawn.step(name, s["drawn"]):
                m.drawn.labels(name).inc(grew)
        m.wait.set(rates.data_wait)
        self.demand.look(
            now,
            sum(s["inserted"] for s in buffers.values()),
            sum(s["drawn"] for s in buffers.values()),
            trained=trained,
            starved_s=starved_s,
            fill=min((s["fill"] for s in buffers.values()), default=1.0),
        )
        m.demand.set(self.demand.value if self.demand.target_reuse > 0 else 0.0)
        m.reuse.set(self.demand.reuse)
        m.batches_per_s.set(rates.batches_per_s)
        m.samples_per_s.set(rates.samples_per_s)
        totals = {
            "buffer_evicted": sum(s["evicted"] for s in buffers.values()),
            "buffer_bytes": sum(s.get("evicted_bytes", 0) for s in buffers.values()),
        }
        if storage_dropped is not None:
            totals["storage_queue"] = storage_dropped
        for cause, n in totals.items():
            if grew := self.drops.step(cause, n):
                self._drops_family.labels(cause=cause).inc(grew)

    def summary(self) -> dict[str, Any]:
        """The console state's figures (rounded for the wire)."""
        return {
            "reused": dict(self.reused.seen),
            "samples_per_s": round(self.rates.samples_per_s, 2),
            "batches_per_s": round(self.rates.batches_per_s, 3),
            "data_wait": round(self.rates.data_wait, 3),
            "flow": self.demand.info(),
            "loss": {k: round(v, 6) for k, v in self.losses.items()},
            "loss_total": None if self.loss_total is None else round(self.loss_total, 6),
            "loss_history": self.history.snapshot(),
        }


class ScalarWriter(Protocol):
    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardLog:
    """The run's TensorBoard scalars (rank 0, every ``trainer.log_every`` batches)."""

    def __init__(self, writer: ScalarWriter):
        self.writer = writer

    @classmethod
    def open(cls, path: Path, resumed_batch: int, log: logging.Logger) -> TensorBoardLog | None:
        """A writer in the run's tb/ folder; None (and a warning) when TensorBoard cannot be imported."""
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install must not stop training
            log.warning("tensorboard is not importable; no TensorBoard logs for this run")
            return None
        # purge_step: events a crashed session logged past the checkpoint we resume from are hidden
        purge = resumed_batch + 1 if resumed_batch else None
        return cls(SummaryWriter(str(path), purge_step=purge, flush_secs=30))

    def step(
        self,
        batch: int,
        res: Any,
        *,
        lr: float,
        rates: Rates,
        fills: Mapping[str, float],
        reused: Mapping[str, int],
    ) -> None:
        """One batch's scalars: ``res`` is a ``StepResult`` (loss, per-output losses, metrics, grad norm)."""
        add = self.writer.add_scalar
        add("loss/total", res.loss, batch)
        for name, v in res.losses.items():
            add(f"loss/{name}", v, batch)
        for name, v in (res.metrics or {}).items():
            add(f"metrics/{name}", v, batch)
        add("train/lr", lr, batch)
        add("train/grad_norm", res.grad_norm, batch)
        add("throughput/samples_per_s", rates.samples_per_s, batch)
        add("throughput/batches_per_s", rates.batches_per_s, batch)
        add("data/wait_fraction", rates.data_wait, batch)
        for name, fill in fills.items():
            add(f"buffer/{name}", fill, batch)
        for name, n in reused.items():
            add(f"reused/{name}", n, batch)

    def close(self) -> None:
        self.writer.close()
