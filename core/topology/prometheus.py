"""Prometheus and Grafana against the facts: the scrape configurations, and a small PromQL reader that
holds every dashboard query to the metric catalogue (charles.topology.metrics)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from charles.proto import registry
from charles.proto.registry import Registry
from charles.topology.facts import METRICS_PATH, facts, unique
from charles.topology.launcher import local_collector_ports
from charles.topology.metrics import METRICS, PROMETHEUS_OWN, TARGET_LABELS, exposed_names

# ---------------------------------------------------------------------------------------------- prometheus


def check_prometheus(doc: Mapping, *, local: bool, reg: Registry | None = None) -> list[str]:
    """deploy/prometheus.yml (compose DNS names) or deploy/prometheus.local.yml (127.0.0.1, launcher ports)."""
    reg = reg or registry()
    where = "prometheus.local.yml" if local else "prometheus.yml"
    problems: list[str] = []
    jobs = {j["job_name"]: j for j in doc.get("scrape_configs") or []}
    problems += unique([j["job_name"] for j in doc.get("scrape_configs") or []], f"{where}: job")
    for f in facts(reg).values():
        job = jobs.get(f.name)
        w = f"{where}: job {f.name}"
        if job is None:
            problems.append(f"{w} is missing")
            continue
        if job.get("metrics_path", METRICS_PATH) != METRICS_PATH:
            problems.append(f"{w}: metrics_path {job.get('metrics_path')}")
        targets = [t for sc in job.get("static_configs") or [] for t in sc.get("targets") or []]
        if local:
            want = [
                f"127.0.0.1:{p}"
                for p in (local_collector_ports(reg) if f.name == "collector" else [f.http_port])
            ]
            if sorted(targets) != sorted(want):
                problems.append(f"{w}: targets {targets}, the launcher serves {want}")
        elif f.name == "collector":
            dns = job.get("dns_sd_configs") or []
            if not any(
                d.get("names") == ["collector"] and d.get("type") == "A" and d.get("port") == f.http_port
                for d in dns
            ):
                problems.append(
                    f"{w}: needs dns_sd_configs names [collector], type A, port {f.http_port} (every replica)"
                )
        elif targets != [f"{f.name}:{f.http_port}"]:
            problems.append(f"{w}: targets {targets}, expected ['{f.name}:{f.http_port}']")
    return problems


# ---------------------------------------------------------------------------------------------- grafana (PromQL)

_IDENT = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GROUPING = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*\{([^}]*)\}")
_PROMQL_WORDS = set(
    [
        "sum",
        "avg",
        "min",
        "max",
        "count",
        "count_values",
        "quantile",
        "stddev",
        "topk",
        "bottomk",
        "rate",
        "irate",
        "increase",
        "delta",
        "deriv",
        "histogram_quantile",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "clamp_min",
        "clamp_max",
        "abs",
        "round",
        "sort",
        "sort_desc",
        "label_replace",
        "vector",
        "scalar",
        "time",
        "absent",
        "changes",
        "resets",
        "avg_over_time",
        "max_over_time",
        "min_over_time",
        "last_over_time",
        "le",
        "inf",
        "Inf",
        "NaN",
    ]
)
"""PromQL's own words: functions, aggregations, keywords."""


def _series_labels(name: str) -> set[str] | None:
    """Labels a series may carry in a query, or None if the name is not ours."""
    if name in PROMETHEUS_OWN:
        return set(PROMETHEUS_OWN[name]) | set(TARGET_LABELS)
    for m in METRICS.values():
        if name in exposed_names(m):
            labels = (
                set(m.labels) | set(TARGET_LABELS) | {f"exported_{t}" for t in TARGET_LABELS if t in m.labels}
            )
            if name.endswith("_bucket"):
                labels.add("le")
            return labels
    return None


def check_expr(expr: str) -> list[str]:
    """A PromQL expression names only metrics in METRICS (or Prometheus' own) and only their labels."""
    problems = []
    text = re.sub(r'"[^"]*"', '""', expr)  # label values and strings say nothing about names
    text = re.sub(r"\$\{?[a-zA-Z_]+\}?", "", text)  # Grafana variables ($__rate_interval)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors [1m]
    used: set[str] = set()
    for m in _SELECTOR.finditer(text):
        name = m.group(1)
        labels = _series_labels(name)
        if labels is None:
            continue
        for matcher in filter(None, (s.strip() for s in m.group(2).split(","))):
            key = re.split(r"[=!~]", matcher, maxsplit=1)[0].strip()
            if key not in labels:
                problems.append(f"{expr!r}: {name} has no label {key!r}")
    grouped: list[str] = []
    for m in _GROUPING.finditer(text):
        grouped += [g.strip() for g in m.group(2).split(",") if g.strip()]
    stripped = _GROUPING.sub(" ", _SELECTOR.sub(lambda m: m.group(1), text))
    for ident in _IDENT.findall(stripped):
        if ident in _PROMQL_WORDS or re.fullmatch(r"[0-9.e]+", ident):
            continue
        if _series_labels(ident) is None:
            problems.append(f"{expr!r}: {ident!r} is not a metric in charles.topology.METRICS")
        else:
            used.add(ident)
    allowed = set().union(*(_series_labels(n) or set() for n in used)) if used else set()
    for label in grouped:
        if label not in allowed:
            problems.append(f"{expr!r}: groups by {label!r}, which none of {sorted(used)} has")
    return problems


def dashboard_exprs(dashboard: Mapping) -> list[str]:
    out = []

    def walk(panels: Iterable[Mapping]) -> None:
        for p in panels:
            out.extend(t["expr"] for t in p.get("targets") or [] if t.get("expr"))
            walk(p.get("panels") or [])

    walk(dashboard.get("panels") or [])
    return out


def check_dashboard(dashboard: Mapping) -> list[str]:
    problems: list[str] = []
    exprs = dashboard_exprs(dashboard)
    if not exprs:
        problems.append("dashboard has no queries")
    for e in exprs:
        problems += check_expr(e)
    ids = [p.get("id") for p in _all_panels(dashboard)]
    problems += unique(ids, "dashboard panel id")
    return problems


def _all_panels(d: Mapping) -> list[Mapping]:
    out: list[Mapping] = []
    for p in d.get("panels") or []:
        out.append(p)
        out += _all_panels(p)
    return out
