"""``python -m charles.agents.capture``: the game PC's eyes — frames and telemetry from GTA V onto the bus.

Per tick (30 Hz by default) it takes a picture of the game, resizes it to the model line's input, reads
the car's telemetry from a mod speaking the DeepGTAV protocol (``charles.agents.deepgtav``) and who drives
it (the mod's autopilot, or a person's pad), and publishes:

* **collect** mode: a :class:`~charles.proto.Sample` on ``sample.<id>`` (labels: the driver's steering and
  combined throttle/brake; speed; purpose; the history of the 60 ticks *before* this one; ``source`` npc or
  human). Unstuck (``charles.drive.unstuck``, the same state machine as the sim collectors) watches the
  position; when it says teleport, the agent rebuilds the mod's scenario at a new location. No samples
  are sent while Unstuck recovers (the car is being moved, the labels mean nothing).
* **play** mode: a :class:`~charles.proto.GameFrame` on ``game.<id>`` for the player (or a collector),
  with speed, position, heading, purpose and the controls the game applied. Frames keep coming while
  Unstuck recovers the car, marked ``recovering`` (a collector takes no sample of them and counts one
  unstuck per recovery); ``recovering`` is false on every frame when this agent runs no Unstuck.

Pictures come from dxcam (``frames: dxcam``, paced by the monotonic clock: tick k is due at start + k/fps,
missed ticks are skipped and counted) or from the mod itself (``frames: deepgtav``: one tick per frame the
mod sends, at the rate we ask it for). Everything that touches Windows is in ``charles.agents.devices``.

With a mod that speaks Charles' extension (agents/README.md), play mode also carries the cinematic camera
(``cameras: alternate``), collect mode can inject noise bursts through the mod (``noise_rate_hz``), and
play mode can make DAgger data (``dagger``: the autopilot keeps running, the player's actions drive over it
as override commands, and each GameFrame carries what the autopilot wanted, ``expert``, for the player to
label the frames its model drove); purpose targets (``purpose``) and the game's clock work with any mod.

Threads: the main loop owns its bus sockets; the DeepGTAV feed thread owns the TCP connection to the mod
and holds the newest frame+data pair; with ``dagger`` an actions thread owns its subscriber to
``action.<id>`` and sends each allowed action to the mod at once (``charles.pad``: the gamepad agent's
rules).
"""

from __future__ import annotations

import argparse
import logging
import math
import random
import sys
import threading
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import prometheus_client as prom

from charles import config as config_mod
from charles.agents.common import Pacer, agent_environ, check_bus, load_agent_config, setup
from charles.agents.deepgtav import DeepGtavFeed, GameMessage, Scenario, Telemetry, dataset
from charles.agents.devices import (
    WINDOWS,
    DxcamGrabber,
    Grabber,
    PadReader,
    find_window_region,
    make_pad_reader,
)
from charles.agents.timing import GameClock, Matched, SkewStats, match
from charles.cli import help_text
from charles.config import knob
from charles.drive.controls import purpose, split
from charles.drive.frames import fit_frame
from charles.drive.noise import NoiseBursts
from charles.drive.purpose import Targets, draw_purpose_arrow
from charles.drive.samples import Capture, Encoder, SampleBuilder
from charles.drive.shape import InputShape
from charles.pad import GamepadAgent, GamepadSettings
from charles.proto import Frame, GameFrame, Sample
from charles.runtime import Service, agent_service, run_main

log = logging.getLogger("charles.capture_agent")

SERVICE = "capture_agent"
SECTION = "capture"
"""This agent's own section of the configuration file (CaptureSettings)."""
HTTP_PORT = 9110
"""/metrics and /healthz on the game PC (not in the registry: the agents run outside compose and k8s)."""
MAP_BOX = (-2500.0, 2500.0, -2000.0, 6000.0)
"""x_min, x_max, y_min, y_max of random teleports: the box the DeepGTAV mod itself draws from."""
MAX_WAIT_S = 0.1
"""Longest blocking wait of the loop: SIGTERM only sets a flag."""


