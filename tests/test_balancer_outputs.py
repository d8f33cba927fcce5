"""Output types and signals change the bins: delta, classification, separate throttle/brake, config."""

from __future__ import annotations

import math
from dataclasses import fields

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charles.balancer.balancer import (
    _SIGNAL_CODE,
    REJECT_NAN,
    REJECT_NO_BIN,
    REJECT_NO_PREVIOUS,
    Balancer,
    _signal,
)
from charles.balancer.synthetic import samples_from_labels
from charles.outputs import (
    BinIndex,
    OutputKind,
    OutputSpec,
    default_bins,
    outputs_signature,
    parse_bins,
    signals_from,
)
from charles.proto.messages import Sample
from charles.sections.balancer import DELTA_BINS, BalancerConfig, help_lines

NEVER = 1e9


def sample(steering: float, throttle_brake: float, previous: tuple[float, float] | None = None) -> Sample:
    s = samples_from_labels(np.array([[steering, throttle_brake]]))[0]
    s.previous = previous
    return s


@settings(max_examples=200, deadline=None)
@given(st.floats(-1, 1), st.floats(-1, 1))
def test_inlined_signals_match_charles_outputs(steering, throttle_brake):
    want = signals_from(steering, throttle_brake)
    for name, code in _SIGNAL_CODE.items():
        assert _signal(code, steering, throttle_brake) == want[name]


@settings(max_examples=200, deadline=None)
@given(st.floats(-1, 1), st.floats(-1, 1), st.sampled_from([1, 2, 3]))
def test_bins_agree_with_charles_outputs_binindex(steering, throttle_brake, version):
    names = ("steering", "throttle_brake", "throttle", "brake")
    b = Balancer(BalancerConfig(version=version, outputs=names))
    bins, reason = b.bins_of(sample(steering, throttle_brake))
    sig = signals_from(steering, throttle_brake)
    assert reason is None
    assert bins == tuple(BinIndex(default_bins(n, version)).index(sig[n]) for n in names)


def test_delta_bins_come_from_the_change_since_the_previous_action():
    b = Balancer(
        BalancerConfig(outputs=("steering", "throttle"), kinds={"steering": "delta", "throttle": "delta"})
    )
    labels = [str(x) for x in parse_bins(DELTA_BINS)]
    bins, reason = b.bins_of(sample(0.4, 0.3, previous=(0.1, -0.5)))
    assert reason is None
    # steering moved +0.3; throttle went from 0 (braking) to 0.3: also +0.3, though throttle_brake moved +0.8
    assert labels[bins[0]] == "(0.2,0.5)" and labels[bins[1]] == "(0.2,0.5)"
    bins, _ = b.bins_of(sample(0.4, 0.3, previous=(0.4, 0.3)))
    assert labels[bins[0]] == "0" and labels[bins[1]] == "0"
    bins, _ = b.bins_of(sample(-1.0, 0.0, previous=(1.0, 1.0)))
    assert labels[bins[0]] == "(-2,-0.5)", "a full swing, -2, is the lowest edge and is kept"


def test_delta_sets_hold_one_sample_per_change_bin():
    b = Balancer(BalancerConfig(outputs=("steering",), kinds={"steering": "delta"}, set_timeout_s=NEVER))
    centres = BinIndex(parse_bins(DELTA_BINS)).centres()
    rng = np.random.default_rng(0)
    sets, prev = [], 0.0
    for k, d in enumerate(rng.permutation(np.repeat(centres, 3))):
        # pick a previous value that keeps previous + change inside [-1, 1]
        prev = float(np.clip(prev, -1 - min(d, 0), 1 - max(d, 0)))
        sets.extend(b.add(sample(prev + d, 1.0, previous=(prev, 1.0)), float(k)))
        prev = prev + d
    assert len(sets) == 3
    for s in sets:
        changes = sorted(x.steering - x.previous[0] for x in s.samples)
        assert np.allclose(changes, sorted(centres)), "one sample per change bin, whatever the values were"


