"""Cameras: the hood camera the model sees and the chase camera people watch, in pure numpy/OpenCV.

Why it is fast (the hood camera must reach >= 300 frames/s on one core at 480x270):

- The ground is a plane, so the map from image pixels to ground points is a homography. It is derived
  once per camera (:class:`Camera`); per frame it is composed with the car's pose and the whole ground is
  one ``cv2.warpPerspective`` of the town's top-down texture per mip band.
- Far rows read a smaller (``pyrDown``) texture: a far pixel covers metres of ground, and sampling the
  full-resolution texture there only buys shimmer and cache misses.
- Light, weather haze, distance fog and night headlights depend on the image row and column only (the
  camera is rigid on the car), so they are one precomputed multiply image and one add image per camera
  and lighting: two saturating OpenCV calls per frame.
- Buildings, obstacles and cars are extruded quads: the visible set is culled and projected in one
  vectorised pass, then each visible face is one ``cv2.fillConvexPoly`` (far to near).

Images are RGB uint8, height x width x 3.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import cv2
import numpy as np

from charles.sim.config import WEATHERS
from charles.sim.town import SEA, Boxes, Town

MIP_LEVELS = 5
"""Texture pyramid depth: level 4 is 1/16 resolution, about what the horizon band of a 480 px image needs."""
NEAR = 0.3
"""Near clipping distance (m) in front of the camera."""
KEEP_SCALE = 128.0
"""Fixed point of the per-pixel light multiplier: uint8 value / 128, so gains up to ~2 fit."""


def _mix(a, b, t: float) -> np.ndarray:
    return np.asarray(a, np.float32) * (1 - t) + np.asarray(b, np.float32) * t


def _smoothstep(e0: float, e1: float, x):
    t = np.clip((np.asarray(x, np.float64) - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass(frozen=True)
class Lighting:
    """What weather and the hour do to the picture; derived, never configured directly."""

    weather: str
    hour: float
    gain: tuple[float, float, float]
    """Per-channel light on the ground and objects (includes the sun's height and tint)."""
    sky_top: tuple[float, float, float]
    sky_horizon: tuple[float, float, float]
    haze: tuple[float, float, float]
    """Colour distant things fade into."""
    visibility_m: float
    """Distance (m) at which ~63 % of a colour is haze."""
    headlights: float
    """0 by day, up to 1 at night: strength of the car's own light cone."""
    sun_dir: tuple[float, float]
    """Unit vector towards the sun on the ground plane (shades building faces)."""
    contrast: float
    """How much face shading varies with the sun (0 under clouds)."""
    rain: bool

    @staticmethod
    def of(weather: str, hour: float) -> Lighting:
        if weather not in WEATHERS:
            raise ValueError(f"weather must be one of {WEATHERS}, got {weather!r}")
        elev = math.sin(math.pi * (hour - 6.0) / 12.0)  # sun height: 1 at noon, -1 at midnight
        day = float(_smoothstep(-0.15, 0.35, elev))
        golden = float(_smoothstep(0.35, 0.0, abs(elev - 0.12)) * (elev > -0.1))
        bright = 0.2 + 0.8 * day  # night-ish, not black: the model must still see something
        tint = _mix((0.72, 0.82, 1.12), (1.0, 1.0, 1.0), day)  # moonlight blue -> white
        tint = _mix(tint, (1.12, 0.94, 0.76), golden * 0.8)  # dawn and dusk are orange
        sky_top = _mix((8, 12, 28), (80, 130, 205), day)
        sky_hor = _mix((26, 32, 52), (180, 204, 228), day)
        sky_hor = _mix(sky_hor, (245, 170, 110), golden * 0.7)
        vis, contrast = 1200.0, 0.35 * day
        if weather == "overcast":
            bright *= 0.82
            sky_top, sky_hor = (
                _mix(sky_top, (150, 154, 160), 0.8 * day),
                _mix(sky_hor, (192, 194, 198), 0.8 * day),
            )
            vis, contrast = 700.0, 0.08 * day
        elif weather == "rain":
            bright *= 0.64
            tint = _mix(tint, (0.92, 0.98, 1.06), 0.6)
            sky_top, sky_hor = sky_top * 0.45 + 40, sky_hor * 0.55 + 50
            vis, contrast = 170.0, 0.05 * day
        elif weather == "fog":
            bright *= 0.9
            sky_top = sky_hor = _mix(sky_hor, (200, 202, 205), 0.85) * (0.3 + 0.7 * day)
            vis, contrast = 45.0, 0.0
        gain = tuple(float(g) for g in np.asarray(tint) * bright)
        haze = sky_hor if weather != "fog" else sky_top
        az = -math.pi * (hour - 6.0) / 12.0  # east at 6 h, south at noon, west at 18 h
        return Lighting(
            weather=weather,
            hour=hour,
            gain=gain,
            sky_top=tuple(map(float, sky_top)),
            sky_horizon=tuple(map(float, sky_hor)),
            haze=tuple(map(float, haze)),
            visibility_m=vis,
            headlights=float(1.0 - _smoothstep(0.0, 0.6, day)),
            sun_dir=(math.cos(az), math.sin(az)),
            contrast=float(contrast),
            rain=weather == "rain",
        )

    def light(self, rgb) -> np.ndarray:
        """An unlit colour (or [..., 3] colours) under this light, float32."""
        return np.asarray(rgb, np.float32) * np.asarray(self.gain, np.float32)


def mip_textures(town: Town) -> list[np.ndarray]:
    """The town texture and its pyramid (cached on the town: every camera and instance shares it)."""
    if "mips" not in town.cache:
        levels = [town.texture]
        for _ in range(MIP_LEVELS - 1):
            levels.append(cv2.pyrDown(levels[-1]))
        town.cache["mips"] = levels
    return town.cache["mips"]


class Camera:
    """A pinhole camera rigidly mounted on a car; renders a town at any car pose.

    ``forward_m`` and ``height_m`` place it relative to the car centre (negative forward = behind),
    ``pitch_deg`` tilts it down. Everything that depends only on the mount is computed here once.
    """

    def __init__(
        self,
        width: int,
        height: int,
        fov_deg: float,
        height_m: float,
        pitch_deg: float,
        forward_m: float,
        view_distance_m: float = 250.0,
    ):
        self.w, self.h = int(width), int(height)
        self.f = (self.w / 2) / math.tan(math.radians(fov_deg) / 2)
        self.px, self.py = self.w / 2, self.h / 2
        self.height_m, self.forward_m = float(height_m), float(forward_m)
        self.pitch = math.radians(pitch_deg)
        self.view = float(view_distance_m)
        self.tan_half = math.tan(math.radians(fov_deg) / 2)
        sp, cp, f, ch = math.sin(self.pitch), math.cos(self.pitch), self.f, self.height_m
        # Image pixel (i, j, 1) -> ground point in camera-centred car axes (forward, left, 1), homogeneous.
        self.ground_h = np.array(
            [
                [0.0, -sp / f, cp + sp * self.py / f],
                [-1.0 / f, 0.0, self.px / f],
                [0.0, cp / (f * ch), (sp - cp * self.py / f) / ch],
            ]
        )
        # Forward distance of each row's ground point at the centre column (inf at and above the horizon).
        j = np.arange(self.h, dtype=np.float64) + 0.5
        num = -sp / f * j + cp + sp * self.py / f
        den = (cp / f * j + sp - cp * self.py / f) / ch
        with np.errstate(divide="ignore", invalid="ignore"):
            dist = np.where(den > 1e-9, num / den, np.inf)
        self.row_dist = dist
        self.horizon = self.py - f * math.tan(self.pitch)
        ground_rows = np.nonzero(np.isfinite(dist) & (dist > 0) & (dist < self.view))[0]
        self.g0 = int(ground_rows[0]) if len(ground_rows) else self.h
        # Ground metres one pixel covers (geometric mean of across and along the view): picks mip levels.
        d = dist[self.g0 :] if self.g0 < self.h else np.zeros(0)
        along = np.abs(np.gradient(d)) if len(d) > 1 else np.ones_like(d)
        self._footprint = np.sqrt(d / self.f * along)
        self._cache: dict = {}

    def bands_for(self, texture_res: float) -> list[tuple[int, int, int]]:
        """(first row, end row, mip level) runs over the ground rows for a texture resolution (cached)."""
        key = ("bands", texture_res)
        if key not in self._cache:
            if self.g0 >= self.h:
                self._cache[key] = []
            else:
                texels = self._footprint / texture_res
                level = np.clip(np.floor(np.log2(np.maximum(texels, 1.0))), 0, MIP_LEVELS - 1).astype(int)
                runs, start = [], self.g0
                for r in range(1, len(level) + 1):
                    if r == len(level) or level[r] != level[r - 1]:
                        runs.append((start, self.g0 + r, int(level[r - 1])))
                        start = self.g0 + r
                self._cache[key] = runs
        return self._cache[key]

    # --- per lighting -------------------------------------------------------------------------------------
    def ground_grid(self) -> tuple[np.ndarray, np.ndarray]:
        """Forward and left (m, camera-centred car axes) of every ground row pixel, [rows, w] each."""
        i, j = np.meshgrid(np.arange(self.w) + 0.5, np.arange(self.g0, self.h) + 0.5)
        p = self.ground_h @ np.stack([i.ravel(), j.ravel(), np.ones(i.size)])
        fwd = (p[0] / p[2]).reshape(i.shape)
        left = (p[1] / p[2]).reshape(i.shape)
        return fwd, left

    def lit(self, light: Lighting) -> dict:
        """Background, light multiplier and haze images for one lighting (cached per camera)."""
        key = ("lit", light)
        if key in self._cache:
            return self._cache[key]
        lit_keys = [k for k in self._cache if k[0] == "lit"]
        if len(lit_keys) >= 4:  # bounded: an instance that keeps changing the hour must not grow forever
            del self._cache[lit_keys[0]]
        h, w = self.h, self.w
        # Sky: zenith colour to horizon colour; between the horizon and the first drawn ground row, haze.
        j = np.arange(h, dtype=np.float32)[:, None]
        t = np.clip((j - (self.horizon - 0.6 * h)) / (0.6 * h), 0, 1)
        sky = np.asarray(light.sky_top, np.float32) * (1 - t) + np.asarray(light.sky_horizon, np.float32) * t
        sky[j[:, 0] >= self.horizon] = light.haze
        background = np.repeat(sky[:, None, :], w, axis=1).clip(0, 255).astype(np.uint8)
        keep = add = None
        if self.g0 < h:
            fwd, left = self.ground_grid()
            dist = np.hypot(fwd, left)
            fog = 1.0 - np.exp(-dist / light.visibility_m)
            fog = np.maximum(fog, _smoothstep(0.75 * self.view, self.view, dist))  # hide the far cut
            # Headlights: a cone ahead of the car, brightest near, fading out by ~45 m.
            car_fwd = fwd + self.forward_m
            cone = np.exp(-((left / (1.2 + 0.3 * np.maximum(car_fwd, 0))) ** 2))
            reach = np.clip(1.0 - car_fwd / 45.0, 0, 1) * _smoothstep(1.5, 4.0, car_fwd)
            lamp = light.headlights * cone * reach
            gain = np.asarray(light.gain, np.float32)
            lightness = gain[None, None, :] + (lamp * 0.9)[..., None] * (1 - gain[None, None, :])
            keep = (lightness * (1 - fog)[..., None] * KEEP_SCALE).clip(0, 255).astype(np.uint8)
            add = (fog[..., None] * np.asarray(light.haze, np.float32)).clip(0, 255).astype(np.uint8)
        rain = []
        if light.rain:
            rng = np.random.default_rng(7)  # fixed: streak images are part of the camera, not the world
            for _ in range(4):
                img = np.zeros((h, w, 3), np.uint8)
                for _ in range(int(w * h / 2500)):
                    x, y = rng.uniform(0, w), rng.uniform(0, h)
                    ln = rng.uniform(0.03, 0.08) * h
                    cv2.line(
                        img, (int(x), int(y)), (int(x - 0.15 * ln), int(y + ln)), (38, 40, 44), 1, cv2.LINE_AA
                    )
                rain.append(img)
        out = {"background": background, "keep": keep, "add": add, "rain": rain}
        self._cache[key] = out
        return out

    # --- per frame ------------------------------------------------------------------------------------
    def pose_of(self, x: float, y: float, heading: float) -> tuple[float, float, float, float]:
        """Camera ground position and heading cos/sin for a car pose."""
        c, s = math.cos(heading), math.sin(heading)
        return x + c * self.forward_m, y + s * self.forward_m, c, s

    def render(
        self,
        town: Town,
        light: Lighting,
        x: float,
        y: float,
        heading: float,
        boxes: Boxes | None = None,
        box_colors: np.ndarray | None = None,
        frame_no: int = 0,
        out: np.ndarray | None = None,
    ) -> np.ndarray:
        """The view from a car at (x, y, heading): ground, then boxes far to near.

        ``box_colors`` are the boxes' lit colours [N, 3]; ``frame_no`` only animates rain.
        """
        h, w = self.h, self.w
        lit = self.lit(light)
        if out is not None and (
            out.shape != (h, w, 3) or out.dtype != np.uint8 or not out.flags.c_contiguous
        ):
            raise ValueError(f"out must be a C-contiguous uint8 array of shape {(h, w, 3)}, got {out.shape}")
        img = out if out is not None else np.empty((h, w, 3), np.uint8)
        cx, cy, c, s = self.pose_of(x, y, heading)
        if self.g0 > 0:
            img[: self.g0] = lit["background"][: self.g0]
        if self.g0 < h:
            mips = mip_textures(town)
            pose = np.array([[c, -s, cx], [s, c, cy], [0.0, 0.0, 1.0]])
            world_h = pose @ self.ground_h
            border = tuple(int(v) for v in SEA)
            for j0, j1, level in self.bands_for(town.texture_res):
                scale = 1.0 / (town.texture_res * (1 << level))
                shift = np.array([[1.0, 0, 0], [0, 1.0, j0], [0, 0, 1.0]])
                m = np.diag([scale, scale, 1.0]) @ world_h @ shift
                cv2.warpPerspective(
                    mips[level],
                    m,
                    (w, j1 - j0),
                    dst=img[j0:j1],
                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                    borderMode=cv2.BORDER_CONSTANT,
                    borderValue=border,
                )
            ground = img[self.g0 :]
            cv2.multiply(ground, lit["keep"], dst=ground, scale=1.0 / KEEP_SCALE)
            cv2.add(ground, lit["add"], dst=ground)
        if boxes is not None and len(boxes):
            self.draw_boxes(img, light, boxes, box_colors, cx, cy, c, s)
        if lit["rain"]:
            cv2.add(img, lit["rain"][frame_no % len(lit["rain"])], dst=img)
        return img

    def project(
        self, fwd: np.ndarray, left: np.ndarray, up: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Camera-centred car axes (m) -> image x, image y, depth."""
        sp, cp = math.sin(self.pitch), math.cos(self.pitch)
        dz = up - self.height_m
        depth = cp * fwd - sp * dz
        down = -sp * fwd - cp * dz
        with np.errstate(divide="ignore", invalid="ignore"):
            inv = self.f / np.maximum(depth, 1e-6)
        return self.px - left * inv, self.py + down * inv, depth

    def draw_boxes(
        self,
        img: np.ndarray,
        light: Lighting,
        boxes: Boxes,
        colors: np.ndarray | None,
        cx: float,
        cy: float,
        c: float,
        s: float,
    ) -> None:
        """Cull, shade and draw extruded quads far to near (painter's algorithm)."""
        rel_x = boxes.corners[..., 0] - cx
        rel_y = boxes.corners[..., 1] - cy
        fwd = rel_x * c + rel_y * s
        left = -rel_x * s + rel_y * c
        dist = np.hypot(fwd, left)
        t = self.tan_half * 1.1
        keep = (fwd.max(axis=1) > NEAR) & (dist.min(axis=1) < self.view)
        keep &= ~((left > fwd * t + 0.5).all(axis=1) | (-left > fwd * t + 0.5).all(axis=1))
        idx = np.nonzero(keep)[0]
        if not len(idx):
            return
        fwd, left, corners = fwd[idx], left[idx], boxes.corners[idx]
        z0, z1 = boxes.z0[idx], boxes.z1[idx]
        centre_d = np.hypot(fwd.mean(axis=1), left.mean(axis=1)) - boxes.bias[idx]
        base = (colors[idx] if colors is not None else light.light(boxes.colors[idx])).astype(np.float32)

        # Vertices: 4 bottom then 4 top, projected at once.
        vf = np.concatenate([fwd, fwd], axis=1)
        vl = np.concatenate([left, left], axis=1)
        vu = np.concatenate([np.repeat(z0[:, None], 4, 1), np.repeat(z1[:, None], 4, 1)], axis=1)
        ix, iy, depth = self.project(vf, vl, vu)
        pts = np.stack([np.clip(ix, -1e5, 1e5), np.clip(iy, -1e5, 1e5)], axis=-1)
        pts = np.round(pts * 16).astype(np.int32)  # 4 fractional bits (shift=4): smooth edges when moving

        # Face visibility: the camera is outside the edge's outward normal (corners are counter-clockwise).
        edge = np.roll(corners, -1, axis=1) - corners
        normal = np.stack([edge[..., 1], -edge[..., 0]], axis=-1)
        to_cam = np.stack([cx - corners[..., 0], cy - corners[..., 1]], axis=-1)
        facing = (normal * to_cam).sum(-1) > 0
        nlen = np.linalg.norm(normal, axis=-1) + 1e-9
        sun = (normal[..., 0] * light.sun_dir[0] + normal[..., 1] * light.sun_dir[1]) / nlen
        shade = 0.78 + light.contrast * sun  # lit faces brighter, the far side darker
        # Distance haze and the headlights on what is near and ahead.
        d = np.maximum(centre_d, 0.0)
        fog = np.maximum(1.0 - np.exp(-d / light.visibility_m), _smoothstep(0.75 * self.view, self.view, d))
        lamp = light.headlights * np.clip(1 - d / 40.0, 0, 1) * 0.8
        gain = np.asarray(light.gain, np.float32)
        base = base * (1 + lamp[:, None] * (1 / np.maximum(gain, 0.05) - 1) * 0.5)
        haze = np.asarray(light.haze, np.float32)
        face_rgb = base[:, None, :] * shade[..., None]
        face_rgb = face_rgb * (1 - fog[:, None, None]) + haze * fog[:, None, None]
        top_rgb = base * 0.92 * (1 - fog[:, None]) + haze * fog[:, None]
        face_rgb = face_rgb.clip(0, 255).tolist()
        top_rgb = top_rgb.clip(0, 255).tolist()
        front = depth > NEAR
        cam_up = self.height_m

        for k in np.argsort(-centre_d):
            fr = front[k]
            for e in range(4):
                if not facing[k, e]:
                    continue
                quad = (e, (e + 1) % 4, (e + 1) % 4 + 4, e + 4)
                if fr[quad[0]] and fr[quad[1]] and fr[quad[2]] and fr[quad[3]]:
                    cv2.fillConvexPoly(img, pts[k, quad], face_rgb[k][e], cv2.LINE_8, 4)
                elif fr[quad[0]] or fr[quad[1]] or fr[quad[2]] or fr[quad[3]]:
                    self._clipped(img, vf[k, quad], vl[k, quad], vu[k, quad], face_rgb[k][e])
            if z1[k] < cam_up:  # roofs are seen from above only (the chase camera, low obstacles)
                top = (4, 5, 6, 7)
                if fr[4] and fr[5] and fr[6] and fr[7]:
                    cv2.fillConvexPoly(img, pts[k, top], top_rgb[k], cv2.LINE_8, 4)
                elif fr[4] or fr[5] or fr[6] or fr[7]:
                    self._clipped(img, vf[k, top], vl[k, top], vu[k, top], top_rgb[k])

    def _clipped(self, img: np.ndarray, f: np.ndarray, l: np.ndarray, u: np.ndarray, color) -> None:  # noqa: E741
        """Draw a planar polygon that crosses the near plane: clip it in camera space (Sutherland-Hodgman)."""
        sp, cp = math.sin(self.pitch), math.cos(self.pitch)
        verts = [(float(a), float(b), float(z)) for a, b, z in zip(f, l, u, strict=True)]
        depth = [cp * a - sp * (z - self.height_m) for a, _, z in verts]
        out = []
        n = len(verts)
        for i in range(n):
            j = (i + 1) % n
            di, dj = depth[i] - NEAR, depth[j] - NEAR
            if di >= 0:
                out.append(verts[i])
            if (di >= 0) != (dj >= 0):
                t = di / (di - dj)
                out.append(tuple(verts[i][k] + t * (verts[j][k] - verts[i][k]) for k in range(3)))
        if len(out) < 3:
            return
        arr = np.array(out)
        ix, iy, _ = self.project(arr[:, 0], arr[:, 1], arr[:, 2])
        pts = np.round(np.stack([np.clip(ix, -1e5, 1e5), np.clip(iy, -1e5, 1e5)], -1) * 16).astype(np.int32)
        cv2.fillConvexPoly(img, pts, color, cv2.LINE_8, 4)


def hood_camera(
    width: int = 480, height: int = 270, fov_deg: float = 80.0, view_distance_m: float = 250.0
) -> Camera:
    """The model's view: low on the bonnet looking slightly down, like GTA V's hood camera."""
    return Camera(
        width, height, fov_deg, height_m=1.35, pitch_deg=3.0, forward_m=0.4, view_distance_m=view_distance_m
    )


def chase_camera(width: int = 640, height: int = 360, view_distance_m: float = 250.0) -> Camera:
    """The cinematic third-person view: behind and above the car, looking down at it."""
    return Camera(
        width, height, 70.0, height_m=3.4, pitch_deg=11.0, forward_m=-7.5, view_distance_m=view_distance_m
    )


def draw_hood(img: np.ndarray, rgb) -> None:
    """The bonnet at the bottom of the hood view, in the (lit) car colour, with a highlight on its edge."""
    h, w = img.shape[:2]
    top, side = h - 0.11 * h, h - 0.05 * h
    poly = np.array([(0, h), (0, side), (0.22 * w, top), (0.78 * w, top), (w, side), (w, h)]) * 16
    color = tuple(float(v) for v in np.clip(rgb, 0, 255))
    cv2.fillConvexPoly(img, np.round(poly).astype(np.int32), color, cv2.LINE_8, 4)
    hi = tuple(float(min(255.0, v * 1.35 + 20)) for v in color)
    edge = np.array([(0, side), (0.22 * w, top), (0.78 * w, top), (w, side)]) * 16
    cv2.polylines(img, [np.round(edge).astype(np.int32)], False, hi, max(1, h // 135), cv2.LINE_8, 4)


def fade(img: np.ndarray, factor: float) -> np.ndarray:
    """Scale brightness in place (Unstuck's fade to black and back); 1 leaves the image untouched."""
    if factor < 1.0:
        cv2.convertScaleAbs(img, dst=img, alpha=max(0.0, float(factor)))
    return img