@dataclass
class CaptureSettings:
    """The capture agent (game PC): what it captures, from where, and what it publishes."""

    id: str = knob(
        "capture-agent", "Agent id: topics sample.<id> / game.<id>, heartbeat.<id>; default CURVE key name"
    )
    mode: Literal["collect", "play"] = knob(
        "collect", "collect: Samples for the balancer; play: GameFrames for the player"
    )
    driver: Literal["npc", "human"] = knob(
        "npc", "Who drives (labels, Sample.source): the mod's autopilot, or a person's pad"
    )
    frames: Literal["dxcam", "deepgtav"] = knob(
        "dxcam", "Pictures from dxcam screen capture, or the mod's own frames"
    )
    fps: float = knob(
        30.0, "Tick rate (Hz); the mod is asked for frames and telemetry at this rate", min=1.0, max=240.0
    )
    width: int = knob(
        0, "Model input width; 0 = the run's model line (fetched from the broker)", min=0, max=4096
    )
    height: int = knob(0, "Model input height; 0 = the run's model line", min=0, max=4096)
    history_length: int = knob(
        60, "History rows when width and height are given (else the model line's)", min=0, max=1024
    )
    codec: Literal["jpeg", "png", "raw"] = knob("jpeg", "Frame codec on the wire")
    quality: int = knob(90, "JPEG quality", min=1, max=100)
    region: list = knob(
        [], "dxcam region [left, top, right, bottom] (screen pixels); empty = the game window"
    )
    window_title: str = knob(
        "Grand Theft Auto V", "Window whose client area is captured when region is empty"
    )
    monitor: int = knob(0, "dxcam output (monitor) index", min=0)
    dxcam_threaded: bool = knob(
        False, "Use dxcam's capture thread (start/get_latest_frame) instead of grab per tick"
    )
    deepgtav: bool = knob(
        True, "Connect to the DeepGTAV mod: telemetry, autopilot (npc) and Unstuck teleports"
    )
    deepgtav_host: str = knob("127.0.0.1", "Host of the mod's TCP server (the game PC itself)")
    deepgtav_port: int = knob(8000, "Port of the mod's TCP server", min=1, max=65535)
    deepgtav_frame: list = knob(
        [], "Frame [w, h] asked of the mod; empty: the model input (frames=deepgtav) or 16x9 (dxcam)"
    )
    deepgtav_silence_s: float = knob(
        10.0, "No data from the mod for this long: drop the connection and reconnect", min=0.5
    )
    backoff_max_s: float = knob(10.0, "Longest pause between reconnection attempts to the mod", min=0.1)
    weather: str = knob(
        "CLEAR", "DeepGTAV weather: CLEAR, EXTRASUNNY, CLOUDS, OVERCAST, RAIN, THUNDER, FOGGY, ..."
    )
    vehicle: str = knob("blista", "Vehicle model the mod spawns")
    time_of_day: list = knob([12, 0], "[hour, minute] of game time at start")
    location: list = knob([], "Start [x, y] in metres; empty: a spawn point (or the mod's random one)")
    driving_mode: int = knob(
        786603, "Autopilot driving-style flags for driver=npc in collect mode (others drive manual, -1)"
    )
    driving_speed: float = knob(15.0, "Autopilot cruise speed, m/s", min=0.0, max=100.0)
    spawn_points: list = knob(
        [], "Unstuck teleports to a random one of these [[x, y], ...]; empty: random in the map box"
    )
    seed: int = knob(0, "Seed of the teleport choices")
    steering_sign: float = knob(
        1.0, "Multiply the mod's steering by this (DeepGTAV: negative = left, like Charles)"
    )
    purpose: Literal["off", "waypoints", "random"] = knob(
        "random",
        "Purpose targets: off (purpose (0, 0)), waypoints in order (purpose_waypoints), or random points of "
        "the map box; a new one whenever the car is within purpose_reach_m",
    )
    purpose_waypoints: list = knob([], "[[x, y], ...] visited in order (purpose: waypoints), then again")
    purpose_target: list = knob([], "[x, y]: a single waypoint (purpose: waypoints); kept for old files")
    purpose_reach_m: float = knob(15.0, "A target counts as reached within this distance (m)", min=1.0)
    purpose_min_m: float = knob(150.0, "Random targets are at least this far from the car (m)", min=0.0)
    purpose_marker: bool = knob(True, "Draw the purpose arrow on the hood frame (the sim's marker)")
    cameras: Literal["hood", "alternate"] = knob(
        "hood",
        "hood: one camera; alternate: an extended mod renders hood and cinematic on alternate frames (asked "
        "at twice fps), the cinematic goes to the player's camera stream (needs frames: deepgtav)",
    )
    telemetry_wait_s: float = knob(
        0.05, "dxcam: wait up to this long for the data message after a capture, to interpolate", min=0.0
    )
    speed_fix: bool = knob(
        True,
        "npc autopilot: restart the scenario in a second whose start draws driving_speed (the public mod "
        "ignores the speed sent with start); false for a mod that reads it",
    )
    noise_rate_hz: float = knob(
        0.0,
        "Noise bursts per second in collect mode with driver=npc (needs the mod's override extension)",
        min=0.0,
    )
    noise_duration_s: list = knob([0.3, 1.5], "[lo, hi] of a burst's length in s")
    noise_steering: float = knob(0.35, "Largest steering offset of a burst", min=0.0, max=1.0)
    noise_throttle: float = knob(0.2, "Largest throttle/brake offset of a burst", min=0.0, max=1.0)
    dagger: bool = knob(
        False,
        "play mode with an extended mod: the autopilot keeps running and labels (GameFrame.expert), the "
        "player's actions (action.<id>) drive over it as override commands: DAgger data for player.dagger",
    )
    allowed_senders: list = knob(
        [], "dagger: who may drive (player key names, as gamepad.allowed_senders); ['*'] = any player"
    )
    deadman_s: float = knob(
        0.5,
        "dagger: no action for this long counts as released (the mod's override lapses in 0.1 s)",
        min=0.05,
    )
    telemetry_timeout_s: float = knob(
        0.5, "Telemetry older than this: the tick is dropped (labels would be wrong)", min=0.01
    )
    unstuck: bool = knob(True, "Run Unstuck on the position and teleport through the mod when it says so")
    unstuck_config: dict = knob(
        {}, "UnstuckConfig fields to change (charles.drive.unstuck), e.g. {window_s: 10}"
    )
    forward_pad: bool = knob(
        True, "driver=human with the mod: send the pad as DeepGTAV commands (manual mode overrides the pad)"
    )
    pad_index: int = knob(0, "XInput user index of the physical pad", min=0, max=3)
    pad_deadzone: float = knob(0.0, "Stick values below this count as 0 in human labels", min=0.0, max=0.9)
    require_secure: bool = knob(True, "Refuse to start unless bus.secure (CURVE) is on")

    def __post_init__(self) -> None:
        if len(self.region) not in (0, 4):
            raise ValueError("region must be [left, top, right, bottom]")
        if len(self.deepgtav_frame) not in (0, 2):
            raise ValueError("deepgtav_frame must be [width, height]")
        if (self.width == 0) != (self.height == 0):
            raise ValueError("give both width and height, or neither")
        if self.frames == "deepgtav" and not self.deepgtav:
            raise ValueError("frames=deepgtav needs deepgtav=true")
        if self.dagger and (self.mode != "play" or not self.deepgtav):
            raise ValueError("dagger needs mode=play and deepgtav=true (the mod's autopilot is the expert)")
        if self.dagger and not self.allowed_senders:
            raise ValueError("dagger: name the players allowed to drive in allowed_senders (e.g. [player])")
        if not all(isinstance(v, str) and v for v in self.allowed_senders):
            raise ValueError("allowed_senders must be a list of player key names")
        if self.driver == "npc" and not self.deepgtav:
            raise ValueError("driver=npc takes its labels from the mod's autopilot: it needs deepgtav=true")
        if self.cameras == "alternate" and self.frames != "deepgtav":
            raise ValueError(
                "cameras=alternate needs frames=deepgtav (dxcam cannot tell which camera it saw)"
            )
        if len(self.noise_duration_s) != 2 or not 0 < self.noise_duration_s[0] <= self.noise_duration_s[1]:
            raise ValueError("noise_duration_s must be [lo, hi] with 0 < lo <= hi")
        if self.purpose == "waypoints" and not (self.purpose_waypoints or self.purpose_target):
            raise ValueError("purpose=waypoints needs purpose_waypoints (or purpose_target)")
        if any(not isinstance(p, list | tuple) or len(p) != 2 for p in self.purpose_waypoints):
            raise ValueError("purpose_waypoints must be a list of [x, y]")
        for name in ("location", "purpose_target"):
            if len(getattr(self, name)) not in (0, 2):
                raise ValueError(f"{name} must be [x, y] or empty")
        if any(not isinstance(p, list | tuple) or len(p) != 2 for p in self.spawn_points):
            raise ValueError("spawn_points must be a list of [x, y]")
        from charles.drive.unstuck import UnstuckConfig

        try:
            UnstuckConfig(**self.unstuck_config)
        except TypeError as e:
            raise ValueError(f"unstuck_config: {e}") from None


