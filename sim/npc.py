"""NPC autopilot: drives the street graph to its purpose target, keeps its lane, minds its sensors.

Layers, each overriding the one before:

1. Route follower: Dijkstra over the street graph to the target, a path of lane centre lines joined by
   smooth turn curves across junctions, pure-pursuit steering along it, and a speed plan that slows for
   curvature ahead (lateral-acceleration limit) early enough to brake comfortably.
2. Proximity sensors: a fan of rays from the front bumper against buildings, obstacles, water and other
   cars. Something inside the stopping distance means brake; something close at the side means steer
   away. Sensors are the NPC's, never a model input.
3. Noise injection: for collection, now and then the *executed* action is perturbed for 0.3-1.5 s while
   the *label* stays the NPC's corrective action, so the data shows how to recover from drift (the car
   really does drift, and the labels say how to get back).

``Npc.act()`` returns ``(label, executed)``, each ``(steering, throttle_brake)``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from charles.drive.controls import wrap_angle
from charles.drive.noise import NoiseBursts
from charles.sim import car as carmod
from charles.sim.config import NpcConfig
from charles.sim.town import LANE_STEP, ROAD, WATER, sample_curve

if TYPE_CHECKING:
    from charles.sim.car import Car
    from charles.sim.world import SimWorld

STYLE = {
    # cruise km/h, lateral accel m/s^2 used in curves, comfortable decel m/s^2, max throttle, speed gain 1/(m/s)
    "calm": (40.0, 2.0, 2.0, 0.6, 0.3),
    "normal": (55.0, 3.0, 3.0, 0.9, 0.5),
    "aggressive": (75.0, 4.5, 4.5, 1.0, 0.9),
}
RAY_ANGLES = np.radians([60.0, 30.0, 12.0, 0.0, -12.0, -30.0, -60.0])
"""Sensor rays relative to the heading (positive left): three ahead, two diagonal, two to the sides."""
RAY_STEP = 0.5
"""Sample spacing along a ray (m): the class map's cell size."""
HARD_BRAKE = 7.0
"""Deceleration (m/s^2) the sensors assume in an emergency: below the car's 9, so there is margin."""
CLEARANCE = 3.0
"""Distance (m) the sensors keep between the front bumper and anything solid."""
REPLAN_OFF_PATH_M = 7.0
"""Beyond this distance from its path the NPC re-localises on the nearest lane going its way."""


