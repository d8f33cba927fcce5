"""Every version's sets hold exactly what it promises, over random streams (hypothesis).

With no timeout in play every emitted set is a *complete* set, so its composition is exact: one sample
per required cell, nothing else, and nothing emitted twice. Bookkeeping must balance too: whatever a
group took in was emitted, is still held, or was evicted and counted.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charles.balancer.balancer import Balancer
from charles.balancer.synthetic import samples_from_labels
from charles.outputs import default_bins
from charles.sections.balancer import BalancerConfig

# Coarse bins so that a few hundred random samples complete sets often enough to test their contents.
COARSE = {
    "steering": [-1.0, [-1.0, 0.0], 0.0, [0.0, 1.0], 1.0],
    "throttle_brake": [[-1.0, 0.0], 0.0, [0.0, 1.0], 1.0],
    "throttle": [0.0, [0.0, 0.5], [0.5, 1.0], 1.0],
    "brake": [0.0, [0.0, 1.0], 1.0],
}
NEVER = 1e9  # a timeout that never fires: every set below is a complete one

# Values that hit exact bins and edges often, plus anything in between.
special = st.sampled_from([-1.0, -0.5, 0.0, 0.5, 1.0, -0.2, 0.2, 0.6, -0.6, 0.8])
value = st.one_of(special, st.floats(-1.0, 1.0, allow_nan=False))
noise = st.lists(st.tuples(value, value), max_size=200)
# One label pair for every reachable cell of the COARSE bins, whichever outputs are balanced: a stream
# that holds them all (in any order, between any noise) must complete at least one set in every group.
COVER = list(itertools.product([-1.0, -0.5, 0.0, 0.5, 1.0], [-1.0, -0.5, 0.0, 0.25, 0.75, 1.0]))
streams = st.builds(lambda a, cover, b: a + cover + b, noise, st.permutations(COVER), noise)
output_sets = st.sampled_from(
    [("steering", "throttle_brake"), ("steering", "throttle", "brake"), ("throttle_brake",)]
)

SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def run(version: int, outputs: tuple[str, ...], labels: list[tuple[float, float]], cap: int = 4, bins=None):
    config = BalancerConfig(
        version=version,
        outputs=outputs,
        bins={k: v for k, v in (COARSE if bins is None else bins).items() if k in outputs},
        cap_per_bin=cap,
        set_timeout_s=NEVER,
    )
    b = Balancer(config)
    sets = []
    for k, sample in enumerate(samples_from_labels(np.array(labels, dtype=np.float64))):
        sets.extend(b.add(sample, float(k)))
        assert b.held <= b.capacity
    return b, sets


def check_bookkeeping(b: Balancer) -> None:
    for g in b.stats(mark=False).groups.values():
        assert g.accepted == g.samples_emitted + g.held + sum(g.evicted.values())
        assert g.held <= g.capacity
        assert int(sum(g.emitted[g.outputs[0]])) == g.samples_emitted
    for g in b.groups:
        assert all(len(dq) <= b.cap for dq in g.cells)
        assert g.filled == sum(1 for dq, r in zip(g.cells, g.required, strict=True) if dq and r)


def check_complete_sets(b: Balancer, sets) -> None:
    by_group = {tuple(g.outputs): g for g in b.groups}
    seen: dict[str, set[int]] = {g.name: set() for g in b.groups}
    for s in sets:
        g = by_group[tuple(s.outputs)]
        cells = [g.cell_of(b.bins_of(x)[0]) for x in s.samples]
        required = {c for c, r in enumerate(g.required) if r}
        assert len(cells) == len(set(cells)), "one sample per cell"
        assert set(cells) == required, "a complete set covers every required cell and nothing else"
        ids = {id(x) for x in s.samples}
        assert not ids & seen[g.name], "no sample leaves a group twice"
        seen[g.name] |= ids
        assert s.version == b.version


@SETTINGS
@given(labels=streams, outputs=output_sets, cap=st.integers(1, 6))
def test_v1_sets_hold_one_sample_per_reachable_combination(labels, outputs, cap):
    b, sets = run(1, outputs, labels, cap)
    assert len(b.groups) == 1
    for s in sets:
        assert s.outputs == list(outputs) and s.labels_kept == list(outputs)
    assert sets, "the stream covers every reachable cell, so a set must complete"
    check_complete_sets(b, sets)
    check_bookkeeping(b)


@SETTINGS
@given(labels=streams, outputs=output_sets, cap=st.integers(1, 6))
def test_v2_sets_balance_one_output_and_carry_only_its_label(labels, outputs, cap):
    b, sets = run(2, outputs, labels, cap)
    assert [g.name for g in b.groups] == list(outputs)
    for s in sets:
        assert len(s.outputs) == 1 and s.labels_kept == s.outputs
        assert len(s.samples) == len(COARSE[s.outputs[0]])
    assert {s.outputs[0] for s in sets} == set(outputs), "every output's group completed a set"
    check_complete_sets(b, sets)
    check_bookkeeping(b)


@SETTINGS
@given(labels=streams, outputs=output_sets, cap=st.integers(1, 6), version=st.sampled_from([3, 4]))
def test_v3_v4_sets_balance_one_output_and_keep_all_labels(labels, outputs, cap, version):
    b, sets = run(version, outputs, labels, cap)
    for s in sets:
        assert len(s.outputs) == 1
        assert s.labels_kept == list(outputs), "all outputs train together on the same images"
        assert len(s.samples) == len(COARSE[s.outputs[0]])
    assert {s.outputs[0] for s in sets} == set(outputs), "every output's group completed a set"
    check_complete_sets(b, sets)
    check_bookkeeping(b)


@SETTINGS
@given(
    order=st.permutations(range(21)),
    extra=st.lists(st.integers(0, 20), max_size=40),
    version=st.sampled_from([2, 3, 4]),
)
def test_default_bins_complete_as_soon_as_every_bin_has_a_sample(order, extra, version):
    """With the seed's 0.1-wide steering bins: no set before the 21st distinct bin, exactly one at it."""
    centres = [b.centre for b in default_bins("steering", version)]
    labels = [(centres[i], 1.0) for i in extra] + [(centres[i], 1.0) for i in order]
    b, sets = run(version, ("steering",), labels, cap=64, bins={})
    assert len(sets) == 1
    assert sorted(x.steering for x in sets[0].samples) == sorted(centres)
    check_bookkeeping(b)


