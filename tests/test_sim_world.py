"""The car and the world: dynamics, collisions, water, purpose, teleport."""

from __future__ import annotations

import math

import numpy as np
import pytest

from charles.sim.car import DT, Car
from charles.sim.config import SimConfig
from charles.sim.town import BUILDING, ROAD, WATER
from charles.sim.world import SimWorld

SMALL = dict(blocks=3, traffic=0)


@pytest.fixture()
def world():
    return SimWorld(SimConfig(**SMALL))


def test_throttle_accelerates_brake_stops_no_reverse():
    car = Car(0.0, 0.0, 0.0)
    for _ in range(90):  # 3 s of full throttle
        car.x, car.y, car.heading, car.speed, car.wheel = car.propose(0.0, 1.0, on_road=True)
    assert 10.0 < car.speed < 20.0  # 0-100 km/h in ~7 s
    assert car.x > 10.0 and abs(car.y) < 1e-6
    for _ in range(60):
        car.x, car.y, car.heading, car.speed, car.wheel = car.propose(0.0, -1.0, on_road=True)
    assert car.speed == 0.0  # 9 m/s^2 stops it within 2 s and it does not reverse


def test_steering_sign_and_offroad_drag():
    left, right = Car(0.0, 0.0, 0.0, speed=10.0), Car(0.0, 0.0, 0.0, speed=10.0)
    for _ in range(30):
        left.x, left.y, left.heading, left.speed, left.wheel = left.propose(-1.0, 0.3, on_road=True)
        right.x, right.y, right.heading, right.speed, right.wheel = right.propose(1.0, 0.3, on_road=True)
    assert left.heading > 0.3 and left.y > 0  # negative steering turns left (counter-clockwise)
    assert right.heading < -0.3 and right.y < 0
    road, grass = Car(0.0, 0.0, 0.0, speed=15.0), Car(0.0, 0.0, 0.0, speed=15.0)
    for _ in range(30):
        road.speed = road.propose(0.0, 0.0, on_road=True)[3]
        grass.speed = grass.propose(0.0, 0.0, on_road=False)[3]
    assert grass.speed < road.speed - 0.5


def _find_approach(world: SimWorld, target_class: int, rng: np.random.Generator):
    """A pose on clear ground facing a surface of ``target_class`` 8-20 m ahead, with nothing else between."""
    town = world.town
    for _ in range(20000):
        x, y = rng.uniform(0, town.size_m, 2)
        if town.surface_at(x, y) not in (ROAD, 0):
            continue
        for hd in np.linspace(-math.pi, math.pi, 16, endpoint=False):
            s = np.arange(0.0, 20.0, 0.25)
            ray = town.surface(x + np.cos(hd) * s, y + np.sin(hd) * s)
            hit = np.nonzero(ray >= WATER)[0]
            if len(hit) and s[hit[0]] >= 8.0 and ray[hit[0]] == target_class:
                car = Car(x, y, hd)
                side = town.surface(*car.footprint().T)
                if (side < WATER).all():
                    return x, y, float(hd)
    raise AssertionError("no approach found")


def test_collision_with_a_building_stops_the_car_outside_it(world):
    x, y, hd = _find_approach(world, BUILDING, np.random.default_rng(1))
    p = world.player
    p.x, p.y, p.heading = x, y, hd
    infos = [world.step(0.0, 1.0) for _ in range(150)]
    assert any(i.collided for i in infos)
    assert sum(i.new_collision for i in infos) == world.collisions >= 1
    assert p.speed < 3.0  # pinned against the wall
    assert (world.town.surface(*p.footprint().T) != BUILDING).all()  # never inside it