def model_shape(svc: Service, s: CaptureSettings) -> InputShape | None:
    """The model input from the settings, or from the run configuration the broker serves (retried).

    None when stopped while waiting. History rows: what the model line reads (or ``history_length``).
    """
    if s.width and s.height:
        return InputShape(s.width, s.height, history_rows=s.history_length)
    run = svc.acquire_run_config(svc.cfg, environ=agent_environ(SECTION), role=SERVICE)
    if run is None:
        return None
    m = run.model.resolve()
    shape = InputShape.of(m, m.history_length)
    log.info(
        f"model input {shape.width}x{shape.height}, history {shape.history_rows}, frames {shape.frames} "
        "(from the broker)"
    )
    return shape


class MotionHeading:
    """Heading (rad, counter-clockwise from +x) from how the car moved: the mod sends no heading."""

    def __init__(self, min_move_m: float = 1.0, jump_m: float = 50.0):
        self.min_move = min_move_m
        self.jump = jump_m
        self.anchor: tuple[float, float] | None = None
        self.heading: float | None = None

    def update(self, pos: tuple[float, ...] | None) -> float | None:
        if pos is None:
            return self.heading
        if self.anchor is None:
            self.anchor = (pos[0], pos[1])
            return self.heading
        dx, dy = pos[0] - self.anchor[0], pos[1] - self.anchor[1]
        d = math.hypot(dx, dy)
        if d > self.jump:  # a teleport: the old heading means nothing here
            self.anchor, self.heading = (pos[0], pos[1]), None
        elif d >= self.min_move:
            self.heading = math.atan2(dy, dx)
            self.anchor = (pos[0], pos[1])
        return self.heading