def test_a_delta_output_refuses_samples_without_a_previous_action():
    b = Balancer(
        BalancerConfig(version=3, outputs=("steering", "throttle_brake"), kinds={"steering": "delta"})
    )
    b.add(sample(0.1, 1.0, previous=None), 0.0)
    b.add(sample(0.1, 1.0, previous=(math.nan, 1.0)), 0.0)
    b.add(sample(0.1, 1.0, previous=(0.1, 1.0)), 0.0)
    st_ = b.stats(mark=False)
    assert st_.rejected[REJECT_NO_PREVIOUS] == 1 and st_.rejected[REJECT_NAN] == 1
    assert st_.label_errors[("steering", REJECT_NO_PREVIOUS)] == 1
    assert st_.label_errors[("throttle_brake", REJECT_NO_PREVIOUS)] == 0
    assert st_.accepted == 1 and b.held == 2, "one sample, held by both v3 groups"
    # v2 keeps the regression output's label alone, so the same sample still feeds that group
    b2 = Balancer(
        BalancerConfig(version=2, outputs=("steering", "throttle_brake"), kinds={"steering": "delta"})
    )
    b2.add(sample(0.1, 1.0, previous=None), 0.0)
    assert b2.accepted == 1 and [g.held for g in b2.groups] == [0, 1]


def test_classification_balances_over_its_classes():
    classes = OutputSpec(
        "steering",
        OutputKind.CLASSIFICATION,
        tuple(parse_bins([-1.0, [-1.0, -0.1], [-0.1, 0.1], [0.1, 1.0], 1.0])),
    )
    cfg = BalancerConfig.from_specs([classes], version=3, set_timeout_s=NEVER)
    b = Balancer(cfg)
    assert b.specs[0].kind is OutputKind.CLASSIFICATION and len(b.groups[0].cells) == 5
    sets = []
    for k, v in enumerate([0.0, 0.05, -0.5, 0.7, 0.09, 1.0, 0.3, -1.0]):
        sets.extend(b.add(sample(v, 1.0), float(k)))
    assert len(sets) == 1
    assert sorted(x.steering for x in sets[0].samples) == [-1.0, -0.5, 0.0, 0.7, 1.0]


def test_classes_with_gaps_refuse_values_between_them():
    b = Balancer(
        BalancerConfig(
            outputs=("throttle",), kinds={"throttle": "classification"}, bins={"throttle": [0.0, 0.5, 1.0]}
        )
    )
    b.add(sample(0.0, 0.5), 0.0)
    b.add(sample(0.0, 0.3), 0.0)
    b.add(sample(0.0, -0.4), 0.0)  # braking: throttle is exactly 0, a class
    assert b.accepted == 2 and b.rejected[REJECT_NO_BIN] == 1


def test_separate_throttle_and_brake_outputs_are_cut_from_the_combined_label():
    b = Balancer(BalancerConfig(version=3, outputs=("steering", "throttle", "brake"), set_timeout_s=NEVER))
    assert [g.name for g in b.groups] == ["steering", "throttle", "brake"]
    trig = [str(x) for x in default_bins("throttle", 3)]
    bins, _ = b.bins_of(sample(0.0, -0.75))
    assert trig[bins[1]] == "0" and trig[bins[2]] == "(0.7,0.8)"
    bins, _ = b.bins_of(sample(0.0, 1.0))
    assert trig[bins[1]] == "1" and trig[bins[2]] == "0"
    # a brake set: one sample per brake bin, every one of them with throttle exactly 0
    brake_values = [0.0, 0.05, *np.arange(0.15, 1.0, 0.1), 1.0]
    sets = []
    for k, v in enumerate(brake_values):
        sets.extend(b.add(sample(0.0, -v), float(k)))
    brake_sets = [s for s in sets if s.outputs == ["brake"]]
    assert len(brake_sets) == 1 and len(brake_sets[0].samples) == 12
    assert brake_sets[0].labels_kept == ["steering", "throttle", "brake"]
    assert all(max(x.throttle_brake, 0.0) == 0.0 for x in brake_sets[0].samples)


def test_bad_labels_are_counted_never_raised():
    b = Balancer(BalancerConfig())
    for s, tb in [(math.nan, 0.0), (0.0, math.inf), (1.5, 0.0), (0.0, -1.2)]:
        assert b.add(sample(s, tb), 0.0) == []
    st_ = b.stats(mark=False)
    assert st_.rejected == {REJECT_NAN: 2, REJECT_NO_BIN: 2, REJECT_NO_PREVIOUS: 0}
    assert (
        st_.label_errors[("steering", REJECT_NO_BIN)] == 1
        and st_.label_errors[("throttle_brake", REJECT_NO_BIN)] == 1
    )
    assert st_.acceptance_rate == 0.0 and b.held == 0


