"""bench/e2e.py's ``--runs N`` report: the median and spread of each headline figure over independent runs,
with every run's own figures kept. (The runs themselves are tests/test_e2e_smoke.py's, a system test.)"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

E2E = Path(__file__).resolve().parents[1] / "bench" / "e2e.py"


def e2e_bench():
    spec = importlib.util.spec_from_file_location("charles_bench_e2e", E2E)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def run(vs_npc: float | None, km: float, batches: int, first: float | None) -> dict:
    return {
        "player_vs_npc": vs_npc,
        "player_vs_random": 3.0,
        "player": {"km_between_unstucks": km, "on_road_fraction": 0.9},
        "npc": {"km_between_unstucks": 10.0},
        "first_weights_s": first,
        "batches": batches,
        "samples_trained": batches * 32,
    }


def test_three_runs_report_each_figures_median_and_spread():
    e2e = e2e_bench()
    runs = [run(0.5, 5.0, 900, 80.0), run(0.1, 1.0, 700, None), run(0.7, 7.0, 1100, 95.5)]
    out = e2e.summarise(runs)
    assert out["runs"] == 3 and out["each"] == runs
    assert out["median"]["player_vs_npc"] == 0.5 and out["spread"]["player_vs_npc"] == [0.1, 0.7]
    assert out["median"]["player_km_between_unstucks"] == 5.0
    assert out["median"]["batches"] == 900 and out["spread"]["batches"] == [700, 1100]
    assert out["median"]["samples_trained"] == 900 * 32
    # a run whose player never drove trained weights has no first_weights_s: the median is of the others
    assert out["median"]["first_weights_s"] == (80.0 + 95.5) / 2 and out["spread"]["first_weights_s"] == [
        80.0,
        95.5,
    ]
    # a figure no run has is left out, not reported as 0
    assert "samples_collected" not in out["median"]


@pytest.mark.slow  # four `charles eval` processes
def test_held_out_towns_are_driven_under_their_looks_with_figures_per_look():
    e2e = e2e_bench()
    cfg = Path(__file__).resolve().parents[1] / "deploy" / "demo.yaml"
    out = e2e.evaluate(None, [9001, 9002], 0.03, cfg, 2, looks=["config", "rain@22.5"])
    assert out["player"] is None and set(out) == {"player", "npc", "random"}
    for policy in ("npc", "random"):
        per_look = out[policy]["per_look"]
        assert list(per_look) == ["config", "rain@22.5"], per_look
        assert sum(f["km"] for f in per_look.values()) == pytest.approx(out[policy]["km"], abs=2e-3)
    assert e2e.parse_look("fog@5") == ["--set", "sim.weather=fog", "--set", "sim.time_of_day=5.0"]
    for bad in ("snow@12", "rain", "rain@25", "rain@dusk"):
        with pytest.raises(SystemExit, match="a look is config or WEATHER@HOUR"):
            e2e.parse_look(bad)