class CaptureAgent:
    """The loop's logic, socket-free except for the publisher it is given (tests inject fakes)."""

    def __init__(
        self,
        svc: Service,
        s: CaptureSettings,
        model: InputShape,
        *,
        grabber: Grabber | None = None,
        feed: DeepGtavFeed | None = None,
        pad: PadReader | None = None,
    ):
        from charles.drive.unstuck import Unstuck, UnstuckConfig

        self.svc = svc
        self.s = s
        self.model = model
        self.grabber = grabber
        self.feed = feed
        self.pad = pad
        self.family = "sample" if s.mode == "collect" else "game"
        self.topic = f"{self.family}.{s.id}"
        self.pub = svc.publisher(self.family)
        self.unstuck = Unstuck(UnstuckConfig(**s.unstuck_config)) if s.unstuck and feed is not None else None
        self.rng = random.Random(s.seed)
        self.heading = MotionHeading()
        self.targets = (
            Targets(
                s.purpose_waypoints or ([s.purpose_target] if s.purpose_target else []),
                MAP_BOX,
                s.purpose_reach_m,
                s.purpose_min_m,
                s.seed,
            )
            if s.purpose != "off"
            else None
        )
        self.noise = (
            NoiseBursts(
                np.random.default_rng([s.seed, 7]),
                s.noise_rate_hz,
                (float(s.noise_duration_s[0]), float(s.noise_duration_s[1])),
                s.noise_steering,
                s.noise_throttle,
            )
            if s.noise_rate_hz > 0 and s.driver == "npc" and s.mode == "collect" and feed is not None
            else None
        )
        self.relay = (
            GamepadAgent(
                svc,
                GamepadSettings(
                    id=s.id,
                    allowed_senders=list(s.allowed_senders),
                    deadman_s=s.deadman_s,
                    pad="none",
                    require_secure=s.require_secure,
                ),
                OverridePad(feed),
                owns_status=False,
            )
            if s.dagger and feed is not None
            else None
        )
        """dagger: the player's actions to the mod as overrides (the gamepad agent's checks and counters)."""
        self._relay_thread: threading.Thread | None = None
        self._said_no_autopilot = False
        self.clock = GameClock()
        self.skews = SkewStats()
        # collect mode: the collectors' sample builder and encoder, emitting from the first tick (the
        # oldest picture stands in for past frames not seen yet, as the player drives)
        self.builder = SampleBuilder(model, wait_for_stack=False)
        self.encoder = Encoder(s.id, model, s.codec, s.quality)
        self.seq = 0
        self.frames = 0
        self.t0: float | None = None
        self.pacer = Pacer(s.fps) if s.frames == "dxcam" else None
        self._last_img: np.ndarray | None = None
        self._stale: bool | None = None
        self._missed = 0
        r = svc.metrics.registry
        self.m_frames = prom.Counter("charles_agent_frames_total", "Frames taken from the game", registry=r)
        self.m_sent = prom.Counter(
            "charles_agent_sent_total", "Samples or game frames published", ["kind"], registry=r
        )
        self.m_unstucks = prom.Counter(
            "charles_agent_unstucks_total", "Teleports asked of the mod by Unstuck", registry=r
        )
        self.m_missed = prom.Counter(
            "charles_agent_missed_ticks_total", "Ticks skipped because the loop ran late", registry=r
        )
        self.m_mod = prom.Counter(
            "charles_agent_deepgtav_events_total", "DeepGTAV connection events", ["event"], registry=r
        )
        self.m_skew = prom.Histogram(
            "charles_agent_telemetry_skew_seconds",
            "From a frame's capture to the nearest telemetry message (0 when the mod sent both together)",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.0167, 0.025, 0.033, 0.05, 0.1, 0.25),
            registry=r,
        )
        self.m_skew_q = prom.Gauge(
            "charles_agent_telemetry_skew_quantile_seconds",
            "Frame-to-telemetry skew over the last 1000 frames",
            ["quantile"],
            registry=r,
        )
        self.m_targets = prom.Counter(
            "charles_agent_purpose_targets_reached_total",
            "Purpose targets reached (a new one picked)",
            registry=r,
        )
        self.m_noise = prom.Counter(
            "charles_agent_noise_frames_total",
            "Frames driven by a noise burst (the mod overrode)",
            registry=r,
        )
        self.m_latency = prom.Histogram(
            "charles_agent_capture_latency_seconds",
            "From the frame's capture to its publication",
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.033, 0.05, 0.1, 0.25),
            registry=r,
        )
        if feed is not None:
            feed.on_event = self._on_mod_event

    # -- ticks -------------------------------------------------------------------------------------------

    def _on_mod_event(self, event: str) -> None:
        self.m_mod.labels(event).inc()
        if event == "connected":
            self._said_no_autopilot = False  # a new connection may be a different mod
        if event == "bad_frame":
            w, h = self.feed.frame_size if self.feed else (0, 0)
            self.svc.reject(
                "deepgtav_frame_size", f"the mod sent a frame that is not {w}x{h} (row-padded BGR)"
            )
        elif event == "bad_message":
            self.svc.reject("deepgtav_bad_message", "the mod sent a message we refuse; reconnecting")
        elif event == "skipped":
            self.svc.metrics.drops.labels(cause="deepgtav_overwritten").inc()

    def next_tick(self) -> tuple[float, np.ndarray, GameMessage | None, Matched | None] | None:
        """(capture time, RGB picture, the mod's pair, telemetry at the capture time) of the next tick, or
        None (nothing this time). The mod's own frames carry their telemetry (skew 0); a dxcam picture gets
        the telemetry interpolated to its capture time (charles.agents.timing)."""
        if self.s.frames == "deepgtav":
            assert self.feed is not None
            msg = self.feed.next(MAX_WAIT_S)
            if msg is None or msg.frame is None:
                return None
            return msg.received, msg.frame, msg, Matched(msg.telemetry, 0.0, msg.telemetry.game_ms)
        assert self.pacer is not None and self.grabber is not None
        _, due = self.pacer.wait()
        if self.pacer.missed != self._missed:
            self.m_missed.inc(self.pacer.missed - self._missed)
            self._missed = self.pacer.missed
        img = self.grabber.grab()
        if img is None:  # dxcam: the screen has not changed since the last grab
            img = self._last_img
            if img is None:
                return None
        self._last_img = img
        if self.feed is None:
            return due, img, None, None
        recent = self.feed.newer(due, self.s.telemetry_wait_s)
        return due, img, (recent[-1] if recent else None), match(due, recent)

    def _set_stale(self, stale: bool, why: str = "") -> None:
        if stale != self._stale:
            self._stale = stale
            if stale:
                log.warning(f"no fresh telemetry ({why}); not publishing until it returns")
                self.svc.status = "waiting"
            else:
                log.info("telemetry flowing; publishing")
                self.svc.status = "ok"

    def _next_spawn(self) -> list[float]:
        if self.s.spawn_points:
            p = self.rng.choice(self.s.spawn_points)
            return [float(p[0]), float(p[1])]
        x0, x1, y0, y1 = MAP_BOX
        return [self.rng.uniform(x0, x1), self.rng.uniform(y0, y1)]

    def _purpose(self, pos: tuple[float, ...] | None, heading: float | None) -> tuple[float, float]:
        if self.targets is None or pos is None:
            return 0.0, 0.0
        if self.targets.update(pos):
            self.m_targets.inc()
            log.info(f"purpose target #{self.targets.target_id - 1} reached; next {self.targets.target}")
        assert self.targets.target is not None
        angle, dist = purpose(pos, 0.0 if heading is None else heading, self.targets.target)
        return (0.0 if heading is None else angle), min(1e7, dist)  # the wire's bound on the distance

    def _hood(self, img: np.ndarray, purpose_: tuple[float, float], known: bool) -> np.ndarray:
        """The picture at the model's size, with the purpose marker when there is a purpose to show."""
        small = fit_frame(img, self.model.width, self.model.height)
        if self.s.purpose_marker and self.targets is not None and known:
            small = small.copy() if small is img else small
            draw_purpose_arrow(small, *purpose_)
        return small

    def _skew(self, skew_s: float) -> None:
        self.m_skew.observe(skew_s)
        self.skews.add(skew_s)
        if self.frames % 30 == 0:
            p50, p99 = self.skews.quantiles()
            self.m_skew_q.labels("0.5").set(p50)
            self.m_skew_q.labels("0.99").set(p99)

    def _drive(self, tele: Telemetry | None) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
        """(label, executed) of this tick: the autopilot's, and what the car got (a noise burst's offset
        sent to the mod as an override; the label is then what the autopilot wanted, which only a mod with
        the ``autopilot`` extension can say: without it a burst's frames have no label)."""
        if self.s.driver == "human":
            assert self.pad is not None
            ps = self.pad.read()
            controls = (max(-1.0, min(1.0, ps.steering)), ps.throttle_brake)
            if self.feed is not None and self.s.forward_pad:
                self.feed.commands(ps.throttle, ps.brake, ps.steering)
            return controls, controls
        if tele is None:
            return None, None
        wanted = tele.autopilot_controls or tele.controls
        if self.noise is None or wanted is None:
            return tele.controls, tele.controls
        executed = self.noise.step(wanted, 1.0 / self.s.fps)
        if not self.noise.noisy:
            return wanted, tele.controls or wanted
        throttle, brake = split(executed[1])
        self.feed.commands(throttle, brake, executed[0], override=True)  # type: ignore[union-attr]
        self.m_noise.inc()
        # the frame shows the car as the last override left it; its label is the autopilot's wish
        return tele.autopilot_controls, executed

    def _expert(self, tele: Telemetry | None) -> tuple[float, float] | None:
        """dagger: what the autopilot wants on this frame (the extension's ``autopilot``), whoever drives.

        Never the car's controls instead: on a frame the model drove those are the model's, and a label
        that repeats the model teaches it nothing. A mod that does not say gets the frames out unlabelled
        (the player counts what it cannot teach) and one warning per connection."""
        if self.relay is None or tele is None:
            return None
        if tele.autopilot is None and not self._said_no_autopilot:
            self._said_no_autopilot = True
            self.m_mod.labels("no_autopilot").inc()
            log.warning(
                "dagger: the mod sends no 'autopilot' (Charles' protocol extension): frames go out without "
                "an expert label, so the player makes no DAgger samples of them; a mod without the extension "
                "also ignores override commands, so its autopilot keeps the car (agents/README.md)"
            )
        return tele.autopilot_controls

    def process(
        self, t: float, img: np.ndarray, msg: GameMessage | None, matched: Matched | None = None
    ) -> bool:
        """One tick: labels, Unstuck, purpose, publish, history. True if something was published."""
        self.frames += 1
        self.m_frames.inc()
        tele: Telemetry | None = None
        if self.feed is not None:
            if msg is None or matched is None:
                self._set_stale(True, f"DeepGTAV {self.feed.state}")
                return False
            if matched.skew_s > self.s.telemetry_timeout_s:
                self._set_stale(True, f"newest data is {matched.skew_s:.1f}s from the frame")
                self.svc.metrics.drops.labels(cause="telemetry_stale").inc()
                return False
            tele = matched.telemetry
            self._skew(matched.skew_s)
        self._set_stale(False)
        game_time = self.clock.at(t, matched.game_ms if matched is not None else None)
        if not self.clock.advance(game_time) and self.frames > 1:
            self.svc.metrics.drops.labels(cause="game_paused").inc()  # the game's clock stood still
            return False

        label, controls = self._drive(tele)
        if self.s.mode == "collect" and (label is None or controls is None):
            if self.noise is not None and self.noise.noisy:
                self.svc.metrics.drops.labels(cause="noise_unlabelled").inc()
            else:
                self.svc.reject("missing_telemetry", "the mod's data lacks throttle, brake or steering")
            return False
        speed = 0.0 if tele is None or tele.speed is None else min(200.0, max(0.0, tele.speed))
        pos = tele.location if tele is not None else None
        heading = self.heading.update(pos)
        purpose_ = self._purpose(pos, heading)
        known = pos is not None and heading is not None

        driving = True
        if self.unstuck is not None:
            step = self.unstuck.update(
                game_time, position=pos[:2] if pos else None, speed=None if pos else speed
            )
            driving = step.driving
            if step.teleport:
                where = self._next_spawn()
                log.info(f"unstuck #{self.unstuck.unstucks}: the car made no progress; teleporting")
                self.m_unstucks.inc()
                self.feed.teleport(where)  # type: ignore[union-attr]
                self.heading = MotionHeading()
                if self.noise is not None:
                    self.noise.reset()

        tick = tele.tick if tele is not None else None
        expert = self._expert(tele)
        if self.s.mode == "play":
            cine = msg.cinematic if msg is not None else None
            msg_out: GameFrame | Sample | None = GameFrame(
                source=self.s.id,
                seq=self.seq,
                game_time=game_time,
                frame=self.encoder.frame(self._hood(img, purpose_, known)),
                speed=speed,
                position=pos,
                heading=heading,
                purpose=purpose_,
                controls=controls,
                recovering=not driving,
                tick=tick,
                cinematic=None if cine is None else Frame.encode(cine, "jpeg", self.s.quality),
                expert=expert,
            )
        else:
            assert label is not None and controls is not None
            # fitted now: the stack keeps model-sized pictures, not screen grabs
            small = self._hood(img, purpose_, known) if driving or self.model.frames > 1 else None
            pending = self.builder.push(
                Capture(game_time, small, label, controls, speed, purpose_, driving, self.s.driver)
            )
            msg_out = self.encoder.sample(pending) if pending is not None else None
        if msg_out is None:
            return False
        self.pub.send(self.topic, msg_out)
        self.seq += 1
        self.m_sent.labels(self.family).inc()
        self.m_latency.observe(max(0.0, time.monotonic() - t))
        return True

    def run(self) -> None:
        # 30Hz <- dxcam grab (or the mod's frames) + DeepGTAV telemetry -> sample.<id> | game.<id>
        log.info(
            f"{self.s.mode} mode as {self.s.id!r}: {self.s.driver} driving, frames from {self.s.frames}, "
            f"{self.model.width}x{self.model.height} -> {self.topic}"
        )
        self.svc.ready()
        if self.relay is not None:
            # <- action.<id> (player), as they come -> the mod's override commands
            self._relay_thread = threading.Thread(target=self.relay.run, name="actions", daemon=True)
            self._relay_thread.start()
            self.svc.vital(self._relay_thread)
        while self.svc.running:
            tick = self.next_tick()
            if tick is not None:
                self.process(*tick)
            elif self.feed is not None and self.feed.state != "connected":
                self._set_stale(True, f"DeepGTAV {self.feed.state}")
            self.svc.info.update(
                frames=self.frames,
                sent=self.seq,
                deepgtav=self.feed.state if self.feed else "off",
                unstucks=self.unstuck.unstucks if self.unstuck else 0,
                **({"overrides": self.relay.applied} if self.relay is not None else {}),
            )

    def close(self) -> None:
        if self._relay_thread is not None:
            self._relay_thread.join(timeout=2)  # it ends with the service (svc.running)
        if self.feed is not None:
            self.feed.close()
        if self.grabber is not None:
            self.grabber.close()
        if self.pad is not None:
            self.pad.close()