def test_config_defaults_come_from_charles_outputs_and_every_field_has_help():
    for version in (1, 2, 3, 4):
        specs = BalancerConfig(version=version).output_specs()
        assert [s.name for s in specs] == ["steering", "throttle_brake"]
        for s in specs:
            assert list(s.bins) == default_bins(s.name, version)
    assert len(BalancerConfig(version=1, outputs=("throttle",)).output_specs()[0].bins) == 5
    assert len(BalancerConfig(version=2, outputs=("throttle",)).output_specs()[0].bins) == 12
    assert len(BalancerConfig(version=2, outputs=("steering",)).output_specs()[0].bins) == 21
    assert all(f.metadata.get("help") for f in fields(BalancerConfig))
    assert [n for n, _, _ in help_lines()] == [f.name for f in fields(BalancerConfig)]


def test_config_round_trips_and_refuses_nonsense():
    cfg = BalancerConfig(
        version=4, outputs="steering,brake", kinds={"brake": "delta"}, cap_per_bin=5, timeout_policy="drop"
    )
    assert BalancerConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.outputs == ("steering", "brake")
    bad = [
        {"version": 5},
        {"outputs": ("steering", "steering")},
        {"outputs": ("speed",)},
        {"kinds": {"steering": "fuzzy"}},
        {"kinds": {"brake": "delta"}},
        {"bins": {"steering": [[0.5, 0.1]]}},
        {"cap_per_bin": 0},
        {"set_timeout_s": 0},
        {"timeout_policy": "keep"},
    ]
    for kw in bad:
        with pytest.raises(ValueError):
            BalancerConfig(**kw)
    with pytest.raises(ValueError, match="unknown balancer config keys"):
        BalancerConfig.from_dict({"verison": 3})


# ---- the model line's outputs are the balancer's -----------------------------------------------------------


def _line(kind: str, name: str = "steering") -> OutputSpec:
    bins = [-1.0, [-1.0, -0.1], [-0.1, 0.1], [0.1, 1.0], 1.0] if kind == "classification" else DELTA_BINS
    return OutputSpec(name, OutputKind(kind), tuple(parse_bins(bins)))


@pytest.mark.parametrize("kind", ["classification", "delta"])
def test_a_classification_or_delta_line_is_balanced_over_its_own_bins_by_default(kind):
    line = [
        _line(kind),
        OutputSpec("throttle_brake", OutputKind.REGRESSION, tuple(default_bins("throttle_brake", 3))),
    ]
    cfg = BalancerConfig(version=2)
    specs = cfg.output_specs(line)
    assert specs[0] == line[0], "the balancer bins by the line's classes without being told"
    assert specs[1] == cfg.output_specs()[1], "a regression output keeps the version's balancing bins"
    assert cfg.output_specs()[0].kind is OutputKind.REGRESSION  # without a model: as before
    assert outputs_signature(specs) == outputs_signature(line)
    assert outputs_signature(specs) != outputs_signature(cfg.output_specs())


def test_explicit_balancer_settings_win_where_they_agree_and_fail_where_they_do_not():
    line = [_line("classification")]
    same = BalancerConfig(
        outputs=("steering",),
        kinds={"steering": "classification"},
        bins={"steering": line[0].to_dict()["bins"]},
    )
    assert same.output_specs(line) == line
    with pytest.raises(ValueError, match="learns it as classification"):
        BalancerConfig(outputs=("steering",), kinds={"steering": "delta"}).output_specs(line)
    with pytest.raises(ValueError, match="they are its classes"):
        BalancerConfig(outputs=("steering",), bins={"steering": [-1.0, [-1.0, 1.0], 1.0]}).output_specs(line)
    # a regression line leaves the balancer free: its bins change the mix, never the targets
    regression = [OutputSpec("steering", OutputKind.REGRESSION, tuple(default_bins("steering", 3)))]
    free = BalancerConfig(outputs=("steering",), bins={"steering": [-1.0, [-1.0, 1.0], 1.0]})
    assert len(free.output_specs(regression)[0].bins) == 3
