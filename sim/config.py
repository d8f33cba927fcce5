"""Typed settings of the built-in driving simulator and its NPC drivers (Unstuck's are charles.drive.unstuck's).

Every field carries ``metadata={"help": ...}`` with one line that says what it is, in which unit and why
its default was chosen, so the run configuration can fold these dataclasses in and print help from them.
Units: metres, seconds, metres per second, radians unless a name says otherwise (``_deg``, ``_kmh``, ``_hz``).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

WEATHERS = ("clear", "overcast", "rain", "fog")
"""Weather presets; each changes light, colour, haze distance and (rain) adds streaks."""

STYLES = ("calm", "normal", "aggressive")
"""NPC driving styles: they scale cruise speed, cornering and how hard the NPC accelerates and brakes."""


def _f(default: Any, help: str) -> Any:  # noqa: A002 - "help" is the metadata key the run configuration reads
    """A dataclass field with its one-line help (defaults here are all immutable: no factories needed)."""
    return field(default=default, metadata={"help": help})


@dataclass
class SimConfig:
    """One sim instance: its town, its car's look, its cameras and the optional traffic."""

    seed: int = _f(0, "Town and everything random in the instance derive from it; same seed, same frames.")
    blocks: int = _f(6, "Town size: blocks per side of the jittered street grid (6 -> about 0.8 km square).")
    block_m: float = _f(
        110.0, "Mean street-grid spacing in m; city blocks of 80-140 m leave room for buildings."
    )
    curved_fraction: float = _f(
        0.4, "Share of streets drawn as curves (0..1) so the model sees bends, not only grids."
    )
    removed_fraction: float = _f(
        0.15, "Share of grid streets removed (keeping every junction >= 2 roads) for T-junctions."
    )
    lakes: int = _f(2, "Lakes placed in city blocks next to streets: water to drive into besides the sea.")
    texture_res_m: float = _f(
        0.25, "Ground texture resolution in m/pixel; 0.25 keeps lane marks 1 px wide at 36 MB/km^2."
    )
    class_res_m: float = _f(
        0.5, "Surface-class map resolution in m/cell, for collisions, sensors and on-road checks."
    )
    obstacles_per_100m: float = _f(2.0, "Road-side obstacles (posts, bins, trees) per 100 m of street.")
    traffic: int = _f(4, "Other NPC cars in the town (0 = empty streets); each costs ~60 us per step.")
    weather: str = _f("clear", f"One of {WEATHERS}: changes light, colours and haze.")
    time_of_day: float = _f(13.0, "Hour of the day 0..24; sets sun height, tint and (at night) headlights.")
    car_color: tuple[int, int, int] | None = _f(
        None, "RGB of the player's car (hood and chase view); None = from the seed."
    )
    hood_width: int = _f(480, "Hood camera width in px; 480x270 is the seed's model input.")
    hood_height: int = _f(270, "Hood camera height in px.")
    hood_fov_deg: float = _f(
        80.0, "Hood camera horizontal field of view in degrees (GTA's hood view is about this)."
    )
    cinematic_width: int = _f(640, "Third-person (chase) camera width in px, for people watching.")
    cinematic_height: int = _f(360, "Third-person (chase) camera height in px.")
    view_distance_m: float = _f(250.0, "Farthest ground and objects drawn, m; beyond it is horizon haze.")
    purpose_marker: bool = _f(True, "Draw the purpose marker (beacon and arrow) on the hood camera.")
    purpose_reach_m: float = _f(
        15.0, "A purpose target counts as reached within this distance (m); a new one is picked."
    )
    purpose_min_m: float = _f(
        150.0, "New purpose targets are at least this far (m, straight line) from the car."
    )

    def __post_init__(self) -> None:
        if self.weather not in WEATHERS:
            raise ValueError(f"weather must be one of {WEATHERS}, got {self.weather!r}")
        if not 0.0 <= self.time_of_day <= 24.0:
            raise ValueError(f"time_of_day is an hour in [0, 24], got {self.time_of_day}")
        if self.blocks < 2:
            raise ValueError("blocks must be >= 2 (a town needs at least one closed block)")
        for name in ("hood_width", "hood_height", "cinematic_width", "cinematic_height"):
            if not 8 <= getattr(self, name) <= 4096:
                raise ValueError(f"{name} must be in [8, 4096]")


@dataclass
class NpcConfig:
    """An autopilot driver: how it drives and how much noise it injects for recovery data."""

    style: str = _f("normal", f"One of {STYLES}: cruise speed, cornering grip used and pedal gains.")
    cruise_kmh: float | None = _f(
        None, "Cruise speed in km/h; None = the style's (calm 40, normal 55, aggressive 75)."
    )
    speed_variation: float = _f(0.15, "Per-street random speed factor spread (+-, fraction) so speeds vary.")
    noise_rate_hz: float = _f(0.15, "Noise events per second of driving (0 = off); 0.15 -> one every ~7 s.")
    noise_duration_s: tuple[float, float] = _f(
        (0.3, 1.5), "Range of one noise event's length in s (uniform)."
    )
    noise_steering: float = _f(
        0.35, "Max steering offset added to the executed action during noise, [-1, 1] units."
    )
    noise_throttle: float = _f(0.2, "Max throttle/brake offset added during noise, [-1, 1] units.")
    sensors: bool = _f(
        True, "Proximity sensors may override the route follower to avoid crashes (never a model input)."
    )
    sensor_range_m: float = _f(30.0, "Longest sensor ray in m; rays also scale with speed (2.5 s of travel).")

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, got {self.style!r}")
        lo, hi = self.noise_duration_s
        if not 0 < lo <= hi:
            raise ValueError("noise_duration_s must be (lo, hi) with 0 < lo <= hi")


def help_lines(cls: type) -> dict[str, str]:
    """Field name -> help line of a config dataclass (what the CLI and the docs print)."""
    return {f.name: f.metadata.get("help", "") for f in fields(cls)}