def make_feed(s: CaptureSettings, model: InputShape) -> DeepGtavFeed:
    if s.deepgtav_frame:
        frame = (int(s.deepgtav_frame[0]), int(s.deepgtav_frame[1]))
    elif s.frames == "deepgtav":
        frame = (model.width, model.height)
    else:
        frame = (16, 9)  # dxcam takes the pictures: ask the mod for the smallest useful one
    # dagger: the autopilot runs in play mode too (the label); the player's overrides drive over it
    autopilot = (s.driver == "npc" and s.mode == "collect") or s.dagger
    location = s.location or (s.spawn_points[0] if s.spawn_points else None)
    scenario = Scenario(
        location=[float(v) for v in location] if location else None,
        time=list(s.time_of_day) if s.time_of_day else None,
        weather=s.weather or None,
        vehicle=s.vehicle or None,
        driving_mode=s.driving_mode if autopilot else -1,
        driving_speed=s.driving_speed,
    )
    alternate = s.cameras == "alternate"
    return DeepGtavFeed(
        s.deepgtav_host,
        s.deepgtav_port,
        scenario,
        # alternate cameras: twice the frames, half of them hood pictures at fps
        dataset(s.fps * (2 if alternate else 1), frame, ("hood", "cinematic") if alternate else ("hood",)),
        speed_fix=s.speed_fix,
        steering_sign=s.steering_sign,
        silence_s=s.deepgtav_silence_s,
        backoff_max_s=s.backoff_max_s,
    )