class Npc:
    """An autopilot for one car of a :class:`SimWorld`.

    ``follow_purpose``: drive to the world's purpose target (the player's car; the world picks a new target
    when it is reached) or, for traffic, to targets of its own.
    """

    def __init__(
        self,
        world: SimWorld,
        car: Car | None = None,
        cfg: NpcConfig | None = None,
        rng: np.random.Generator | None = None,
        follow_purpose: bool | None = None,
    ):
        self.world = world
        self.car = car or world.player
        self.cfg = cfg or NpcConfig()
        self.rng = rng if rng is not None else np.random.default_rng([world.cfg.seed, 99])
        self.follow_purpose = (self.car is world.player) if follow_purpose is None else follow_purpose
        cruise, self.a_lat, self.a_dec, self.max_throttle, self.k_speed = STYLE[self.cfg.style]
        self.cruise = (self.cfg.cruise_kmh or cruise) / 3.6
        self._lane_speed: dict[int, float] = {}
        self.noise = NoiseBursts(
            self.rng,
            self.cfg.noise_rate_hz,
            self.cfg.noise_duration_s,
            self.cfg.noise_steering,
            self.cfg.noise_throttle,
        )
        self.sensors: dict[str, np.ndarray] = {}
        self.overridden = False
        self.noisy = False
        """Whether the last executed action was perturbed."""
        self.reset()

    def reset(self) -> None:
        """Forget the plan (after a teleport or a new episode); the next act() re-localises."""
        self.path = np.zeros((0, 2))
        self.path_lane = np.zeros(0, np.int32)
        self.path_idx = np.zeros(0, np.int32)
        self.path_vmax = np.zeros(0)
        self.i = 0
        self._goal: tuple[int, int] | None = None
        self._goal_id = -1
        self._episode = self.world.episode
        self.noise.reset()

    # --- planning -------------------------------------------------------------------------------------
    def _target(self) -> tuple[int, int]:
        if self.follow_purpose:
            return self.world.target_lane
        if self._goal is None:
            self._goal = self.world.town.random_lane_point(self.rng)
        return self._goal

    def _lane_factor(self, lane: int) -> float:
        if lane not in self._lane_speed:
            sv = self.cfg.speed_variation
            self._lane_speed[lane] = float(self.rng.uniform(1 - sv, 1 + sv))
        return self._lane_speed[lane]

    def _plan(self, lane: int, idx: int) -> None:
        """Path from (lane, idx) to the target, and on past it (so it never plans to stop at a target).

        A target is a point on a street: it is reached in whichever direction has the shorter route.
        """
        town = self.world.town
        goal_lane, goal_idx = self._target()
        self._goal_id = self.world.target_id if self.follow_purpose else -1
        best: tuple[float, list[int]] | None = None
        rev = goal_lane ^ 1  # lanes 2e and 2e+1 are the two directions of street e
        for g, gi in ((goal_lane, goal_idx), (rev, len(town.lanes[rev].points) - 1 - goal_idx)):
            if lane == g and idx <= gi:
                seq, cost = [lane], float(gi - idx)
            else:
                seq = [lane, *town.route(lane, g)]
                cost = (
                    sum(len(town.lanes[s].points) for s in seq[1:-1])
                    + gi
                    + len(town.lanes[lane].points)
                    - idx
                )
            if best is None or cost < best[0]:
                best = (cost, seq)
        seq = best[1]
        seq.append(self._continuation(seq[-1]))
        n0 = len(town.lanes[lane].points)
        pts, lanes, idxs = [town.lanes[lane].points[idx:]], [np.full(n0 - idx, lane)], [np.arange(idx, n0)]
        for a, b in zip(seq[:-1], seq[1:], strict=True):
            conn = self._connector(a, b)
            pts += [conn, town.lanes[b].points]
            lanes += [np.full(len(conn), -1), np.full(len(town.lanes[b].points), b)]
            idxs += [np.full(len(conn), -1), np.arange(len(town.lanes[b].points))]
        self._set_path(np.concatenate(pts), np.concatenate(lanes), np.concatenate(idxs))

    def _continuation(self, lane: int) -> int:
        """A random lane to take after ``lane`` (never a U-turn)."""
        options = self.world.town.successors(lane)
        return int(options[self.rng.integers(len(options))])

    def _connector(self, a: int, b: int) -> np.ndarray:
        """A quadratic curve from the end of lane ``a`` to the start of lane ``b`` across their junction."""
        town = self.world.town
        p0, p1 = town.lanes[a].points[-1], town.lanes[b].points[0]
        h0, h1 = town.lanes[a].headings[-1], town.lanes[b].headings[0]
        d0, d1 = np.array([math.cos(h0), math.sin(h0)]), np.array([math.cos(h1), math.sin(h1)])
        ctrl = (p0 + p1) / 2
        cross = d0[0] * d1[1] - d0[1] * d1[0]
        if abs(cross) > 0.15:  # the two lane lines meet: bend around that corner
            diff = p1 - p0
            t = (diff[0] * d1[1] - diff[1] * d1[0]) / cross
            if 0 < t < 25:
                ctrl = p0 + d0 * t
        return sample_curve(p0, p1, ctrl, LANE_STEP)[1:-1]

    def _set_path(self, pts: np.ndarray, lanes: np.ndarray, idxs: np.ndarray) -> None:
        self.path, self.path_lane, self.path_idx, self.i = (
            pts,
            lanes.astype(np.int32),
            idxs.astype(np.int32),
            0,
        )
        hd = np.arctan2(np.diff(pts[:, 1]), np.diff(pts[:, 0]))
        turn = np.abs(wrap_angle(np.diff(hd)))
        seg = np.linalg.norm(np.diff(pts, axis=0), axis=1)
        kappa = np.zeros(len(pts))
        kappa[1:-1] = turn / np.maximum(seg[1:], 0.2)
        kappa = np.convolve(kappa, np.ones(3) / 3, mode="same")  # sampled curves are a little noisy
        factor = np.array([self._lane_factor(int(ln)) if ln >= 0 else 1.0 for ln in lanes])
        vmax = np.minimum(np.sqrt(self.a_lat / np.maximum(kappa, 1e-4)), self.cruise * factor)
        vmax[-1] = 0.0  # the path's end is a stop: extending it in time keeps the NPC from reaching it
        self.path_vmax = vmax

    def _extend(self) -> None:
        """Append a junction and the next lane when the path runs short (traffic and passed targets)."""
        last = int(self.path_lane[self.path_lane >= 0][-1])
        nxt = self._continuation(last)
        conn = self._connector(last, nxt)
        town = self.world.town
        n = len(town.lanes[nxt].points)
        keep = slice(self.i, None)
        self._set_path(
            np.concatenate([self.path[keep], conn, town.lanes[nxt].points]),
            np.concatenate([self.path_lane[keep], np.full(len(conn), -1), np.full(n, nxt)]),
            np.concatenate([self.path_idx[keep], np.full(len(conn), -1), np.arange(n)]),
        )

    def _localise(self) -> None:
        c = self.car
        lane, idx, _ = self.world.town.nearest_lane(c.x, c.y, c.heading)
        self._plan(lane, idx)

    def _replan_here(self) -> None:
        """New target: keep driving the current lane, route from its end."""
        j = self.i
        while j < len(self.path_lane) and self.path_lane[j] < 0:
            j += 1
        if j >= len(self.path_lane):
            self._localise()
        else:
            self._plan(int(self.path_lane[j]), int(self.path_idx[j]))

    # --- driving --------------------------------------------------------------------------------------
    def act(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """One 30 Hz decision: (label, executed), each (steering, throttle_brake)."""
        c = self.car
        if self.world.episode != self._episode:
            self.reset()
        if len(self.path) == 0:
            self._localise()
        elif self.follow_purpose and self.world.target_id != self._goal_id:
            self._replan_here()
        elif not self.follow_purpose and self._goal is not None:
            gx, gy = self.world.town.street_point(*self._goal)
            if math.hypot(gx - c.x, gy - c.y) < 15.0:
                self._goal = None
                self._replan_here()
        # Progress: the nearest path point a little ahead of the last one.
        win = self.path[self.i : self.i + 40]
        d2 = (win[:, 0] - c.x) ** 2 + (win[:, 1] - c.y) ** 2
        k = int(np.argmin(d2))
        if d2[k] > REPLAN_OFF_PATH_M**2:
            self._localise()
            win = self.path[:40]
            d2 = (win[:, 0] - c.x) ** 2 + (win[:, 1] - c.y) ** 2
            k = int(np.argmin(d2))
        self.i += k
        if len(self.path) - self.i < 120:
            self._extend()

        steering = self._pursue()
        target_v = self._plan_speed()
        self.overridden = False
        if self.cfg.sensors:
            steering, target_v = self._sense(steering, target_v)
        tb = self._speed_control(target_v)
        label = (min(1.0, max(-1.0, float(steering))), min(1.0, max(-1.0, float(tb))))
        return label, self._inject(label)

    def _pursue(self) -> float:
        """Pure pursuit from the rear axle towards a point a speed-dependent distance down the path."""
        c = self.car
        v = c.speed
        look = min(22.0, max(5.0, 3.0 + 0.55 * v))
        j = min(len(self.path) - 1, self.i + int(look / LANE_STEP))
        tx, ty = self.path[j]
        cos_h, sin_h = math.cos(c.heading), math.sin(c.heading)
        rx, ry = c.x - cos_h * carmod.WHEELBASE / 2, c.y - sin_h * carmod.WHEELBASE / 2
        dx, dy = tx - rx, ty - ry
        fwd, left = dx * cos_h + dy * sin_h, -dx * sin_h + dy * cos_h
        dist = max(1.0, math.hypot(fwd, left))
        alpha = math.atan2(left, fwd)
        wheel = math.atan2(2 * carmod.WHEELBASE * math.sin(alpha), dist)
        return -wheel / carmod.max_steer(v)

    def _plan_speed(self) -> float:
        """Fastest speed from which every point ahead can still be taken at its curve speed."""
        v = self.car.speed
        horizon = int((v * v / (2 * self.a_dec) + 20.0) / LANE_STEP)
        vmax = self.path_vmax[self.i : self.i + horizon + 1]
        s = np.arange(len(vmax)) * LANE_STEP
        return float(np.sqrt(vmax**2 + 2 * self.a_dec * s).min())

    def _speed_control(self, target_v: float) -> float:
        """Pedals for a target speed: feed-forward against drag and rolling, plus a proportional term."""
        c = self.car
        v = c.speed
        on_road = self.world.town.surface_at(c.x, c.y) == ROAD
        hold = carmod.resistance(v, on_road) / (carmod.ACCEL * max(0.05, 1 - v / carmod.V_MAX))
        tb = hold + self.k_speed * (target_v - v)
        if target_v < 0.3 and v < 0.5:
            return -1.0  # stand still firmly
        if tb < 0:  # brake in proportion to the deceleration needed
            tb = max(-1.0, (target_v - v) * self.k_speed * 1.5)
        return min(self.max_throttle, tb)

    def sense(self) -> dict[str, np.ndarray]:
        """Ray distances (m, inf = clear) to hazards (solid, water, cars) and to the road's edge."""
        c = self.car
        town = self.world.town
        v = c.speed
        reach = min(self.cfg.sensor_range_m, max(10.0, 2.5 * v + 6.0))
        n = int(reach / RAY_STEP)
        s = (np.arange(n) + 1) * RAY_STEP
        ang = c.heading + RAY_ANGLES
        ox = c.x + math.cos(c.heading) * carmod.LENGTH / 2
        oy = c.y + math.sin(c.heading) * carmod.LENGTH / 2
        xs = ox + np.cos(ang)[:, None] * s[None, :]
        ys = oy + np.sin(ang)[:, None] * s[None, :]
        surf = town.surface(xs, ys)
        hazard_mask = surf >= WATER  # water, buildings, obstacles
        hazard = np.where(hazard_mask.any(1), s[np.argmax(hazard_mask, axis=1)], np.inf)
        off = surf != ROAD
        edge = np.where(off.any(1), s[np.argmax(off, axis=1)], np.inf)
        # Other cars: ray against a 1.3 m circle around each car that is in reach.
        for other in [self.world.player, *self.world.traffic]:
            if other is c:
                continue
            ex, ey = other.x - ox, other.y - oy
            if ex * ex + ey * ey > (reach + 3) ** 2:
                continue
            along = ex * np.cos(ang) + ey * np.sin(ang)
            perp2 = ex * ex + ey * ey - along**2
            inside = (along > 0) & (perp2 < 1.3**2)
            d = np.where(inside, along - np.sqrt(np.maximum(0.0, 1.3**2 - perp2)), np.inf)
            hazard = np.minimum(hazard, np.maximum(d, 0.0))
        self.sensors = {"angles": RAY_ANGLES, "hazard": hazard, "edge": edge, "reach": np.array(reach)}
        return self.sensors

    def _yield(self) -> float:
        """Gap (m) to the nearest car we would run into within 3 s at current velocities (inf if none).

        Only cars that would be *ahead* of us at the closest approach count, so of two cars crossing paths
        the one that would hit the other's side yields and the other drives on: no standoff.
        """
        c = self.car
        ch, sh = math.cos(c.heading), math.sin(c.heading)
        vx, vy = c.speed * ch, c.speed * sh
        gap = math.inf
        for other in [self.world.player, *self.world.traffic]:
            if other is c:
                continue
            rx, ry = other.x - c.x, other.y - c.y
            dist = math.hypot(rx, ry)
            if dist > 35.0:
                continue
            wx = other.speed * math.cos(other.heading) - vx
            wy = other.speed * math.sin(other.heading) - vy
            w2 = wx * wx + wy * wy
            t = 0.0 if w2 < 1e-6 else min(3.0, max(0.0, -(rx * wx + ry * wy) / w2))
            px, py = rx + wx * t, ry + wy * t  # where it will be relative to us at the closest approach
            ahead = px * ch + py * sh
            if math.hypot(px, py) < 3.5 and ahead > 1.0:
                gap = min(gap, dist - carmod.LENGTH)
        return gap

    def _sense(self, steering: float, target_v: float) -> tuple[float, float]:
        """Override the route follower where the sensors see a crash coming."""
        r = self.sense()
        hazard = r["hazard"]
        v = self.car.speed
        gap = self._yield()
        if gap < math.inf:
            cap = math.sqrt(max(0.0, 2 * self.a_dec * (gap - CLEARANCE)))
            if cap < target_v:
                target_v = cap
                self.overridden = True
        ahead = float(hazard[2:5].min())
        stop = v * v / (2 * HARD_BRAKE) + CLEARANCE
        if ahead < 2 * stop:
            # Something solid ahead: cap speed so we can still stop short of it, and stop if it is close.
            cap = math.sqrt(max(0.0, 2 * self.a_dec * (ahead - CLEARANCE)))
            if ahead < stop:
                cap = 0.0
            if cap < target_v:
                target_v = cap
                self.overridden = True
        # Something close at a side: steer away from it (rays 0, 1 are left, 5, 6 right).
        near_l = min(hazard[0] / 1.5, hazard[1] / (2.0 + 0.15 * v))
        near_r = min(hazard[6] / 1.5, hazard[5] / (2.0 + 0.15 * v))
        if near_l < 1.0 and near_l < near_r:
            steering += 0.35 * (1.0 - near_l)  # positive steers right
            self.overridden = True
        elif near_r < 1.0:
            steering -= 0.35 * (1.0 - near_r)
            self.overridden = True
        # Off the road: take it slowly until back on it.
        if self.world.town.surface_at(self.car.x, self.car.y) != ROAD and target_v > 8.0:
            target_v = 8.0
            self.overridden = True
        return steering, target_v

    def _inject(self, label: tuple[float, float]) -> tuple[float, float]:
        """The executed action: the label plus a temporary offset (charles.drive.noise, shared with GTA)."""
        executed = self.noise.step(label, carmod.DT)
        self.noisy = self.noise.noisy
        return executed
