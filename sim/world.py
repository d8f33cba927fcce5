"""The sim instance: a town, the player's car, optional NPC traffic, purpose targets and cameras.

This is the game stand-in the collectors, the player and the evaluation drive. It has the surface the
GTA V mod gives: step the car with (steering, throttle_brake) at 30 Hz of game time, read speed, position,
heading and purpose, render the hood or the cinematic camera, teleport to a random road location.

Determinism: everything random comes from numpy Generators seeded from ``SimConfig.seed`` (and the
episode seed given to :meth:`SimWorld.reset`), one stream per purpose, so the same seeds and the same
actions give identical frames and trajectories.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from charles.drive.controls import purpose, wrap_angle
from charles.drive.purpose import draw_purpose_arrow
from charles.drive.unstuck import Unstuck, UnstuckConfig
from charles.sim import render
from charles.sim.car import DT, Car
from charles.sim.config import NpcConfig, SimConfig
from charles.sim.npc import Npc
from charles.sim.town import BUILDING, ROAD, WATER, Boxes, Town, build_town

CAR_COLORS = (
    (200, 30, 30),
    (30, 80, 190),
    (230, 230, 230),
    (30, 30, 34),
    (230, 190, 40),
    (40, 140, 70),
    (150, 150, 156),
    (230, 120, 30),
)
"""Paint the player's car and the traffic get (by seed) when no colour is configured."""

PAINT_JITTER = 25
"""How far (per channel, 0-255) :func:`random_paint` may move a palette colour."""


def random_paint(rng: np.random.Generator) -> tuple[int, int, int]:
    """A palette colour with a little jitter: paint for a car whose colour should vary (domain variety).

    The hood is in every frame; a model that saw two paints in training drives worse behind a third
    (bench/e2e.py: one checkpoint drove 4.96 km between Unstucks behind a red hood, 0.15 behind a blue one,
    in the same town).
    """
    base = np.asarray(CAR_COLORS[int(rng.integers(len(CAR_COLORS)))], np.int64)
    return tuple(int(c) for c in np.clip(base + rng.integers(-PAINT_JITTER, PAINT_JITTER + 1, 3), 0, 255))


MARKER = (255, 40, 210)
"""Purpose beacon colour: a magenta nothing else in the town has."""

# Random streams: one per purpose so, for example, rendering more frames never changes where a target lands.
_TARGETS, _TELEPORT, _TRAFFIC, _LOOK, _PAINT, _DISPLACE = 1, 2, 3, 4, 5, 6


@dataclass
class StepInfo:
    """What happened to the player's car in one step."""

    collided: bool
    """Touched a building, an obstacle or another car this step."""
    new_collision: bool
    """First step of a contact: what collision counters count."""
    in_water: bool
    entered_water: bool
    on_road: bool
    distance_m: float
    """Distance driven this step (m); 0 on a teleport step."""
    target_reached: bool