class OverridePad:
    """The player's actions as the mod's ``override`` commands (``dagger``): a Pad for charles.pad.

    ``release`` sends nothing: the extended mod drops an override ``OVERRIDE_HOLD_MS`` after the last one,
    so when the actions stop the autopilot has the car back within 0.1 s, dead-man or not."""

    def __init__(self, feed: DeepGtavFeed):
        self.feed = feed

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        self.feed.commands(throttle, brake, steering, override=True)

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


def wait_for_window(svc: Service, title: str, every_s: float = 2.0) -> tuple[int, int, int, int] | None:
    """The game window's client area, waiting for the game to start (None if stopped meanwhile)."""
    warned = False
    while svc.running:
        try:
            region = find_window_region(title)
            log.info(f"capturing window {title!r} at {region}")
            return region
        except OSError as e:
            if not WINDOWS:
                raise
            if not warned:
                log.warning(f"{e}; waiting for it")
                warned = True
            svc.status = "waiting"
            svc.stop_event.wait(every_s)
    return None


def build(
    svc: Service, s: CaptureSettings, *, grabber: Grabber | None = None, pad: PadReader | None = None
) -> CaptureAgent | None:
    """Wire the agent: model input (settings or broker), the mod's feed, the grabber, the pad."""
    model = model_shape(svc, s)
    if model is None:
        return None
    if s.frames == "dxcam" and grabber is None:
        region = tuple(s.region) if s.region else wait_for_window(svc, s.window_title)
        if region is None:
            return None
        grabber = DxcamGrabber(region, s.monitor, s.fps, s.dxcam_threaded)  # type: ignore[arg-type]
    feed = make_feed(s, model).start() if s.deepgtav else None
    if feed is not None:
        svc.vital(feed._thread)  # the feed reconnects on anything; if it ever ends, the agent is degraded
    if s.driver == "human" and pad is None:
        pad = make_pad_reader(s.pad_index, s.pad_deadzone)
    return CaptureAgent(svc, s, model, grabber=grabber, feed=feed, pad=pad)


