"""The generated town: deterministic from its seed, streets connected, teleports land on the road."""

from __future__ import annotations

import math

import numpy as np
import pytest

from charles.sim.config import SimConfig
from charles.sim.town import BUILDING, OBSTACLE, ROAD, TERRAIN, WATER, build_town

SMALL = SimConfig(blocks=3, traffic=0)


@pytest.fixture(scope="module")
def town():
    return build_town(SMALL)


def test_same_seed_same_town_other_seed_other_town(town):
    from charles.sim.town import _generate, town_key

    again = _generate(*town_key(SMALL))  # bypass the cache: really generate twice
    assert np.array_equal(again.texture, town.texture)
    assert np.array_equal(again.classes, town.classes)
    assert np.array_equal(again.boxes.corners, town.boxes.corners)
    other = build_town(SimConfig(blocks=3, seed=1))
    assert not np.array_equal(other.classes, town.classes)


def test_town_has_every_kind_of_surface(town):
    counts = np.bincount(town.classes.ravel(), minlength=5)
    for cls in (TERRAIN, ROAD, WATER, BUILDING, OBSTACLE):
        assert counts[cls] > 0, cls
    assert town.buildings >= 10 and town.obstacles >= 5
    assert town.texture.dtype == np.uint8 and town.texture.shape[2] == 3


def test_streets_have_curves_and_junctions(town):
    degrees = np.bincount(np.array(town.edges).ravel())
    assert degrees.min() >= 2  # no dead ends: NPCs never need a U-turn
    assert (degrees >= 3).any()  # junctions
    # Curved streets: the centre line deviates from the chord between its ends.
    bends = []
    for line in town.centerlines:
        a, b = line[0], line[-1]
        d = b - a
        off = np.abs((line[:, 0] - a[0]) * d[1] - (line[:, 1] - a[1]) * d[0]) / np.linalg.norm(d)
        bends.append(off.max())
    assert max(bends) > 10.0 and min(bends) < 0.5


def test_lanes_are_on_the_road_and_routes_exist(town):
    for lane in town.lanes:
        assert (town.surface(*lane.points.T) == ROAD).all()
    route = town.route(0, len(town.lanes) - 1)
    assert route[-1] == len(town.lanes) - 1
    for a, b in zip([0, *route[:-1]], route, strict=True):
        assert town.lanes[a].head == town.lanes[b].tail  # consecutive lanes share their junction
        assert town.lanes[b].head != town.lanes[a].tail  # and never a U-turn


def test_random_road_pose_is_on_road_along_the_lane_and_repeatable(town):
    rng = np.random.default_rng(5)
    poses = [town.random_road_pose(rng) for _ in range(200)]
    for x, y, hd in poses:
        assert town.surface_at(x, y) == ROAD
        lane, idx, dist = town.nearest_lane(x, y, hd)
        assert dist < 0.01
        assert math.cos(hd - town.lanes[lane].headings[idx]) > 0.99
    assert poses[:5] == [town.random_road_pose(r) for r in [np.random.default_rng(5)] for _ in range(5)]


def test_outside_the_map_is_sea(town):
    assert (town.surface(np.array([-50.0, town.size_m + 50]), np.array([10.0, 10.0])) == WATER).all()
    assert town.surface_at(-1.0, -1.0) == WATER
