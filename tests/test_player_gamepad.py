"""Decoded outputs -> car controls and gamepad values: dead-zone compensation and the two triggers."""

from __future__ import annotations

import math

import pytest

from charles.config import ConfigError
from charles.config import load as load_config
from charles.drive.controls import control_pair
from charles.player.gamepad import BRAKE_PAD, Gamepad, compensate, to_gamepad


@pytest.mark.parametrize(
    ("x", "dz", "sent"),
    [
        (0.0, 0.2, 0.0),  # centred stays centred: no creeping out of the dead zone
        (1.0, 0.2, 1.0),
        (-1.0, 0.2, -1.0),
        (0.5, 0.2, 0.6),  # 0.2 + 0.8 * 0.5
        (-0.5, 0.2, -0.6),
        (0.01, 0.25, 0.2575),  # a tiny prediction lands just past the dead zone, not inside it
        (-0.01, 0.25, -0.2575),
        (0.5, 0.0, 0.5),  # no dead zone: unchanged
        (1.7, 0.2, 1.0),  # out of range: clipped
        (float("nan"), 0.2, 0.0),
    ],
)
def test_dead_zone_compensation(x, dz, sent):
    assert compensate(x, dz) == pytest.approx(sent)


def test_compensated_values_read_back_as_the_prediction():
    """What the game reads (|x| < dz -> 0, dz..1 -> 0..1) is the prediction itself."""
    dz = 0.24
    for x in (-0.9, -0.3, -0.001, 0.002, 0.4, 1.0):
        sent = compensate(x, dz)
        read = 0.0 if abs(sent) < dz else math.copysign((abs(sent) - dz) / (1 - dz), sent)
        assert read == pytest.approx(x)


DZ = {"steering": 0.2, "throttle": 0.1, "brake": 0.3}


@pytest.mark.parametrize(
    ("controls", "pad", "car"),
    [
        ({"steering": 0.0, "throttle_brake": 0.0}, (0.0, 0.0, 0.0), (0.0, 0.0)),
        (
            {"steering": 0.5, "throttle_brake": 0.5},
            (0.6, 0.55, 0.0),
            (0.5, 0.5),
        ),  # throttle: right trigger only
        (
            {"steering": -0.5, "throttle_brake": -0.5},
            (-0.6, 0.0, 0.65),
            (-0.5, -0.5),
        ),  # brake: left trigger only
        ({"steering": 1.0, "throttle_brake": 1.0}, (1.0, 1.0, 0.0), (1.0, 1.0)),
        ({"steering": -1.0, "throttle_brake": -1.0}, (-1.0, 0.0, 1.0), (-1.0, -1.0)),
        # the seed's 3-output lines: both triggers predicted; the car gets throttle - brake
        ({"steering": 0.25, "throttle": 0.5, "brake": 0.2}, (0.4, 0.55, 0.44), (0.25, 0.3)),
        ({"steering": 0.0, "throttle": 0.0, "brake": 1.0}, (0.0, 0.0, 1.0), (0.0, -1.0)),
    ],
)
def test_outputs_to_pad_and_car(controls, pad, car):
    got = to_gamepad(controls, DZ)
    assert (got.steering, got.throttle, got.brake) == pytest.approx(pad)
    assert control_pair(controls) == pytest.approx(car)


def test_brake_pad_and_dict():
    assert Gamepad(0.0, 0.0, 1.0) == BRAKE_PAD
    assert to_gamepad({"steering": 0.1, "throttle_brake": -0.2}).as_dict() == pytest.approx(
        {"steering": 0.1, "throttle": 0.0, "brake": 0.2}
    )


def test_dead_zones_are_configured_per_axis_and_checked():
    cfg = load_config(data={"player": {"deadzone_steering": 0.2, "deadzone_brake": 0.1}}, environ={})
    assert cfg.player.deadzones == {"steering": 0.2, "throttle": 0.0, "brake": 0.1}
    with pytest.raises(ConfigError, match="deadzone_throttle"):
        load_config(data={"player": {"deadzone_throttle": 1.5}}, environ={})
    # a remote game labels DAgger frames with its autopilot's wish (GameFrame.expert): allowed
    assert load_config(data={"player": {"source": "remote", "dagger": True}}, environ={}).player.dagger
    with pytest.raises(ConfigError, match="before_weights"):
        load_config(data={"player": {"source": "remote", "before_weights": "npc"}}, environ={})