def main(
    argv: list[str] | None = None, *, grabber: Grabber | None = None, pad: PadReader | None = None
) -> int:
    ap = argparse.ArgumentParser(
        prog="charles capture-agent", description=help_text(__doc__.split("\n\n")[0])
    )
    config_mod.add_arguments(
        ap,
        "YAML with bus/service sections and a capture section (default: $CHARLES_CONFIG)",
        "override a setting (capture.fps=20, bus.host=...)",
    )
    ap.add_argument("--id", help="agent id (capture.id)")
    ap.add_argument("--mode", choices=["collect", "play"], help="capture.mode")
    ap.add_argument("--driver", choices=["npc", "human"], help="capture.driver")
    ap.add_argument("--frames", choices=["dxcam", "deepgtav"], help="capture.frames")
    ap.add_argument("--width", type=int, help="capture.width (model input; default from the broker)")
    ap.add_argument("--height", type=int, help="capture.height")
    ap.add_argument("--broker", help="broker host (bus.host)")
    args = ap.parse_args(argv)
    sets = list(args.set)
    for name in ("id", "mode", "driver", "frames", "width", "height"):
        if getattr(args, name) is not None:
            sets.append(f"capture.{name}={getattr(args, name)}")
    if args.broker:
        sets.append(f"bus.host={args.broker}")
    try:
        cfg, s = load_agent_config(SECTION, CaptureSettings, args.config, sets)
        check_bus(cfg, s.require_secure, s.id)
    except (ValueError, OSError) as e:
        print(f"charles-capture-agent: configuration error: {e}", file=sys.stderr)
        return 2
    setup(cfg)
    svc = agent_service(SERVICE, cfg, s.id, HTTP_PORT)
    agent = None
    try:
        svc.start_heartbeat()
        agent = build(svc, s, grabber=grabber, pad=pad)
        if agent is not None:
            agent.run()
    except KeyboardInterrupt:
        pass
    except (OSError, ImportError) as e:  # no dxcam / XInput / window: say so, not a traceback
        log.error(
            f"cannot capture: {e} (dxcam and XInput come with the Windows-only agents extra: pip install -e '.[agents]')"
        )
        return 1
    finally:
        if agent is not None:
            agent.close()
        svc.close()
    return 0


def entry() -> None:
    """The ``charles-capture-agent`` console script."""
    run_main(main)


if __name__ == "__main__":
    entry()
