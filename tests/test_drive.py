"""charles.drive's rules, each pinned once: controls, the history ring, the frame stack, the sample builder
with stand-ins, and the player's decision table (a plain class: no Service, no sockets)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from charles.drive.controls import (
    clamp,
    clean_control,
    clean_purpose,
    combine,
    control_pair,
    signals,
    split,
    wrap_angle,
)
from charles.drive.past import FrameStack, History
from charles.drive.samples import Capture, SampleBuilder
from charles.drive.shape import InputShape
from charles.drive.unstuck import Phase
from charles.player.decide import Decider
from charles.player.gamepad import BRAKE_PAD
from charles.sim.session import BRAKE

# ---------------------------------------------------------------------------------------------- controls


@pytest.mark.parametrize("tb", [-1.0, -0.4, 0.0, 0.3, 1.0])
def test_split_and_combine_are_inverse_and_one_trigger_is_always_released(tb):
    throttle, brake = split(tb)
    assert min(throttle, brake) == 0.0 and throttle >= 0.0 and brake >= 0.0
    assert combine(throttle, brake) == pytest.approx(tb)
    assert signals(0.2, tb) == {"steering": 0.2, "throttle_brake": tb, "throttle": throttle, "brake": brake}


def test_broken_values_never_floor_a_pedal():
    assert clean_control(float("nan")) == 0.0 and clamp(float("inf"), 0.0, 1.0) == 0.0
    assert combine(1.0, 0.0) == 1.0 and combine(0.2, 0.9) == pytest.approx(-0.7) and combine(2.0, 0.0) == 1.0
    assert control_pair({"steering": 3.0, "throttle": 0.5, "brake": 0.2}) == pytest.approx((1.0, 0.3))
    assert control_pair({"throttle_brake": -0.5}) == (0.0, -0.5)


def test_one_angle_wrap_for_floats_and_arrays():
    assert wrap_angle(math.pi) == pytest.approx(-math.pi) and wrap_angle(3 * math.pi / 2) == pytest.approx(
        -math.pi / 2
    )
    a = np.array([0.0, 2 * math.pi + 0.1, -math.pi - 0.1])
    np.testing.assert_allclose(wrap_angle(a), [0.0, 0.1, math.pi - 0.1])
    assert clean_purpose((7.0, -5.0)) == (pytest.approx(7.0 - 2 * math.pi), 0.0)


# ---------------------------------------------------------------------------------------------- the past


def test_history_rows_shift_oldest_first():
    h = History(3)
    for k in range(4):
        h.push((k, -k), 10.0 + k, (0.1, 5.0))
    np.testing.assert_allclose(h.copy()[:, :3], [[1, -1, 11], [2, -2, 12], [3, -3, 13]])
    assert len(History(0)) == 0  # a line without history: pushes are no-ops
    History(0).push((0.0, 0.0), 0.0, (0.0, 0.0))


def test_frame_stack_stands_in_with_the_oldest_or_now():
    fs = FrameStack(3, 2)
    assert fs.past() == [] and fs.past((0, "now")) == [(0, "now"), (0, "now")]
    for t in range(3):
        fs.push(t, f"f{t}")
    assert not fs.full and fs.past() == [(0, "f0"), (1, "f1")]
    fs.push(3, "f3")
    assert fs.full and fs.past() == [(0, "f0"), (2, "f2")]


def test_a_builder_that_does_not_wait_emits_from_the_first_tick():
    shape = InputShape(4, 2, frames=3, frame_stride=1, history_rows=2)
    waiting, eager = SampleBuilder(shape), SampleBuilder(shape, wait_for_stack=False)
    img = np.zeros((2, 4, 3), np.uint8)
    caps = [Capture(k / 30, img + k, (0.1, 0.2), (0.1, 0.2), 3.0, (0.0, 1.0)) for k in range(3)]
    assert [waiting.push(c) is not None for c in caps] == [False, False, True]
    got = [eager.push(c) for c in caps]
    assert [[t for t, _ in p.stack] for p in got] == [[0, 0], [0, 0], [0, 1]]
    assert got[0].previous is None and got[1].previous == (0.1, 0.2)


# ---------------------------------------------------------------------------------------------- decisions


class FakePolicy:
    """What the decider asks of a ModelPolicy: see, call, the stack, the last outputs."""

    def __init__(self, frames: int = 2):
        self.stack = FrameStack(frames, 1)
        self.predictor = None
        self.seen = 0
        self.last_raw = {"steering": np.array([0.25])}
        self.last_controls = {"steering": 0.25, "throttle_brake": 0.5}

    def see(self, frame):
        self.seen += 1
        self.stack.push(self.seen, frame)

    def __call__(self, frame, speed, purpose, history, previous):
        self.see(frame)
        return 0.25, 0.5


class FakeGame:
    def __init__(self, expert=((0.1, -1.0), (0.2, 0.3))):
        self._expert = expert
        self.held = 0

    def expert(self):
        return self._expert

    def hold_unstuck(self):
        self.held += 1


def view(driving=True, speed=5.0):
    phase = Phase.DRIVE if driving else Phase.FADE_OUT
    return SimpleNamespace(
        frame=np.zeros((2, 4, 3), np.uint8),
        speed=speed,
        purpose=(0.0, 1.0),
        history=np.zeros((0, 5), np.float32),
        previous=(0.0, 0.0),
        driving=driving,
        unstuck=SimpleNamespace(phase=phase),
    )


def test_unstuck_brakes_and_the_stack_still_moves():
    policy = FakePolicy()
    d = Decider(policy, FakeGame()).decide(view(driving=False), predictor=object())
    assert (d.driver, d.action, d.pad) == ("brake", BRAKE, BRAKE_PAD)
    assert d.status == f"unstuck: {Phase.FADE_OUT.value}" and policy.seen == 1 and d.raw is None


def test_before_weights_the_npc_drives_or_the_car_stands_on_purpose():
    game = FakeGame()
    d = Decider(FakePolicy(), game, before_weights="npc").decide(view(), predictor=None)
    assert d.driver == "expert" and d.action == (0.2, 0.3)  # the expert's executed action
    assert (d.pad.throttle, d.pad.brake) == pytest.approx((0.3, 0.0)) and game.held == 0
    d = Decider(FakePolicy(), game, before_weights="brake").decide(view(), predictor=None)
    assert d.driver == "brake" and d.action == BRAKE and game.held == 1 and d.status == "waiting for weights"
    silent = FakeGame(expert=None)
    assert Decider(FakePolicy(), silent, before_weights="npc").decide(view(), None).driver == "brake"
    assert silent.held == 1


def test_the_model_drives_with_weights_and_teaches_only_when_it_moves():
    policy, game = FakePolicy(frames=2), FakeGame()
    decider = Decider(policy, game, dagger=True, deadzones={"throttle": 0.1})
    first = decider.decide(view(), predictor="p1")
    assert first.driver == "model" and first.action == (0.25, 0.5) and first.raw is policy.last_raw
    assert first.pad.throttle == pytest.approx(0.1 + 0.9 * 0.5) and policy.predictor == "p1"
    assert first.stack is None and decider.demonstration(view(), first) is None  # the stack was not full
    second = decider.decide(view(), predictor="p2")
    assert [t for t, _ in second.stack] == [1] and policy.predictor == "p2"  # the frame before this one
    assert decider.demonstration(view(speed=5.0), second) == (0.1, -1.0)
    # standing, and the expert would stand on the brake: nothing to learn
    assert decider.demonstration(view(speed=0.1), second) is None and decider.skipped == 1
    keep = Decider(policy, game, dagger=True, skip_standstill=False)
    assert keep.demonstration(view(speed=0.1), second) == (0.1, -1.0) and keep.skipped == 0
    assert Decider(policy, game, dagger=False).decide(view(), "p").stack is None