class SimWorld:
    """One running sim instance. Cheap to make once the town is cached (towns are shared per seed)."""

    def __init__(
        self,
        cfg: SimConfig | None = None,
        episode_seed: int | None = None,
        *,
        should_stop: Callable[[], bool] | None = None,
        **overrides,
    ):
        """``should_stop``: asked while the town builds (seconds); True gives it up with BuildCancelled."""
        cfg = cfg or SimConfig()
        self.cfg = replace(cfg, **overrides) if overrides else cfg
        self.town: Town = build_town(self.cfg, should_stop)
        self.hood_cam = render.hood_camera(
            self.cfg.hood_width, self.cfg.hood_height, self.cfg.hood_fov_deg, self.cfg.view_distance_m
        )
        self._chase: render.Camera | None = None  # made on first use: collectors rarely need it
        look = np.random.default_rng([self.cfg.seed, _LOOK])
        self.car_color = (
            tuple(self.cfg.car_color) if self.cfg.car_color else CAR_COLORS[look.integers(len(CAR_COLORS))]
        )
        self.light = render.Lighting.of(self.cfg.weather, self.cfg.time_of_day)
        self._rng_paint = np.random.default_rng([self.cfg.seed, _PAINT])
        self._rng_displace = np.random.default_rng([self.cfg.seed, _DISPLACE])
        self._static_lit: np.ndarray | None = None
        self.episode = -1
        self.reset(episode_seed)

    # --- life cycle ---------------------------------------------------------------------------------------
    def reset(self, episode_seed: int | None = None) -> None:
        """Start an episode: player on a random road spot, fresh targets and traffic. Keeps the town."""
        base = [self.cfg.seed] if episode_seed is None else [self.cfg.seed, int(episode_seed) + 1]
        self.rng_targets = np.random.default_rng([*base, _TARGETS])
        self.rng_teleport = np.random.default_rng([*base, _TELEPORT])
        rng_traffic = np.random.default_rng([*base, _TRAFFIC])
        self.episode += 1
        self.time = 0.0
        self.steps = 0
        self.odometer_m = 0.0
        self.collisions = 0
        self.water_entries = 0
        self.targets_reached = 0
        self.teleports = 0
        x, y, hd = self.town.random_road_pose(self.rng_teleport)
        if hasattr(self, "player"):  # the same object across episodes: drivers and viewers hold on to it
            p = self.player
            p.x, p.y, p.heading, p.color = x, y, hd, self.car_color
            p.speed, p.wheel, p.in_water = 0.0, 0.0, False
        else:
            self.player = Car(x, y, hd, self.car_color)
        self._colliding = False
        self.target_id = 0
        self.target = (0.0, 0.0)
        self.target_lane = (0, 0)
        self.new_target()
        self.traffic: list[Car] = []
        self.traffic_drivers: list[Npc] = []
        self._traffic_unstuck: list[Unstuck] = []
        if self.cfg.traffic > 0:
            for k in range(self.cfg.traffic):
                for _ in range(20):  # away from the player and each other, so nobody spawns in a crash
                    tx, ty, th = self.town.random_road_pose(rng_traffic)
                    if all(math.hypot(tx - c.x, ty - c.y) > 15 for c in [self.player, *self.traffic]):
                        break
                car = Car(tx, ty, th, CAR_COLORS[rng_traffic.integers(len(CAR_COLORS))])
                self.traffic.append(car)
                cfg = NpcConfig(style=("calm", "normal", "normal", "aggressive")[k % 4], noise_rate_hz=0.0)
                self.traffic_drivers.append(Npc(self, car, cfg, np.random.default_rng([*base, _TRAFFIC, k])))
                # Traffic recovers on its own, with no fade: nobody watches a traffic car's camera.
                self._traffic_unstuck.append(
                    Unstuck(UnstuckConfig(fade_out_s=0.0, settle_s=0.0, fade_in_s=0.0))
                )

    def new_target(self) -> None:
        """Pick the next purpose target: a street centre point at least ``purpose_min_m`` away (straight line).

        ``target_lane`` keeps the lane point it came from, for NPCs routing to it (in either direction).
        """
        p = self.player
        for _ in range(30):
            lane, idx = self.town.random_lane_point(self.rng_targets)
            tx, ty = self.town.street_point(lane, idx)
            if math.hypot(tx - p.x, ty - p.y) >= self.cfg.purpose_min_m:
                break
        self.target = (float(tx), float(ty))
        self.target_lane = (lane, idx)
        self.target_id += 1

    def teleport(self, rng: np.random.Generator | None = None, car: Car | None = None) -> None:
        """Move a car (default: the player's) to a random road location, at rest, heading along the road."""
        rng = rng if rng is not None else self.rng_teleport
        car = car or self.player
        others = [c for c in [self.player, *self.traffic] if c is not car]
        for _ in range(20):  # not on top of another car
            x, y, hd = self.town.random_road_pose(rng)
            if all(math.hypot(x - c.x, y - c.y) > 10 for c in others):
                break
        car.x, car.y, car.heading, car.speed, car.wheel, car.in_water = x, y, hd, 0.0, 0.0, False
        if car is self.player:
            self.teleports += 1
            self._colliding = False

    def displace(self, max_turn_rad: float, max_offset_m: float, tries: int = 20) -> bool:
        """Turn the player's car (at rest) up to ``max_turn_rad`` off its heading and shift it up to
        ``max_offset_m`` sideways, to a pose clear of walls, water and cars: the odd poses a learning driver
        stops in (nose to a kerb, across a lane), for a stream that should show how to start from them.
        False (the car stays) when no clear pose was found in ``tries``."""
        p = self.player
        rng = self._rng_displace
        for _ in range(tries):
            heading = wrap_angle(p.heading + rng.uniform(-max_turn_rad, max_turn_rad))
            off = rng.uniform(-max_offset_m, max_offset_m)
            x, y = p.x - math.sin(p.heading) * off, p.y + math.cos(p.heading) * off
            if (self.town.surface(*p.footprint(x, y, heading).T) >= WATER).any():
                continue
            ghost = Car(x, y, heading)
            if any(_cars_overlap(ghost, c) for c in self.traffic):
                continue
            p.x, p.y, p.heading, p.speed, p.wheel = x, y, heading, 0.0, 0.0
            return True
        return False

    # --- stepping ---------------------------------------------------------------------------------------
    def step(self, steering: float, throttle_brake: float) -> StepInfo:
        """Advance one 1/30 s step with the player's controls; traffic drives itself."""
        cars = [self.player, *self.traffic]
        controls = [(steering, throttle_brake)]
        for driver in self.traffic_drivers:
            _, executed = driver.act()
            controls.append(executed)
        grip = 0.8 if self.cfg.weather == "rain" else 1.0  # wet roads
        before = [(c.x, c.y, c.heading) for c in cars]
        proposals = []
        for car, (st, tb) in zip(cars, controls, strict=True):
            on_road = self.town.surface_at(car.x, car.y) == ROAD
            proposals.append(car.propose(st, tb, on_road, grip))
        hit = [False] * len(cars)
        for k, (car, prop) in enumerate(zip(cars, proposals, strict=True)):
            x, y, hd, v, wheel = prop
            surf = self.town.surface(*car.footprint(x, y, hd).T)
            if (surf >= BUILDING).any():
                hit[k] = True
                car.speed, car.wheel = 0.0, wheel  # stopped by the wall; the pose stays where it was
            else:
                car.x, car.y, car.heading, car.speed, car.wheel = x, y, hd, v, wheel
        self._car_contacts(cars, before, hit)
        p = self.player
        info_hit = hit[0]
        new_collision = info_hit and not self._colliding
        self._colliding = info_hit
        self.collisions += int(new_collision)
        entered = False
        for car in cars:
            if not car.in_water and self.town.surface_at(car.x, car.y) == WATER:
                car.in_water = True
                entered |= car is p
        self.water_entries += int(entered)
        moved = math.hypot(p.x - before[0][0], p.y - before[0][1])
        self.odometer_m += moved
        reached = math.hypot(self.target[0] - p.x, self.target[1] - p.y) < self.cfg.purpose_reach_m
        if reached:
            self.targets_reached += 1
            self.new_target()
        self.time += DT
        self.steps += 1
        self._traffic_unstuck_step()
        return StepInfo(info_hit, new_collision, p.in_water, entered, self.on_road, moved, reached)

    def _car_contacts(
        self, cars: list[Car], before: list[tuple[float, float, float]], hit: list[bool]
    ) -> None:
        """Cars touching cars: the one(s) whose move closed the gap go back and stop.

        A car moving away from a contact keeps its move; stopping both would pin two touching cars
        together for good (each step both try, touch, and are put back).
        """
        for a in range(len(cars)):
            for b in range(a + 1, len(cars)):
                ca, cb = cars[a], cars[b]
                if abs(ca.x - cb.x) > 6 or abs(ca.y - cb.y) > 6 or not _cars_overlap(ca, cb):
                    continue
                ghost_a = Car(*before[a])
                ghost_b = Car(*before[b])
                gap = math.hypot(before[a][0] - before[b][0], before[a][1] - before[b][1])
                for k, car, other in ((a, ca, ghost_b), (b, cb, ghost_a)):
                    if math.hypot(car.x - other.x, car.y - other.y) < gap or _cars_overlap(car, other):
                        car.x, car.y, car.heading = before[k]
                        car.speed = 0.0
                        hit[k] = True

    def _traffic_unstuck_step(self) -> None:
        for car, unstuck, driver in zip(
            self.traffic, self._traffic_unstuck, self.traffic_drivers, strict=True
        ):
            if unstuck.update(self.time, position=(car.x, car.y)).teleport:
                self.teleport(driver.rng, car)

    # --- readings -------------------------------------------------------------------------------------------
    @property
    def on_road(self) -> bool:
        return self.town.surface_at(self.player.x, self.player.y) == ROAD

    @property
    def speed(self) -> float:
        return self.player.speed

    def purpose(self) -> tuple[float, float]:
        """(direction to the target relative to the heading, radians in [-pi, pi], positive left; distance m)."""
        p = self.player
        return purpose((p.x, p.y), p.heading, self.target)

    def telemetry(self) -> dict:
        """What a game mod reports: position (x, y, z m), heading (rad), speed (m/s), purpose, game time."""
        p = self.player
        return {
            "position": (p.x, p.y, 0.0),
            "heading": p.heading,
            "speed": p.speed,
            "purpose": self.purpose(),
            "game_time": self.time,
            "on_road": self.on_road,
            "in_water": p.in_water,
        }

    # --- pictures ----------------------------------------------------------------------------------------
    def repaint(self) -> tuple[int, int, int]:
        """Give the player's car a new :func:`random_paint` (from this town's own paint stream)."""
        color = random_paint(self._rng_paint)
        self.set_appearance(car_color=color)
        return color

    def set_appearance(
        self,
        weather: str | None = None,
        time_of_day: float | None = None,
        car_color: tuple[int, int, int] | None = None,
    ) -> None:
        """Change the look of this instance (domain variety); the town and the episode stay."""
        if weather or time_of_day is not None:  # the light changes (a new paint alone keeps it)
            self.cfg = replace(
                self.cfg,
                weather=weather or self.cfg.weather,
                time_of_day=self.cfg.time_of_day if time_of_day is None else time_of_day,
            )
            self.light = render.Lighting.of(self.cfg.weather, self.cfg.time_of_day)
            self._static_lit = None
        if car_color is not None:
            self.car_color = tuple(car_color)
            self.player.color = self.car_color

    def _scene(self, with_player: bool, marker: bool) -> tuple[Boxes, np.ndarray]:
        if self._static_lit is None:
            self._static_lit = self.light.light(self.town.boxes.colors)
        parts, colors = [self.town.boxes], [self._static_lit]
        cars = [*self.traffic, self.player] if with_player else self.traffic
        for car in cars:
            b = car.boxes()
            parts.append(b)
            colors.append(self.light.light(b.colors))
        if marker:
            tx, ty = self.target
            beacon = Boxes(
                np.array(
                    [
                        [
                            [tx - 0.5, ty - 0.5],
                            [tx + 0.5, ty - 0.5],
                            [tx + 0.5, ty + 0.5],
                            [tx - 0.5, ty + 0.5],
                        ]
                    ],
                    np.float32,
                ),
                np.zeros(1, np.float32),
                np.array([30.0], np.float32),
                np.array([MARKER], np.float32),
            )
            parts.append(beacon)
            colors.append(np.array([MARKER], np.float32))  # it glows: not dimmed by the light
        return Boxes.concat(parts), np.concatenate(colors)

    def hood_frame(
        self, marker: bool | None = None, fade: float = 1.0, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The model's camera, RGB uint8 [hood_height, hood_width, 3]; ``marker`` overrides the config."""
        marker = self.cfg.purpose_marker if marker is None else marker
        boxes, colors = self._scene(with_player=False, marker=marker)
        p = self.player
        img = self.hood_cam.render(self.town, self.light, p.x, p.y, p.heading, boxes, colors, self.steps, out)
        render.draw_hood(img, self.light.light(self.car_color))
        if marker:
            draw_purpose_arrow(img, *self.purpose())
        return render.fade(img, fade)

    def cinematic_frame(self, fade: float = 1.0, out: np.ndarray | None = None) -> np.ndarray:
        """The third-person chase view for people, RGB uint8 [cinematic_height, cinematic_width, 3]."""
        if self._chase is None:
            self._chase = render.chase_camera(
                self.cfg.cinematic_width, self.cfg.cinematic_height, self.cfg.view_distance_m
            )
        boxes, colors = self._scene(with_player=True, marker=True)
        p = self.player
        img = self._chase.render(self.town, self.light, p.x, p.y, p.heading, boxes, colors, self.steps, out)
        return render.fade(img, fade)


def _cars_overlap(a: Car, b: Car) -> bool:
    """Two cars as three 1 m circles each along their length: close enough for contact tests."""
    ca, sa, cb, sb = math.cos(a.heading), math.sin(a.heading), math.cos(b.heading), math.sin(b.heading)
    for oa in (-1.4, 0.0, 1.4):
        ax, ay = a.x + ca * oa, a.y + sa * oa
        for ob in (-1.4, 0.0, 1.4):
            if (ax - b.x - cb * ob) ** 2 + (ay - b.y - sb * ob) ** 2 < 1.9**2:
                return True
    return False
