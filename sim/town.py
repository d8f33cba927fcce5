"""A procedurally generated town: streets, lanes, water, buildings and road-side obstacles, from a seed.

The town is an island. A jittered street grid (some streets curved, some removed so T-junctions appear)
sits inside a coast of irregular width, and a few city blocks are lakes instead of buildings, so a car that
leaves the road near the coast or a lake can end up in water (the seed's famous "!water" failure).

Everything a frame or a step needs is precomputed here, once per seed:

- ``texture``: the ground seen from above (grass, sand, water, sidewalks, asphalt, lane marks, building
  footprints), RGB uint8 at ``texture_res_m``; cameras warp it onto the ground plane.
- ``classes``: one surface class per cell at ``class_res_m`` for collisions, sensors and on-road checks.
- ``boxes``: buildings and obstacles as extruded quads that cameras draw as 3D boxes.
- ``lanes``: for every street and direction a right-hand lane centre line sampled every metre, with the
  street graph the NPCs route on.

World coordinates: x east, y north, metres; heading counter-clockwise from +x. Texture and class-map pixel
(u, v) = (x, y) / resolution, so row v grows with y (the map is stored "south up"; only code reads it).
"""

from __future__ import annotations

import collections
import heapq
import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from charles.sim.config import SimConfig

log = logging.getLogger("charles.sim.town")

# Surface classes of the class map.
TERRAIN, ROAD, WATER, BUILDING, OBSTACLE = 0, 1, 2, 3, 4
SOLID = (BUILDING, OBSTACLE)
"""Classes a car crashes into: the codes >= BUILDING (the order of the codes is relied on: >= WATER is
everything a car must not drive into)."""

LANE_W = 3.5
"""Lane width in m (a common urban lane); a street is two lanes, one per direction (right-hand traffic)."""
ROAD_W = 8.0
"""Paved width in m: two lanes plus a 0.5 m shoulder on each side."""
SIDEWALK_W = 2.0
"""Sidewalk width in m on each side; it is off-road for the metrics."""
LANE_STEP = 1.0
"""Lane centre lines are sampled every metre: fine enough for pure pursuit and curvature estimates."""
JUNCTION_TRIM = ROAD_W / 2 + 4.0
"""Lanes stop this far (m) from a junction centre; NPC paths bridge junctions with smooth turn curves
(8 m gives a right turn of ~4.5 m radius, about what a car can do at walking pace)."""
AUX_RES = 1.0
"""Resolution (m/cell) of the helper rasters used while generating (distances, masks)."""

# Colours, RGB.
GRASS = (72, 112, 52)
DIRT = (118, 100, 70)
SAND = (196, 182, 140)
SEA = (38, 78, 118)
ASPHALT = (72, 72, 76)
CONCRETE = (150, 148, 140)
WHITE = (232, 232, 228)
YELLOW = (222, 182, 44)
FOOTPRINT = (92, 88, 84)
FACADES = np.array(
    [(196, 180, 150), (150, 150, 156), (160, 86, 66), (96, 130, 160), (220, 216, 204), (120, 110, 96)],
    dtype=np.float32,
)
OBSTACLE_KINDS = (
    # (name, size across, height, colour): a lamp post, a bin, a tree, a concrete barrier.
    ("post", 0.4, 4.0, (60, 60, 64)),
    ("bin", 0.9, 1.2, (40, 90, 50)),
    ("tree", 1.8, 5.5, (40, 96, 40)),
    ("barrier", 1.6, 1.0, (214, 120, 40)),
)


@dataclass
class Boxes:
    """Extruded quads: ``corners`` [N, 4, 2] counter-clockwise in x/y (m), from ``z0`` to ``z1`` (m)."""

    corners: np.ndarray
    z0: np.ndarray
    z1: np.ndarray
    colors: np.ndarray
    """[N, 3] float32 RGB, unlit."""
    bias: np.ndarray | None = None
    """[N] m subtracted from the distance that orders drawing: a car's cabin goes after its body."""

    def __post_init__(self) -> None:
        if self.bias is None:
            self.bias = np.zeros(len(self.z0), np.float32)

    @staticmethod
    def empty() -> Boxes:
        return Boxes(
            np.zeros((0, 4, 2), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float32),
            np.zeros((0, 3), np.float32),
        )

    def __len__(self) -> int:
        return len(self.z0)

    @staticmethod
    def concat(parts: list[Boxes]) -> Boxes:
        parts = [p for p in parts if len(p)]
        if not parts:
            return Boxes.empty()
        if len(parts) == 1:
            return parts[0]
        return Boxes(
            *(
                np.concatenate([getattr(p, k) for p in parts])
                for k in ("corners", "z0", "z1", "colors", "bias")
            )
        )


