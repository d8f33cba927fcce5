"""The generated town: deterministic from its seed, streets connected, teleports land on the road."""

from __future__ import annotations

import hashlib
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


PINNED = SimConfig(blocks=3, lakes=1, seed=3, texture_res_m=0.5, class_res_m=1.0)
"""A town with every step of the build in it (curves, removed streets, a lake, buildings, obstacles) that
builds in well under a second."""
PINNED_SHA256 = {
    "nodes": "7e4f33d58909a2f1",
    "edges": "1633a89ac4eeaf3d",
    "centerlines": "250ddee9e9a63623",
    "lanes": "651b4cb1a3e3ecba",
    "lane_ends": "941c3e5d8aa2bf48",
    "out_lanes": "91a47261f9bd613c",
    "boxes": "c3b2fa329d0c0fa4",
    "classes": "3f5c4f3ce697bb4c",
    "texture": "94e2468a3862f863",
}
"""First 16 hex digits of each part's SHA-256, recorded from ``_generate`` before it was split into its steps (the split
changed no byte). They hold for the pinned numpy and opencv (constraints.txt); a town that changes on
purpose (or with an upgrade of either) records new ones here, and says why in its commit."""


def _digests(town) -> dict[str, str]:
    def sha(*arrays: np.ndarray) -> str:
        h = hashlib.sha256()
        for a in arrays:
            a = np.ascontiguousarray(a)
            h.update(f"{a.dtype}{a.shape}".encode())
            h.update(a.tobytes())
        return h.hexdigest()[:16]

    lanes = town.lanes
    return {
        "nodes": sha(town.nodes),
        "edges": sha(np.array(town.edges)),
        "centerlines": sha(*town.centerlines),
        "lanes": sha(*[ln.points for ln in lanes], *[ln.headings for ln in lanes]),
        "lane_ends": sha(np.array([(ln.tail, ln.head) for ln in lanes])),
        "out_lanes": sha(*[np.array(town.out_lanes[k]) for k in sorted(town.out_lanes)]),
        "boxes": sha(*(getattr(town.boxes, k) for k in ("corners", "z0", "z1", "colors", "bias"))),
        "classes": sha(town.classes),
        "texture": sha(town.texture),
    }


def test_a_town_is_the_same_bytes_it_was():
    from charles.sim.town import _generate, town_key

    town = _generate(*town_key(PINNED))
    assert (town.buildings, town.obstacles, (town.classes == WATER).any()) == (64, 37, True)
    assert _digests(town) == PINNED_SHA256


def test_a_cancelled_build_raises_at_its_next_step_and_is_not_cached():
    from charles.sim import town as town_mod

    cfg = SimConfig(blocks=2, seed=12345, texture_res_m=1.0, class_res_m=1.0)  # a key nobody else builds
    asked = 0

    def stop_on_the_fifth_question() -> bool:
        nonlocal asked
        asked += 1
        return asked >= 5

    with pytest.raises(town_mod.BuildCancelled):
        build_town(cfg, should_stop=stop_on_the_fifth_question)
    assert asked == 5  # it stopped asking (and building) at the first yes
    assert town_mod.town_key(cfg) not in town_mod._towns
    built = build_town(cfg, should_stop=lambda: False)
    assert build_town(cfg, should_stop=lambda: True) is built  # a cached town needs no build to cancel
