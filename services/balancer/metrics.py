"""The balancer's counts as Prometheus metrics (Grafana draws the same histograms the PNG shows).

The service registers one :class:`BalancerMetrics` and calls :meth:`BalancerMetrics.refresh` from its
own loop (about once a second): the snapshot is taken on the thread that owns the balancer, and a scrape
on the HTTP thread only reads the last snapshot, so no lock is needed on the hot path.

Rates (sets/s, samples/s) are left to PromQL: ``rate(charles_balancer_sets_total[1m])``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from charles.balancer.balancer import Balancer, BalancerStats

PREFIX = "charles_balancer"


class BalancerMetrics(Collector):
    """A custom collector over a :class:`Balancer`: counters stay monotonic, gauges show the moment."""

    def __init__(self, balancer: Balancer, clock: Callable[[], float] = time.monotonic, prefix: str = PREFIX):
        self.balancer = balancer
        self.clock = clock
        self.prefix = prefix
        self._snapshot: BalancerStats | None = None

    def refresh(self, now: float | None = None, stats: BalancerStats | None = None) -> BalancerStats:
        """Take a snapshot on the balancer's own thread (the service loop, ~1 Hz).

        ``stats`` hands over one the loop has just taken (with ``mark`` set, for its sets/s), so the
        balancer is not walked twice.
        """
        if stats is None:
            stats = self.balancer.stats(self.clock() if now is None else now, mark=False)
        self._snapshot = stats
        return stats

    def describe(self) -> Iterator[Metric]:
        # Families without samples: registering must not snapshot a balancer another thread is using.
        return iter(())

    def collect(self) -> Iterator[Metric]:
        s = self._snapshot or self.refresh()
        p = self.prefix

        arrived = CounterMetricFamily(f"{p}_samples_arrived", "Samples that reached the balancer.")
        arrived.add_metric([], s.arrived)
        accepted = CounterMetricFamily(f"{p}_samples_accepted", "Samples some group took into its bins.")
        accepted.add_metric([], s.accepted)
        rejected = CounterMetricFamily(
            f"{p}_samples_rejected", "Samples no group took, by reason.", labels=["reason"]
        )
        for reason, n in s.rejected.items():
            rejected.add_metric([reason], n)
        label_errors = CounterMetricFamily(
            f"{p}_label_errors",
            "Labels that could not be binned, by output and reason.",
            labels=["output", "reason"],
        )
        for (output, reason), n in s.label_errors.items():
            label_errors.add_metric([output, reason], n)
        ratio = GaugeMetricFamily(f"{p}_acceptance_ratio", "Accepted / arrived since start.")
        ratio.add_metric([], s.acceptance_rate)
        emit_ratio = GaugeMetricFamily(
            f"{p}_emit_ratio", "Emitted / arrived per group since start: how much of the stream trains."
        )
        emit_ratio.add_metric([], s.emit_rate)
        yield from (arrived, accepted, rejected, label_errors, ratio, emit_ratio)

        evicted = CounterMetricFamily(
            f"{p}_samples_evicted", "Held samples that left unused, by reason.", labels=["group", "reason"]
        )
        sets = CounterMetricFamily(
            f"{p}_sets",
            "Sets by how they ended: complete, flushed (timeout) or dropped (timeout).",
            labels=["group", "outcome"],
        )
        emitted = CounterMetricFamily(f"{p}_samples_emitted", "Samples sent in sets.", labels=["group"])
        held = GaugeMetricFamily(f"{p}_held_samples", "Samples held now.", labels=["group"])
        capacity = GaugeMetricFamily(
            f"{p}_capacity_samples", "The most samples the group can hold (cells x cap).", labels=["group"]
        )
        filled = GaugeMetricFamily(
            f"{p}_cells_filled", "Cells holding at least one sample.", labels=["group"]
        )
        required = GaugeMetricFamily(
            f"{p}_cells_required", "Cells a set must cover to be complete.", labels=["group"]
        )
        open_for = GaugeMetricFamily(
            f"{p}_set_open_seconds",
            "How long the current set has waited (0: nothing held).",
            labels=["group"],
        )
        fill = GaugeMetricFamily(f"{p}_bin_fill", "Samples held per bin.", labels=["group", "output", "bin"])
        bin_emitted = CounterMetricFamily(
            f"{p}_bin_emitted",
            "Samples emitted per bin of every output, by the group whose sets carried them.",
            labels=["group", "output", "bin"],
        )
        for g in s.groups.values():
            for reason, n in g.evicted.items():
                evicted.add_metric([g.name, reason], n)
            for outcome, n in g.sets.items():
                sets.add_metric([g.name, outcome], n)
            emitted.add_metric([g.name], g.samples_emitted)
            held.add_metric([g.name], g.held)
            capacity.add_metric([g.name], g.capacity)
            filled.add_metric([g.name], g.cells_filled)
            required.add_metric([g.name], g.cells_required)
            open_for.add_metric([g.name], g.open_for_s or 0.0)
            for output, counts in g.fill.items():
                for label, n in zip(s.bin_labels[output], counts.tolist(), strict=True):
                    fill.add_metric([g.name, output, label], n)
            for output, counts in g.emitted.items():
                for label, n in zip(s.bin_labels[output], counts.tolist(), strict=True):
                    bin_emitted.add_metric([g.name, output, label], n)
        yield from (evicted, sets, emitted, held, capacity, filled, required, open_for, fill, bin_emitted)

        arrivals = CounterMetricFamily(
            f"{p}_bin_arrivals", "Raw stream: arrivals per bin of each output.", labels=["output", "bin"]
        )
        for output, counts in s.arrivals.items():
            for label, n in zip(s.bin_labels[output], counts.tolist(), strict=True):
                arrivals.add_metric([output, label], n)
        yield arrivals
