"""Swapper: two predictors, loads beside the running one, swaps between frames by policy (fake predictors)."""

from __future__ import annotations

import pytest
import torch

from charles.model.weights import WeightsError
from charles.player.swap import Swapper, WeightsMeta


class FakePredictor:
    device = torch.device("cpu")

    def __init__(self):
        self.loaded: bytes | None = None

    def swap_weights(self, payload: bytes) -> None:
        if payload == b"bad":
            raise WeightsError("not_safetensors", "bad")
        self.loaded = bytes(payload)


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def meta(batch: int) -> WeightsMeta:
    return WeightsMeta("tiny", "tiny_v1", batch, 0.0, str(batch))


def swapper(policy: str, **kw) -> tuple[Swapper, Clock]:
    clock = Clock()
    return Swapper(FakePredictor, policy, clock=clock, **kw), clock


@pytest.mark.parametrize("policy", ["unstuck", "immediate", "every_s"])
def test_first_weights_take_over_at_once_whatever_the_policy(policy):
    s, _ = swapper(policy)
    assert s.active is None and not s.maybe_swap(driving=True)
    s.load(b"w1", meta(1))
    assert s.maybe_swap(driving=True) and s.active.loaded == b"w1" and s.swaps == 0 and s.lag == 0


def test_unstuck_policy_waits_for_a_non_driving_frame_or_the_max_wait():
    s, clock = swapper("unstuck", max_wait_s=60.0)
    s.load(b"w1", meta(1))
    s.maybe_swap(True)
    first = s.active
    s.load(b"w2", meta(2))
    assert not s.maybe_swap(True) and s.active is first and s.lag == 1 and s.pending.batch == 2
    assert s.maybe_swap(False) and s.active.loaded == b"w2" and s.active is not first and s.swaps == 1
    s.load(b"w3", meta(3))  # loads into the predictor the old weights left free
    assert s.active.loaded == b"w2" and first.loaded == b"w3"
    clock.t = 59.0
    assert not s.maybe_swap(True)
    clock.t = 61.0
    assert s.maybe_swap(True) and s.active is first and s.meta.batch == 3


def test_newer_weights_replace_ready_ones_that_were_not_swapped_in():
    s, _ = swapper("unstuck")
    s.load(b"w1", meta(1))
    s.maybe_swap(True)
    s.load(b"w2", meta(2))
    s.load(b"w3", meta(3))
    assert len(s.predictors) == 2, "never more than two models"
    assert s.maybe_swap(False) and s.active.loaded == b"w3" and s.swaps == 1


def test_every_s_policy_spaces_the_swaps():
    s, clock = swapper("every_s", every_s=10.0)
    s.load(b"w1", meta(1))
    s.maybe_swap(True)
    s.load(b"w2", meta(2))
    clock.t = 5.0
    assert not s.maybe_swap(False)
    clock.t = 10.0
    assert s.maybe_swap(True) and s.meta.batch == 2


def test_immediate_policy_swaps_on_the_next_frame():
    s, _ = swapper("immediate")
    s.load(b"w1", meta(1))
    s.maybe_swap(True)
    s.load(b"w2", meta(2))
    assert s.maybe_swap(True) and s.meta.batch == 2 and s.swaps == 1


def test_a_refused_load_changes_nothing():
    s, _ = swapper("immediate")
    s.load(b"w1", meta(1))
    s.maybe_swap(True)
    with pytest.raises(WeightsError):
        s.load(b"bad", meta(2))
    assert not s.maybe_swap(True) and s.meta.batch == 1 and s.newest.batch == 1 and len(s.predictors) == 2


def test_weights_feed_refuses_untrusted_senders_and_older_batches_and_counts_them():
    from charles import config
    from charles.model.presets import get_config
    from charles.player.swap import WeightsFeed
    from charles.proto.codec import Envelope
    from charles.runtime import Service

    from tests_support import weights_message

    cfg = get_config("tiny", width=64, height=36)
    svc = Service("player", config.load(data={}, environ={}), "player-t", http=False, signals=False)
    try:
        s, _ = swapper("immediate")
        feed = WeightsFeed(svc, s, cfg, trusted=["trainer"])

        def env(batch: int, sender: str) -> Envelope:
            w = weights_message(f"w{batch}".encode(), batch, cfg)
            return Envelope("weights.tiny", "weights", sender, 0.0, 0.0, w, 0)

        assert feed.handle(env(5, "trainer-gpu0"))  # a trainer key's instance: vouched
        assert not feed.handle(env(6, "capture-agent"))  # any other sender: refused
        assert not feed.handle(env(7, "trainerx"))  # a look-alike name is not the trainer key's
        assert not feed.handle(env(3, "trainer-gpu0"))  # an older batch of the run we have: a replay
        assert feed.handle(env(6, "trainer"))
        count = svc.metrics.registry.get_sample_value
        assert count("charles_rejects_total", {"reason": "weights_sender_not_allowed"}) == 2
        assert count("charles_rejects_total", {"reason": "older_batch"}) == 1
        assert s.newest.batch == 6 and feed.refused == 3
        # configured to take older batches (a deliberate rollback), it does
        feed.accept_older = True
        assert feed.handle(env(4, "trainer"))
    finally:
        svc.close()


def test_weights_of_another_line_on_our_topic_are_refused_as_such_whatever_version_is_followed():
    """A forged weights message naming another model line is bad input (``wrong_model``), counted as a
    reject even when it claims a version this player does not follow (then it is no mere ``not_followed``)."""
    from charles import config
    from charles.model.presets import get_config
    from charles.player.swap import WeightsFeed
    from charles.proto.codec import Envelope
    from charles.runtime import Service

    from tests_support import weights_message

    cfg = get_config("tiny", width=64, height=36)
    svc = Service("player", config.load(data={}, environ={}), "player-t", http=False, signals=False)
    try:
        s, _ = swapper("immediate")
        feed = WeightsFeed(svc, s, cfg)
        good = weights_message(b"w5", 5, cfg)
        good.since = 100.0
        assert feed.handle(Envelope("weights.tiny.v1", "weights", "trainer", 0.0, 0.0, good, 0))
        forged = weights_message(b"w9", 9, cfg, model="tiny_memory")
        forged.run, forged.since = "tiny_memory_v2", 50.0  # a version whose stream started earlier: a
        # genuine message like it would be passed by as not followed
        assert not feed.handle(Envelope("weights.tiny", "weights", "trainer", 0.0, 0.0, forged, 0))
        count = svc.metrics.registry.get_sample_value
        assert count("charles_rejects_total", {"reason": "wrong_model"}) == 1
        assert not count("charles_drops_total", {"cause": "not_followed"})
        assert s.newest.batch == 5
    finally:
        svc.close()
