"""The metric catalogue: the Prometheus families the services declare and dashboards may query.

tests/test_topology.py holds every service's /metrics to ``METRICS`` (names, types, labels);
charles.topology.prometheus holds the Grafana dashboard's queries to it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    name: str
    type: str
    """counter, gauge, histogram or info (as prometheus_client declares it)."""
    labels: tuple[str, ...]
    owner: str
    """Which service exposes it ("every" for charles.runtime.Metrics)."""


# The metric names dashboards may use; the services declare exactly these (names, types, labels). Every
# service has the "every" families (charles.runtime.Metrics); each service adds its own.
METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        Metric("charles_service_info", "info", ("service", "instance", "pid"), "every"),
        Metric("charles_messages_total", "counter", ("direction", "topic"), "every"),
        Metric("charles_bytes_total", "counter", ("direction", "topic"), "every"),
        Metric("charles_rejects_total", "counter", ("reason",), "every"),
        Metric("charles_drops_total", "counter", ("cause",), "every"),
        Metric("charles_loop_seconds", "histogram", ("loop",), "every"),
        Metric("charles_up", "gauge", (), "every"),
        Metric("charles_topic_alive", "gauge", ("topic",), "every"),
        Metric("charles_topic_rate_hz", "gauge", ("topic",), "every"),
        Metric("charles_collector_samples_total", "counter", (), "collector"),
        Metric("charles_collector_unstucks_total", "counter", (), "collector"),
        Metric("charles_collector_frame_seconds", "histogram", (), "collector"),
        Metric("charles_collector_jitter_seconds", "histogram", (), "collector"),
        Metric("charles_collector_flow_scale", "gauge", (), "collector"),
        Metric("charles_collector_encode_seconds", "histogram", (), "collector"),
        Metric("charles_balancer_samples_accepted_total", "counter", (), "balancer"),
        Metric("charles_balancer_sets_total", "counter", ("group", "outcome"), "balancer"),
        Metric("charles_balancer_bin_fill", "gauge", ("group", "output", "bin"), "balancer"),
        Metric("charles_balancer_acceptance_ratio", "gauge", (), "balancer"),
        Metric("charles_trainer_batches_total", "counter", (), "trainer"),
        Metric("charles_trainer_batch", "gauge", (), "trainer"),
        Metric("charles_trainer_batches_per_second", "gauge", (), "trainer"),
        Metric("charles_trainer_samples_per_second", "gauge", (), "trainer"),
        Metric("charles_trainer_samples_trained_total", "counter", (), "trainer"),
        Metric("charles_trainer_buffer_fill_ratio", "gauge", ("output",), "trainer"),
        Metric("charles_trainer_loss", "gauge", ("output",), "trainer"),
        Metric("charles_trainer_data_wait_fraction", "gauge", (), "trainer"),
        Metric("charles_trainer_flow_demand", "gauge", (), "trainer"),
        Metric("charles_trainer_flow_reuse", "gauge", (), "trainer"),
        Metric("charles_trainer_weights_published_total", "counter", (), "trainer"),
        Metric("charles_trainer_publish_seconds", "histogram", (), "trainer"),
        Metric("charles_trainer_samples_reused_total", "counter", ("output",), "trainer"),
        Metric("charles_trainer_samples_inserted_total", "counter", ("output",), "trainer"),
        Metric("charles_trainer_samples_drawn_total", "counter", ("output",), "trainer"),
        Metric("charles_broker_last_value_evictions_total", "counter", ("family", "cause"), "broker"),
        Metric("charles_player_predictions_total", "counter", (), "player"),
        Metric("charles_player_fps", "gauge", (), "player"),
        Metric("charles_player_pps", "gauge", (), "player"),
        Metric("charles_player_weights_batch", "gauge", (), "player"),
        Metric("charles_player_policy_lag_batches", "gauge", (), "player"),
        Metric("charles_player_swaps_total", "counter", (), "player"),
        Metric("charles_player_unstucks_total", "counter", (), "player"),
        Metric("charles_player_latency_seconds", "histogram", (), "player"),
        Metric("charles_agent_telemetry_skew_seconds", "histogram", (), "capture_agent"),
        Metric("charles_agent_telemetry_skew_quantile_seconds", "gauge", ("quantile",), "capture_agent"),
        Metric("charles_agent_purpose_targets_reached_total", "counter", (), "capture_agent"),
        Metric("charles_agent_noise_frames_total", "counter", (), "capture_agent"),
        Metric("charles_judge_km_between_unstucks", "gauge", ("run", "driver"), "judge"),
        Metric("charles_judge_on_road_fraction", "gauge", ("run", "driver"), "judge"),
        Metric("charles_judge_collisions_per_km", "gauge", ("run", "driver"), "judge"),
        Metric("charles_judge_mean_speed_kmh", "gauge", ("run", "driver"), "judge"),
        Metric("charles_judge_batch", "gauge", ("run",), "judge"),
        Metric("charles_judge_judgings_total", "counter", (), "judge"),
        Metric("charles_judge_weights_accepted_total", "counter", (), "judge"),
        Metric("charles_judge_seconds", "histogram", (), "judge"),
    )
}
PROMETHEUS_OWN = {"up": ()}
"""Series Prometheus makes itself, allowed in dashboards too."""
TARGET_LABELS = ("job", "instance")
"""Labels Prometheus adds to every scraped series. A scraped label of the same name becomes exported_<name>."""


def exposed_names(m: Metric) -> set[str]:
    """The series names a metric family appears under in queries."""
    if m.type == "histogram":
        return {f"{m.name}_bucket", f"{m.name}_sum", f"{m.name}_count"}
    return {m.name}
