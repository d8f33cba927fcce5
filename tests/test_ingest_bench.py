"""bench/ingest.py end to end in quick mode: real broker, balancer and trainer processes, two publisher
processes of 100 collector identities; at a rate any box keeps up with, every stage's figure must agree
with what was sent (the counts are read from the services' /metrics, so a renamed metric fails here)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("prometheus_client")


@pytest.mark.system
def test_the_ingest_bench_follows_samples_from_the_publishers_to_the_trainers_buffers():
    out = subprocess.run(
        [sys.executable, "ingest.py", "--rates", "300,600", "--step-s", "6"],
        cwd=BENCH,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    line = json.loads(out.stdout.strip().splitlines()[-1])
    assert line["bench"] == "ingest" and len(line["steps"]) == 2 and line["collectors"] == 100
    first = line["steps"][0]
    # the publishers sent what they were asked to (settle + step seconds at 300/s)
    assert abs(line["sent_per_step"][0] - 300 * 8) <= 30
    for stage in ("broker_in", "balancer_in"):
        assert 0.9 * 300 <= first[stage] <= 1.1 * 300, f"{stage}: {first}"
    assert first["lost"] == dict.fromkeys(
        ("broker_queue", "broker_set_queue", "balancer_seq_gaps", "trainer_seq_gaps"), 0
    )
    # over the whole run, once the last sets landed: nothing lost anywhere, every sample accounted for
    totals = line["totals"]
    assert totals["sent"] == sum(line["sent_per_step"]) == totals["broker_in"] == totals["balancer_in"], (
        totals
    )
    assert totals["balanced_out"] > 0 and totals["trainer_in"] == totals["balanced_out"], totals
    assert totals["balancer_sets"] == totals["trainer_sets"] > 0, totals
    lost = ("broker_drops", "broker_set_drops", "balancer_gaps", "trainer_gaps")
    assert all(totals[k] == 0 for k in lost), totals
    assert set(first["cpu"]) == {"broker", "balancer", "trainer"}
    assert line["samples_per_s"] == 600 and line["saturating_stage"] == "none", line["steps"]