def oriented_rect(cx: float, cy: float, heading: float, length: float, width: float) -> np.ndarray:
    """Corners [4, 2] of a rectangle centred at (cx, cy), long side along ``heading``, counter-clockwise."""
    c, s = math.cos(heading), math.sin(heading)
    hl, hw = length / 2, width / 2
    local = ((hl, -hw), (hl, hw), (-hl, hw), (-hl, -hw))
    return np.array([(cx + c * a - s * b, cy + s * a + c * b) for a, b in local], np.float32)


@dataclass
class Lane:
    """One direction of one street: centre line of its right-hand lane, beyond the junction trims."""

    points: np.ndarray
    """[n, 2] m, every LANE_STEP."""
    headings: np.ndarray
    """[n] radians along the lane."""
    tail: int
    head: int
    """Graph nodes it leaves from and drives to."""


@dataclass
class Town:
    """The generated town; build with :func:`build_town` (cached per seed and layout)."""

    seed: int
    size_m: float
    nodes: np.ndarray
    """[N, 2] junction positions (m)."""
    edges: list[tuple[int, int]]
    centerlines: list[np.ndarray]
    """Per street, [n, 2] points from node u to node v every LANE_STEP."""
    lanes: list[Lane]
    """Index 2*e: u->v, 2*e+1: v->u."""
    out_lanes: dict[int, list[int]]
    """Node -> directed lanes leaving it."""
    texture: np.ndarray
    texture_res: float
    classes: np.ndarray
    class_res: float
    boxes: Boxes
    buildings: int
    obstacles: int
    _lane_xy: np.ndarray = field(repr=False, default=None)
    _lane_ids: np.ndarray = field(repr=False, default=None)
    _lane_idx: np.ndarray = field(repr=False, default=None)
    _lane_hd: np.ndarray = field(repr=False, default=None)
    _lane_cum: np.ndarray = field(repr=False, default=None)
    _classes_padded: np.ndarray = field(repr=False, default=None)
    cache: dict = field(default_factory=dict, repr=False)
    """Derived data others keep per town (lit textures per weather, for example)."""

    def __post_init__(self) -> None:
        self._classes_padded = np.pad(self.classes, 1, constant_values=WATER)
        self._lane_xy = np.concatenate([ln.points for ln in self.lanes]).astype(np.float32)
        self._lane_ids = np.concatenate(
            [np.full(len(ln.points), i, np.int32) for i, ln in enumerate(self.lanes)]
        )
        self._lane_idx = np.concatenate([np.arange(len(ln.points), dtype=np.int32) for ln in self.lanes])
        self._lane_hd = np.concatenate([ln.headings for ln in self.lanes]).astype(np.float32)
        lengths = np.array([len(ln.points) for ln in self.lanes], np.float64)
        self._lane_cum = np.cumsum(lengths) / lengths.sum()

    # --- queries -------------------------------------------------------------------------------------
    def surface(self, x: np.ndarray | float, y: np.ndarray | float) -> np.ndarray:
        """Surface class at world points; everything outside the map is sea."""
        # A one-cell ring of water around the map turns "outside" into a clamp instead of a mask.
        h, w = self.classes.shape
        # (minimum/maximum, not np.clip: clip's per-call overhead is 5x theirs and this runs ~20x per step)
        u = np.minimum(np.maximum((np.asarray(x) * (1.0 / self.class_res)).astype(np.int64) + 1, 0), w + 1)
        v = np.minimum(np.maximum((np.asarray(y) * (1.0 / self.class_res)).astype(np.int64) + 1, 0), h + 1)
        return self._classes_padded[v, u]

    def surface_at(self, x: float, y: float) -> int:
        """Scalar :meth:`surface`, without numpy overhead (called a few times per step)."""
        u, v = int(x // self.class_res), int(y // self.class_res)
        h, w = self.classes.shape
        if 0 <= u < w and 0 <= v < h:
            return int(self.classes[v, u])
        return WATER

    def random_lane_point(self, rng: np.random.Generator) -> tuple[int, int]:
        """(lane, index) uniformly over lane length, away from lane ends (room to settle after a teleport)."""
        lane = int(np.searchsorted(self._lane_cum, rng.random(), side="right"))
        lane = min(lane, len(self.lanes) - 1)
        n = len(self.lanes[lane].points)
        idx = int(rng.integers(0, max(1, n - 8)))
        return lane, idx

    def street_point(self, lane: int, idx: int) -> tuple[float, float]:
        """The street centre line point beside lane point (lane, idx): a target neutral to direction."""
        line = self.centerlines[lane // 2]
        trim = int(JUNCTION_TRIM / LANE_STEP)
        k = trim + idx if lane % 2 == 0 else len(line) - 1 - trim - idx
        x, y = line[min(len(line) - 1, max(0, k))]
        return float(x), float(y)

    def random_road_pose(self, rng: np.random.Generator) -> tuple[float, float, float]:
        """(x, y, heading) on a lane centre, heading along the lane: where a teleport lands."""
        lane, idx = self.random_lane_point(rng)
        ln = self.lanes[lane]
        return float(ln.points[idx, 0]), float(ln.points[idx, 1]), float(ln.headings[idx])

    def nearest_lane(self, x: float, y: float, heading: float | None = None) -> tuple[int, int, float]:
        """(lane, index, distance m) of the closest lane point, preferring lanes going our way."""
        d2 = (self._lane_xy[:, 0] - x) ** 2 + (self._lane_xy[:, 1] - y) ** 2
        if heading is not None:
            # A lane pointing against us costs as much as being 12 m away: take the near lane our way.
            against = np.cos(self._lane_hd - heading) < 0.3
            d2 = d2 + against * 144.0
        k = int(np.argmin(d2))
        return int(self._lane_ids[k]), int(self._lane_idx[k]), float(math.sqrt(d2[k]))

    def successors(self, lane: int) -> list[int]:
        """Lanes a car on ``lane`` may take at its end junction: any but a U-turn (no dead ends exist)."""
        ln = self.lanes[lane]
        return [o for o in self.out_lanes[ln.head] if self.lanes[o].head != ln.tail] or self.out_lanes[
            ln.head
        ]

    def route(self, start_lane: int, goal_lane: int) -> list[int]:
        """Shortest lanes to drive after ``start_lane`` to reach ``goal_lane`` (Dijkstra over lanes).

        Searching over lanes rather than junctions is what rules out U-turns at junctions; a goal on the
        start lane but behind us is reached by going round a block.
        """
        dist: dict[int, float] = {}
        prev: dict[int, int] = {}
        heap = []
        for o in self.successors(start_lane):
            dist[o] = len(self.lanes[o].points) * LANE_STEP
            prev[o] = -1
            heapq.heappush(heap, (dist[o], o))
        while heap:
            d, lane = heapq.heappop(heap)
            if lane == goal_lane:
                break
            if d > dist.get(lane, math.inf):
                continue
            for o in self.successors(lane):
                nd = d + len(self.lanes[o].points) * LANE_STEP + 2 * JUNCTION_TRIM
                if nd < dist.get(o, math.inf):
                    dist[o] = nd
                    prev[o] = lane
                    heapq.heappush(heap, (nd, o))
        if goal_lane not in prev:
            raise ValueError(f"lane {goal_lane} unreachable from lane {start_lane}")
        path = [goal_lane]
        while prev[path[-1]] != -1:
            path.append(prev[path[-1]])
        return path[::-1]

    def overview(self, size: int = 512) -> np.ndarray:
        """A north-up RGB map of the town, ``size`` px square (for people; cheap, cached)."""
        key = ("overview", size)
        if key not in self.cache:
            self.cache[key] = np.ascontiguousarray(
                cv2.resize(self.texture, (size, size), interpolation=cv2.INTER_AREA)[::-1]
            )
        return self.cache[key]


# --- generation --------------------------------------------------------------------------------------
class BuildCancelled(Exception):
    """A town build given up because its ``should_stop`` said so (its service is stopping)."""


def town_key(cfg: SimConfig) -> tuple:
    """The fields of a SimConfig that shape the town (everything else is per instance)."""
    return (
        cfg.seed,
        cfg.blocks,
        cfg.block_m,
        cfg.curved_fraction,
        cfg.removed_fraction,
        cfg.lakes,
        cfg.texture_res_m,
        cfg.class_res_m,
        cfg.obstacles_per_100m,
    )


TOWNS_CACHED = 3
"""Towns kept per process: one per seed a process drives (a collector one, the tests a few)."""
_towns: collections.OrderedDict[tuple, Town] = collections.OrderedDict()
_towns_lock = threading.Lock()


def build_town(cfg: SimConfig, should_stop: Callable[[], bool] | None = None) -> Town:
    """The town of a config; towns are cached (a few per process) because building one takes seconds.

    ``should_stop`` is asked between the build's steps and its rows: once it says True the build raises
    :class:`BuildCancelled`, so a service stopped while it builds ends at once instead of seconds later
    (a default town takes ~3.5 s on a loaded 2-core box). A cancelled build leaves nothing in the cache.
    """
    key = town_key(cfg)
    with _towns_lock:
        town = _towns.get(key)
        if town is not None:
            _towns.move_to_end(key)
            return town
    log.info(f"building the town of seed {cfg.seed} ({cfg.blocks} blocks)")
    t0 = time.perf_counter()
    town = _generate(*key, should_stop=should_stop)  # outside the lock: two seeds build side by side
    log.info(f"town of seed {cfg.seed} built in {time.perf_counter() - t0:.1f} s")
    with _towns_lock:
        _towns[key] = town
        while len(_towns) > TOWNS_CACHED:
            _towns.popitem(last=False)
    return town


def sample_curve(p0: np.ndarray, p1: np.ndarray, ctrl: np.ndarray | None, step: float) -> np.ndarray:
    """Points every ``step`` m along a straight segment or a quadratic Bezier (arc-length resampled)."""
    t = np.linspace(0.0, 1.0, 400)[:, None]
    if ctrl is None:
        dense = p0 + (p1 - p0) * t
    else:
        dense = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * ctrl + t**2 * p1
    seg = np.linalg.norm(np.diff(dense, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(seg)])
    n = max(2, int(s[-1] // step) + 1)
    targets = np.linspace(0.0, s[-1], n)
    return np.stack([np.interp(targets, s, dense[:, 0]), np.interp(targets, s, dense[:, 1])], axis=1)


def _headings(points: np.ndarray) -> np.ndarray:
    d = np.gradient(points, axis=0)
    return np.arctan2(d[:, 1], d[:, 0])


def _offset_right(points: np.ndarray, by: float) -> np.ndarray:
    hd = _headings(points)
    return points + by * np.stack([np.sin(hd), -np.cos(hd)], axis=1)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int) -> np.ndarray:
    """Low-frequency noise in [0, 1] of ``shape``: a coarse random grid upscaled smoothly."""
    coarse = rng.random((cells, cells)).astype(np.float32)
    return cv2.resize(coarse, (shape[1], shape[0]), interpolation=cv2.INTER_CUBIC).clip(0, 1)


def _connected(n_nodes: int, edges: list[tuple[int, int]]) -> bool:
    adj: dict[int, list[int]] = {i: [] for i in range(n_nodes)}
    for u, v in edges:
        adj[u].append(v)
        adj[v].append(u)
    seen, todo = {0}, [0]
    while todo:
        for m in adj[todo.pop()]:
            if m not in seen:
                seen.add(m)
                todo.append(m)
    return len(seen) == n_nodes


def _raster(points: np.ndarray) -> np.ndarray:
    """World points -> int32 pixels of the AUX_RES helper rasters."""
    return np.round(points / AUX_RES).astype(np.int32)


class _Checkpoint:
    """Called between the build's steps: raises BuildCancelled once ``should_stop`` says True."""

    def __init__(self, should_stop: Callable[[], bool] | None):
        self.should_stop = should_stop

    def __call__(self) -> None:
        if self.should_stop is not None and self.should_stop():
            raise BuildCancelled("the town build was cancelled")


@dataclass
class _Grid:
    """The junctions: an n x n grid (node ``j * n + i`` at column i, row j), inner ones jittered."""

    n: int
    nodes: np.ndarray
    """[n * n, 2] m."""

    @staticmethod
    def jittered(rng: np.random.Generator, n: int, block_m: float, margin: float) -> _Grid:
        """Jittered by up to 15 % of a block, so streets meet at varied angles; the ring stays square."""
        ij = [(i, j) for j in range(n) for i in range(n)]
        nodes = np.array([(margin + i * block_m, margin + j * block_m) for i, j in ij], np.float64)
        inner = np.array([0 < i < n - 1 and 0 < j < n - 1 for i, j in ij])
        nodes[inner] += rng.uniform(-0.15, 0.15, (int(inner.sum()), 2)) * block_m
        return _Grid(n, nodes)

    def id(self, i: int, j: int) -> int:
        return j * self.n + i

    def streets(self) -> tuple[list[tuple[int, int]], set[tuple[int, int]]]:
        """Every grid street (u, v) with u < v, and the set of those on the outer ring."""
        n = self.n
        ring: set[tuple[int, int]] = set()
        edges: list[tuple[int, int]] = []
        for j in range(n):
            for i in range(n):
                for di, dj in ((1, 0), (0, 1)):
                    if i + di < n and j + dj < n:
                        e = (self.id(i, j), self.id(i + di, j + dj))
                        edges.append(e)
                        if (dj == 0 and j in (0, n - 1)) or (di == 0 and i in (0, n - 1)):
                            ring.add(e)
        return edges, ring

    def ring_nodes(self) -> list[int]:
        """The outer junctions in order round the town (the island's hull)."""
        n, nid = self.n, self.id
        ring = [nid(i, 0) for i in range(n)] + [nid(n - 1, j) for j in range(1, n)]
        return ring + [nid(i, n - 1) for i in range(n - 2, -1, -1)] + [nid(0, j) for j in range(n - 2, 0, -1)]

    @property
    def blocks(self) -> list[tuple[int, int]]:
        """City blocks by their south-west junction (i, j), row by row."""
        return [(i, j) for j in range(self.n - 1) for i in range(self.n - 1)]

    def block(self, i: int, j: int) -> np.ndarray:
        """[4, 2] corners of block (i, j), counter-clockwise from its south-west junction."""
        nid = self.id
        return self.nodes[[nid(i, j), nid(i + 1, j), nid(i + 1, j + 1), nid(i, j + 1)]]


def _remove_streets(
    rng: np.random.Generator, n_nodes: int, edges: list[tuple[int, int]], ring: set, fraction: float
) -> list[tuple[int, int]]:
    """Remove ``fraction`` of the inner streets for T-junctions (sorted survivors), keeping every junction on
    >= 2 streets (no dead ends, so NPCs never need a U-turn) and the network connected."""
    order = rng.permutation(len(edges))
    target_removed = int(fraction * len(edges))
    kept = list(edges)
    for k in order:
        if len(edges) - len(kept) >= target_removed:
            break
        e = edges[k]
        if e in ring:
            continue
        deg: dict[int, int] = {}
        for u, v in kept:
            deg[u] = deg.get(u, 0) + 1
            deg[v] = deg.get(v, 0) + 1
        if deg[e[0]] <= 2 or deg[e[1]] <= 2:
            continue
        trial = [x for x in kept if x != e]
        if _connected(n_nodes, trial):
            kept = trial
    return sorted(kept)


def _centerlines(
    rng: np.random.Generator, nodes: np.ndarray, edges: list[tuple[int, int]], ring: set, curved: float
) -> list[np.ndarray]:
    """Street centre lines: straight, or a quadratic curve bulging sideways; ring streets only bulge
    inwards so the coast stays clear of them."""
    centre = nodes.mean(axis=0)
    centerlines = []
    for u, v in edges:
        p0, p1 = nodes[u], nodes[v]
        ctrl = None
        if rng.random() < curved:
            d = p1 - p0
            length = float(np.linalg.norm(d))
            normal = np.array([-d[1], d[0]]) / length
            sign = rng.choice((-1.0, 1.0))
            mid = (p0 + p1) / 2
            if (u, v) in ring and np.dot(mid + normal * sign - centre, mid - centre) > np.dot(
                mid - centre, mid - centre
            ):
                sign = -sign
            ctrl = mid + normal * sign * rng.uniform(0.15, 0.35) * length
        centerlines.append(sample_curve(p0, p1, ctrl, LANE_STEP))
    return centerlines


def _lanes(
    n_nodes: int, edges: list[tuple[int, int]], centerlines: list[np.ndarray]
) -> tuple[list[Lane], dict[int, list[int]]]:
    """The right-hand lane of each direction of each street, trimmed at the junctions, and the lanes
    leaving each junction (what NPCs route on)."""
    lanes: list[Lane] = []
    out_lanes: dict[int, list[int]] = {i: [] for i in range(n_nodes)}
    trim = int(JUNCTION_TRIM / LANE_STEP)
    for e, (u, v) in enumerate(edges):
        for pts, tail, head in ((centerlines[e], u, v), (centerlines[e][::-1].copy(), v, u)):
            lane_pts = _offset_right(pts, LANE_W / 2)[trim:-trim]
            lanes.append(Lane(lane_pts, _headings(lane_pts), tail, head))
            out_lanes[tail].append(len(lanes) - 1)
    return lanes, out_lanes


# Helper rasters at AUX_RES (aux x aux cells): where streets, water and buildings are, for placing things.


def _road_distance(centerlines: list[np.ndarray], aux: int) -> np.ndarray:
    """Distance (m) from every cell to the nearest street centre line."""
    street = np.full((aux, aux), 255, np.uint8)
    for line in centerlines:
        cv2.polylines(street, [_raster(line)], False, 0, 1)
    return cv2.distanceTransform(street, cv2.DIST_L2, 5) * AUX_RES


def _island(
    rng: np.random.Generator, grid: _Grid, centerlines: list[np.ndarray], aux: int, size: float
) -> np.ndarray:
    """Land: the street grid's hull grown by a coast of 12..45 m (noise), so some stretches of the ring
    road have sea a few metres past the sidewalk."""
    hull = np.zeros((aux, aux), np.uint8)
    cv2.fillPoly(hull, [_raster(grid.nodes[grid.ring_nodes()])], 255)
    for line in centerlines:
        cv2.polylines(hull, [_raster(line)], False, 255, 3)
    outside = cv2.distanceTransform(255 - hull, cv2.DIST_L2, 5) * AUX_RES
    coast = 12.0 + 33.0 * _smooth_noise(rng, (aux, aux), max(4, int(size / 60)))
    return outside < coast


def _lakes(rng: np.random.Generator, grid: _Grid, road_dist: np.ndarray, n_lakes: int) -> np.ndarray:
    """Whole blocks whose interior (beyond a 2.5..8 m bank) is water; the bank is as thin as a sidewalk
    in places, so noise or a bad model can drive into it."""
    aux = len(road_dist)
    lake = np.zeros((aux, aux), bool)
    blocks = grid.blocks
    for b in rng.permutation(len(blocks))[: max(0, n_lakes)]:
        mask = np.zeros((aux, aux), np.uint8)
        cv2.fillPoly(mask, [_raster(grid.block(*blocks[b]))], 1)
        bank = ROAD_W / 2 + SIDEWALK_W + 0.5 + 6.0 * _smooth_noise(rng, (aux, aux), 8)
        lake |= (mask > 0) & (road_dist > bank)
    return lake


@dataclass
class _Props:
    """Boxes placed so far, as lists: corners [4, 2], height (m), colour."""

    quads: list[np.ndarray] = field(default_factory=list)
    heights: list[float] = field(default_factory=list)
    colors: list = field(default_factory=list)

    def add(self, quad: np.ndarray, height: float, color) -> None:
        self.quads.append(quad)
        self.heights.append(height)
        self.colors.append(color)


def _place_buildings(
    rng: np.random.Generator,
    grid: _Grid,
    road_dist: np.ndarray,
    water: np.ndarray,
    town_r: float,
    check: _Checkpoint,
) -> tuple[_Props, np.ndarray]:
    """Buildings in every block, set back from the streets, off the water, apart from each other; and the
    raster of the cells they occupy."""
    aux = len(road_dist)
    occupied = np.zeros((aux, aux), np.uint8)
    out = _Props()
    centre = grid.nodes.mean(axis=0)
    setback = ROAD_W / 2 + SIDEWALK_W + 3.0
    for i, j in grid.blocks:
        check()
        quad = grid.block(i, j)
        lo, hi = quad.min(axis=0), quad.max(axis=0)
        d = quad[1] - quad[0]
        base_angle = math.atan2(d[1], d[0])
        for _ in range(70):  # tries per block; the setback and overlap checks reject most
            cx, cy = rng.uniform(lo, hi)
            length, width = rng.uniform(9, 30), rng.uniform(9, 24)
            angle = base_angle + rng.choice((0.0, math.pi / 2)) + rng.normal(0, 0.05)
            rect = oriented_rect(cx, cy, angle, length, width)
            probe = np.concatenate([rect, (rect + np.roll(rect, -1, axis=0)) / 2, [[cx, cy]]])
            pu = np.clip((probe[:, 0] / AUX_RES).astype(int), 0, aux - 1)
            pv = np.clip((probe[:, 1] / AUX_RES).astype(int), 0, aux - 1)
            if (road_dist[pv, pu] < setback).any() or water[pv, pu].any():
                continue
            u0, v0 = max(0, pu.min() - 2), max(0, pv.min() - 2)
            if occupied[v0 : pv.max() + 3, u0 : pu.max() + 3].any():
                continue
            cv2.fillConvexPoly(occupied, _raster(rect), 1)
            # Taller towards the middle of town, like a downtown.
            r = float(np.linalg.norm([cx, cy] - centre)) / town_r
            height = rng.uniform(5, 14) + max(0.0, 1.0 - r) * rng.uniform(0, 45)
            out.add(rect, height, FACADES[rng.integers(len(FACADES))] * rng.uniform(0.85, 1.1))
    return out, occupied


def _place_obstacles(
    rng: np.random.Generator,
    centerlines: list[np.ndarray],
    road_dist: np.ndarray,
    water: np.ndarray,
    occupied: np.ndarray,
    per_100m: float,
    check: _Checkpoint,
) -> _Props:
    """Obstacles along the streets, on the verge beyond the sidewalk, never on the road or in water."""
    aux = len(road_dist)
    out = _Props()
    spacing = 100.0 / per_100m if per_100m > 0 else math.inf
    for line in centerlines:
        check()
        length = (len(line) - 1) * LANE_STEP
        s = 14.0 + rng.uniform(0, min(spacing, length))
        hd = _headings(line)
        while s < length - 14.0:
            k = int(s / LANE_STEP)
            side = rng.choice((-1.0, 1.0))
            kind = OBSTACLE_KINDS[rng.integers(len(OBSTACLE_KINDS))]
            off = ROAD_W / 2 + SIDEWALK_W + rng.uniform(0.5, 2.5) + kind[1] / 2
            nx, ny = -math.sin(hd[k]) * side, math.cos(hd[k]) * side
            ox, oy = line[k, 0] + nx * off, line[k, 1] + ny * off
            au, av = int(ox / AUX_RES), int(oy / AUX_RES)
            s += spacing * rng.uniform(0.5, 1.5)
            if not (0 <= au < aux and 0 <= av < aux) or water[av, au] or occupied[av, au]:
                continue
            if road_dist[av, au] < ROAD_W / 2 + SIDEWALK_W:
                continue  # a curve or junction brought another street close: keep the road clear
            out.add(oriented_rect(ox, oy, hd[k], kind[1], kind[1]), kind[2], kind[3])
    return out


def _boxes(buildings: _Props, obstacles: _Props) -> Boxes:
    """Buildings then obstacles as one Boxes, standing on the ground."""
    return Boxes(
        np.array(buildings.quads + obstacles.quads, np.float32).reshape(-1, 4, 2),
        np.zeros(len(buildings.quads) + len(obstacles.quads), np.float32),
        np.array(buildings.heights + obstacles.heights, np.float32),
        np.array(buildings.colors + obstacles.colors, np.float32).reshape(-1, 3),
    )


def _generate(
    seed: int,
    blocks: int,
    block_m: float,
    curved: float,
    removed: float,
    n_lakes: int,
    tex_res: float,
    cls_res: float,
    obst_per_100m: float,
    *,
    should_stop: Callable[[], bool] | None = None,
) -> Town:
    """The town, step by step. One random stream feeds every step in this order: reordering the steps, or
    drawing more or less in one, changes every town after it (tests/test_sim_town.py pins a town's bytes)."""
    check = _Checkpoint(should_stop)
    rng = np.random.default_rng(seed)
    margin = 70.0  # coast room around the outer streets (m): sand, sea and the odd close shave
    size = 2 * margin + blocks * block_m

    # the street graph
    grid = _Grid.jittered(rng, blocks + 1, block_m, margin)
    nodes = grid.nodes
    edges, ring = grid.streets()
    edges = _remove_streets(rng, len(nodes), edges, ring, removed)
    centerlines = _centerlines(rng, nodes, edges, ring, curved)
    lanes, out_lanes = _lanes(len(nodes), edges, centerlines)
    check()

    # land and water
    aux = int(math.ceil(size / AUX_RES))
    road_dist = _road_distance(centerlines, aux)
    land = _island(rng, grid, centerlines, aux, size)
    check()
    water = ~land | _lakes(rng, grid, road_dist, n_lakes)
    check()

    # what stands on it
    buildings, occupied = _place_buildings(rng, grid, road_dist, water, blocks * block_m / 2, check)
    obstacles = _place_obstacles(rng, centerlines, road_dist, water, occupied, obst_per_100m, check)

    # what collisions and cameras read
    check()
    classes = _rasterize_classes(size, cls_res, water, centerlines, buildings.quads, obstacles.quads)
    check()
    texture = _paint_texture(rng, size, tex_res, water, centerlines, nodes, buildings.quads, check)
    return Town(
        seed,
        size,
        nodes,
        edges,
        centerlines,
        lanes,
        out_lanes,
        texture,
        tex_res,
        classes,
        cls_res,
        _boxes(buildings, obstacles),
        len(buildings.quads),
        len(obstacles.quads),
    )


def _resample_mask(mask: np.ndarray, px: int) -> np.ndarray:
    """A boolean AUX_RES mask at ``px`` x ``px`` with smooth (interpolated, thresholded) edges."""
    return cv2.resize(mask.astype(np.float32), (px, px), interpolation=cv2.INTER_LINEAR) > 0.5


def _pts(points: np.ndarray, res: float) -> np.ndarray:
    """World points -> int32 pixel coordinates with 2 fractional bits (for cv2 ``shift=2``)."""
    return np.round(points / res * 4).astype(np.int32)


def _rasterize_classes(
    size: float,
    res: float,
    water: np.ndarray,
    centerlines: list[np.ndarray],
    buildings: list[np.ndarray],
    obstacles: list[np.ndarray],
) -> np.ndarray:
    px = int(math.ceil(size / res))
    classes = np.full((px, px), TERRAIN, np.uint8)
    classes[_resample_mask(water, px)] = WATER
    thick = max(1, round(ROAD_W / res))
    for line in centerlines:
        cv2.polylines(classes, [_pts(line, res)], False, ROAD, thick, cv2.LINE_8, 2)
    for quad in buildings:
        cv2.fillConvexPoly(classes, _pts(quad, res), BUILDING, cv2.LINE_8, 2)
    for quad in obstacles:
        cv2.fillConvexPoly(classes, _pts(quad, res), OBSTACLE, cv2.LINE_8, 2)
    return classes


def _paint_texture(
    rng: np.random.Generator,
    size: float,
    res: float,
    water: np.ndarray,
    centerlines: list[np.ndarray],
    nodes: np.ndarray,
    buildings: list[np.ndarray],
    check: Callable[[], None] = lambda: None,
) -> np.ndarray:
    """The unlit ground texture (RGB uint8); lighting and weather are applied per instance elsewhere.

    ``check`` runs between row chunks: the texture is most of a town's build time.
    """
    px = int(math.ceil(size / res))
    # Grass with dirt patches and fine grain: grain from a small random tile repeated (cheap, and the
    # repeat is far larger than anything a camera resolves).
    patches = _smooth_noise(rng, (px, px), max(8, int(size / 25)))
    tile = rng.normal(0, 7, (256, 256)).astype(np.float32)
    wet = _resample_mask(water, px)
    k = max(1, int(5.0 / res))
    shore = (
        cv2.dilate(wet.astype(np.uint8), cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * k + 1, 2 * k + 1)))
        > 0
    )
    reps = px // 256 + 1
    grain = np.tile(tile, (reps, reps))[:px, :px]
    tex = np.empty((px, px, 3), np.uint8)
    grass, dirt = np.array(GRASS, np.float32), np.array(DIRT, np.float32)
    for r0 in range(0, px, 256):  # in row chunks: float32 full-size temporaries would cost ~150 MB
        check()
        rows = slice(r0, min(px, r0 + 256))
        p = patches[rows, :, None] * 0.7
        g = grain[rows, :, None]
        chunk = grass * (1 - p) + dirt * p + g
        # The sandy shore is the land within ~5 m of water.
        chunk = np.where(shore[rows, :, None], np.array(SAND, np.float32) + g * 0.6, chunk)
        chunk = np.where(wet[rows, :, None], np.array(SEA, np.float32) + g * 0.4, chunk)
        tex[rows] = chunk.clip(0, 255)
    del patches

    lines = [_pts(c, res) for c in centerlines]
    side = max(1, round((ROAD_W + 2 * SIDEWALK_W) / res))
    cv2.polylines(tex, lines, False, CONCRETE, side, cv2.LINE_AA, 2)
    for p in nodes:
        cv2.circle(
            tex,
            tuple(int(c) for c in _pts(p, res)),
            int((ROAD_W / 2 + SIDEWALK_W) / res * 4),
            CONCRETE,
            -1,
            cv2.LINE_8,
            2,
        )
    asphalt = np.zeros((px, px), np.uint8)
    cv2.polylines(asphalt, lines, False, 255, max(1, round(ROAD_W / res)), cv2.LINE_AA, 2)
    for p in nodes:
        cv2.circle(
            asphalt, tuple(int(c) for c in _pts(p, res)), int(ROAD_W / 2 / res * 4), 255, -1, cv2.LINE_AA, 2
        )
    dark = np.array(ASPHALT, np.float32)
    for r0 in range(0, px, 256):  # blend anti-aliased asphalt with grain, in row chunks (memory)
        check()
        rows = slice(r0, min(px, r0 + 256))
        a = asphalt[rows, :, None].astype(np.float32) / 255.0
        if not a.any():
            continue
        paved = dark + grain[rows, :, None] * 0.8
        tex[rows] = (tex[rows] * (1 - a) + paved * a).clip(0, 255)
    del asphalt, grain

    # Lane marks: solid white edge lines, dashed yellow centre line (3 m on, 6 m off), a white stop line
    # across the right lane before each junction. None inside junctions.
    # Marks are 2 texels wide whatever the scale: a 1-texel anti-aliased line turns blotchy when the hood
    # camera magnifies the near road ~10x (real marks are 0.1-0.15 m; these are ~0.4 m, GTA-bold).
    mark = 2
    trim = int(JUNCTION_TRIM / LANE_STEP)
    for line in centerlines:
        check()
        inner = line[trim:-trim]
        if len(inner) < 2:
            continue
        for off in (ROAD_W / 2 - 0.6, -(ROAD_W / 2 - 0.6)):
            cv2.polylines(tex, [_pts(_offset_right(inner, off), res)], False, WHITE, mark, cv2.LINE_AA, 2)
        for a in range(0, len(inner) - 3, 9):
            cv2.polylines(tex, [_pts(inner[a : a + 4], res)], False, YELLOW, mark, cv2.LINE_AA, 2)
        for pts in (inner, inner[::-1]):
            hd = math.atan2(pts[-1, 1] - pts[-2, 1], pts[-1, 0] - pts[-2, 0])
            rx, ry = math.sin(hd), -math.cos(hd)
            a = pts[-1] + np.array([rx, ry]) * 0.2
            b = pts[-1] + np.array([rx, ry]) * (ROAD_W / 2 - 0.5)
            cv2.line(
                tex,
                tuple(int(c) for c in _pts(a, res)),
                tuple(int(c) for c in _pts(b, res)),
                WHITE,
                max(1, round(0.4 / res)),
                cv2.LINE_AA,
                2,
            )
    for quad in buildings:
        cv2.fillConvexPoly(tex, _pts(quad, res), FOOTPRINT, cv2.LINE_8, 2)
    # A touch of blur: the hood camera magnifies the near road ~10x, where raw texel steps and grain read
    # as blotches; this is the texture-space equivalent of a little lens softness.
    cv2.GaussianBlur(tex, (3, 3), 0.6, dst=tex)
    return tex
