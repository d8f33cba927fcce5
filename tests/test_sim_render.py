"""Cameras: shapes and types, and that weather, time, the marker and the fade change the picture."""

from __future__ import annotations

import numpy as np
import pytest

from charles.sim.config import SimConfig
from charles.sim.render import Lighting
from charles.sim.world import SimWorld

SMALL = dict(blocks=3, traffic=1)


@pytest.fixture(scope="module")
def world():
    return SimWorld(SimConfig(**SMALL))


def test_hood_and_cinematic_shapes_and_dtypes(world):
    hood = world.hood_frame()
    assert hood.shape == (270, 480, 3) and hood.dtype == np.uint8
    cine = world.cinematic_frame()
    assert cine.shape == (360, 640, 3) and cine.dtype == np.uint8
    small = SimWorld(
        SimConfig(**SMALL, hood_width=160, hood_height=90, cinematic_width=320, cinematic_height=180)
    )
    assert small.hood_frame().shape == (90, 160, 3)
    assert small.cinematic_frame().shape == (180, 320, 3)
    # The picture has content, and the car spawns on a lane: just above the bonnet is grey asphalt.
    assert hood.std() > 10
    road = hood[int(0.8 * 270), 200:280].astype(float).mean(axis=0)
    assert road.max() - road.min() < 20 and 40 < road.mean() < 140


def test_frames_are_deterministic_and_depend_on_the_seed():
    a, b = SimWorld(SimConfig(**SMALL)), SimWorld(SimConfig(**SMALL))
    for _ in range(10):
        a.step(0.2, 0.8)
        b.step(0.2, 0.8)
    assert np.array_equal(a.hood_frame(), b.hood_frame())
    assert np.array_equal(a.cinematic_frame(), b.cinematic_frame())
    c = SimWorld(SimConfig(**SMALL, seed=3))
    assert not np.array_equal(a.hood_frame(), c.hood_frame())


def _diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


@pytest.mark.parametrize(
    "weather,hour", [("overcast", 13.0), ("rain", 13.0), ("fog", 13.0), ("clear", 23.0), ("clear", 6.5)]
)
def test_weather_and_time_change_the_picture(weather, hour):
    base = SimWorld(SimConfig(**SMALL))
    other = SimWorld(SimConfig(**SMALL, weather=weather, time_of_day=hour))
    assert _diff(base.hood_frame(), other.hood_frame()) > 8.0
    if hour == 23.0:
        assert other.hood_frame().mean() < 0.5 * base.hood_frame().mean()  # night is dark


def test_set_appearance_changes_the_look_in_place(world):
    before = world.hood_frame()
    world.set_appearance(weather="fog", time_of_day=18.5, car_color=(20, 200, 20))
    after = world.hood_frame()
    world.set_appearance(weather="clear", time_of_day=13.0)
    assert _diff(before, after) > 8.0
    assert world.player.color == (20, 200, 20)


def test_purpose_marker_toggles(world):
    on, off = world.hood_frame(marker=True), world.hood_frame(marker=False)
    assert not np.array_equal(on, off)
    changed = np.abs(on.astype(int) - off.astype(int)).sum(axis=2) > 0
    assert changed[: on.shape[0] // 5].any()  # the arrow sits at the top


def test_fade_darkens_to_black(world):
    assert world.hood_frame(fade=0.0).max() == 0
    half = world.hood_frame(fade=0.5).astype(float).mean()
    assert 0.4 < half / world.hood_frame().astype(float).mean() < 0.6


def test_lighting_rejects_unknown_weather():
    with pytest.raises(ValueError):
        Lighting.of("snowstorm", 12.0)
    with pytest.raises(ValueError):
        SimConfig(weather="snowstorm")