def test_driving_into_water_is_detected_and_the_car_stays(world):
    x, y, hd = _find_approach(world, WATER, np.random.default_rng(2))
    p = world.player
    p.x, p.y, p.heading = x, y, hd
    infos = [world.step(0.0, 1.0) for _ in range(150)]
    entered = [i.entered_water for i in infos]
    assert sum(entered) == 1 and world.water_entries == 1
    k = entered.index(True)
    assert all(i.in_water for i in infos[k:])
    assert p.speed < 0.1  # sunk: no driving out
    world.teleport()
    assert not p.in_water and world.on_road


def test_purpose_angle_sign_and_distance(world):
    p = world.player
    p.x, p.y, p.heading = 100.0, 100.0, 0.0
    world.target = (100.0, 150.0)  # due north while facing east: 90 degrees to the left
    angle, dist = world.purpose()
    assert angle == pytest.approx(math.pi / 2) and dist == pytest.approx(50.0)
    world.target = (100.0, 50.0)
    assert world.purpose()[0] == pytest.approx(-math.pi / 2)


def test_reaching_the_target_picks_a_new_one_far_away(world):
    p = world.player
    old = world.target
    p.x, p.y = old[0] + 1.0, old[1]
    info = world.step(0.0, 0.0)
    assert info.target_reached and world.targets_reached == 1 and world.target != old
    assert math.hypot(world.target[0] - p.x, world.target[1] - p.y) >= world.cfg.purpose_min_m


def test_teleport_lands_on_road_at_rest_and_is_repeatable(world):
    p = world.player
    poses = []
    for seed in (4, 4, 9):
        world.teleport(np.random.default_rng(seed))
        assert world.on_road and p.speed == 0.0
        poses.append((p.x, p.y, p.heading))
    assert poses[0] == poses[1] != poses[2]


def test_same_seed_same_trajectory_with_traffic():
    def run() -> list[tuple[float, ...]]:
        w = SimWorld(SimConfig(blocks=3, traffic=2))
        out = []
        for k in range(120):
            w.step(math.sin(k / 10) * 0.3, 0.7)
            out.append((w.player.x, w.player.y, *(c.x for c in w.traffic)))
        return out

    assert run() == run()


def test_reset_keeps_town_and_player_object(world):
    p, town = world.player, world.town
    world.reset(7)
    a = (p.x, p.y)
    world.reset(7)
    assert world.player is p and world.town is town and (p.x, p.y) == a
    world.reset(8)
    assert (p.x, p.y) != a


def test_step_is_one_thirtieth_of_a_second(world):
    for _ in range(30):
        world.step(0.0, 0.0)
    assert world.time == pytest.approx(1.0) and pytest.approx(1 / 30) == DT


def test_displace_turns_and_shifts_the_car_to_a_clear_pose_at_rest(world):
    from charles.drive.controls import wrap_angle

    turns, offsets = [], []
    for _ in range(40):
        world.teleport()
        p = world.player
        x0, y0, h0 = p.x, p.y, p.heading
        p.speed = 3.0
        assert world.displace(math.radians(60), 2.0)
        turn = wrap_angle(p.heading - h0)
        side = -(p.x - x0) * math.sin(h0) + (p.y - y0) * math.cos(h0)
        ahead = (p.x - x0) * math.cos(h0) + (p.y - y0) * math.sin(h0)
        assert abs(turn) <= math.radians(60) + 1e-9 and abs(side) <= 2.0 + 1e-9 and abs(ahead) < 1e-6
        assert p.speed == 0.0 and p.wheel == 0.0, "at rest, wheels straight"
        surf = world.town.surface(*p.footprint().T)
        assert (surf < WATER).all(), "never into a wall or the water"
        turns.append(turn)
        offsets.append(side)
    assert max(map(abs, turns)) > math.radians(40) and max(map(abs, offsets)) > 1.5, "it uses its range"
    assert min(turns) < 0 < max(turns), "both ways"


def test_displace_gives_up_without_moving_the_car_when_no_pose_is_clear(world):
    p = world.player
    before = (p.x, p.y, p.heading)
    assert not world.displace(math.radians(60), 2.0, tries=0)
    assert (p.x, p.y, p.heading) == before