@pytest.mark.parametrize("version", [1, 2, 3, 4])
@pytest.mark.parametrize("outputs", [("steering", "throttle_brake"), ("steering", "throttle", "brake")])
def test_many_sets_from_a_long_random_stream_all_hold(version, outputs):
    """The hypothesis streams are short; this one is long enough that every group completes many sets."""
    rng = np.random.default_rng(version)
    points = np.array([-1.0, -0.5, 0.0, 0.5, 1.0, -0.2, 0.2, 0.7])
    labels = rng.choice(points, size=(3000, 2))
    b, sets = run(version, outputs, labels.tolist(), cap=3)
    per_group = {g.name: g.sets["complete"] for g in b.stats(mark=False).groups.values()}
    assert min(per_group.values()) >= 5, per_group
    check_complete_sets(b, sets)
    check_bookkeeping(b)


def test_v1_with_the_seeds_three_outputs_waits_for_the_81_reachable_of_225_cells():
    b = Balancer(BalancerConfig(version=1, outputs=("steering", "throttle", "brake"), set_timeout_s=NEVER))
    g = b.groups[0]
    assert len(g.cells) == 225
    assert g.n_required == 81, "throttle and brake cannot both be above zero: 9 x (5 + 5 - 1)"
    # every (steering bin, trigger value) pair the seed's bins allow, once each, in a scrambled order
    steer = [x.centre for x in default_bins("steering", 1)]
    trig = [0.0, 0.1, 0.5, 0.9, 1.0, -0.1, -0.5, -0.9, -1.0]
    labels = list(itertools.product(steer, trig))
    rng = np.random.default_rng(3)
    rng.shuffle(labels)
    sets = []
    for k, sample in enumerate(samples_from_labels(np.array(labels))):
        sets.extend(b.add(sample, float(k)))
    assert len(sets) == 1 and len(sets[0].samples) == 81
    check_complete_sets(b, sets)
    # and a dense sweep of real label pairs never lands in a cell that is not required
    grid = np.linspace(-1, 1, 401)
    for tb in grid[::8]:
        bins, reason = b.bins_of(samples_from_labels(np.array([[0.3, tb]]))[0])
        assert reason is None and g.required[g.cell_of(bins)]


def test_v1_default_outputs_form_81_cells_all_required():
    b = Balancer(BalancerConfig(version=1))
    assert len(b.groups[0].cells) == 81 and b.groups[0].n_required == 81
