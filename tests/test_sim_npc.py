"""NPC autopilot: drives on the road, turns, minds its sensors; noise perturbs only the executed action."""

from __future__ import annotations

import math

import numpy as np
import pytest

from charles.sim.config import NpcConfig, SimConfig
from charles.sim.npc import Npc
from charles.sim.town import ROAD, WATER
from charles.sim.world import SimWorld

SMALL = dict(blocks=3)


def drive(world: SimWorld, npc: Npc, steps: int):
    labels, executed, on_road = [], [], 0
    for _ in range(steps):
        label, ex = npc.act()
        info = world.step(*ex)
        labels.append(label)
        executed.append(ex)
        on_road += info.on_road
    return np.array(labels), np.array(executed), on_road / steps


def test_npc_drives_a_distance_on_the_road_and_turns():
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    npc = Npc(world, cfg=NpcConfig(noise_rate_hz=0.0))
    headings = []
    for _ in range(6):  # 6 x 10 s
        drive(world, npc, 300)
        headings.append(world.player.heading)
    assert world.odometer_m > 400.0  # ~40 km/h average with slow-downs for turns
    assert world.collisions == 0 and world.water_entries == 0
    turned = np.abs(np.angle(np.exp(1j * np.diff(headings)))).max()
    assert turned > math.radians(45)  # it took at least one junction or curve
    assert (
        world.targets_reached >= 1
        or math.hypot(*np.subtract(world.target, (world.player.x, world.player.y))) < 600
    )


def test_npc_stays_on_road_with_traffic_and_noise():
    world = SimWorld(SimConfig(**SMALL, traffic=2))
    npc = Npc(world)  # default config: noise on
    _, _, on_road = drive(world, npc, 1200)
    assert on_road >= 0.95
    assert world.odometer_m > 250.0


def test_noise_perturbs_executed_not_label():
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    npc = Npc(world, cfg=NpcConfig(noise_rate_hz=2.0, noise_steering=0.5, noise_throttle=0.0))
    labels, executed, _ = drive(world, npc, 600)
    diff = executed[:, 0] - labels[:, 0]
    noisy = np.abs(diff) > 1e-9
    assert 0.2 < noisy.mean() < 0.98  # events come and go
    # The offset is constant within an event (up to clipping at the stick's range), at least half the max.
    assert np.abs(diff[noisy]).max() <= 0.5 + 1e-9
    unclipped = noisy & (np.abs(executed[:, 0]) < 1.0)
    assert (np.abs(diff[unclipped]) >= 0.25 - 1e-9).all()
    # Labels are the corrective action: where noise pushes one way, the label leans the other way.
    assert np.corrcoef(diff[noisy], labels[noisy, 0])[0, 1] < 0
    # Throttle noise off: throttle labels and executed agree.
    assert np.array_equal(labels[:, 1], executed[:, 1])


def test_noise_free_npc_executes_its_label():
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    labels, executed, _ = drive(world, Npc(world, cfg=NpcConfig(noise_rate_hz=0.0)), 150)
    assert np.array_equal(labels, executed)


def test_sensors_brake_for_a_wall_ahead():
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    town = world.town
    rng = np.random.default_rng(0)
    # A pose on the road moving at 12 m/s straight at something solid or water 15-25 m ahead.
    for _ in range(5000):
        x, y, hd = town.random_road_pose(rng)
        hd += rng.uniform(-2.0, 2.0)
        s = np.arange(2.5, 25.0, 0.5)
        ray = town.surface(x + np.cos(hd) * s, y + np.sin(hd) * s)
        hit = np.nonzero(ray >= WATER)[0]
        if len(hit) and s[hit[0]] > 15.0 and (ray[: hit[0]] == ROAD).sum() > 4:
            break
    p = world.player
    p.x, p.y, p.heading, p.speed = x, y, hd, 12.0
    npc = Npc(world, cfg=NpcConfig(noise_rate_hz=0.0))
    label, _ = npc.act()
    assert npc.sensors["hazard"][2:5].min() < 25.0
    assert label[1] < 0.0 and npc.overridden  # brakes
    blind = Npc(world, cfg=NpcConfig(noise_rate_hz=0.0, sensors=False))
    blind.act()
    assert not blind.overridden


@pytest.mark.parametrize("style", ["calm", "aggressive"])
def test_styles_change_speed(style):
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    npc = Npc(world, cfg=NpcConfig(style=style, noise_rate_hz=0.0))
    drive(world, npc, 600)
    kmh = world.odometer_m / 20.0 * 3.6
    assert (kmh < 40.0) if style == "calm" else (kmh > 35.0)


def test_npc_replans_after_teleport():
    world = SimWorld(SimConfig(**SMALL, traffic=0))
    npc = Npc(world, cfg=NpcConfig(noise_rate_hz=0.0))
    drive(world, npc, 100)
    world.teleport(np.random.default_rng(3))
    _, _, on_road = drive(world, npc, 300)
    assert on_road > 0.95 and world.player.speed > 3.0
