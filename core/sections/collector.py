"""The collector's section of the run configuration (``collector:``); every field documents itself.

What a sample *looks like* (resolution, stacked frames, history length) is not here: it follows the
``model`` section, so collectors always feed exactly the model line the run trains (the sim renders its
hood camera at the model's width and height; ``sim.hood_width``/``hood_height`` are replaced). The sim,
its NPC and Unstuck have their own sections (``sim``, ``npc``, ``unstuck``; see charles.sim.config).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from charles.config import ConfigError, knob
from charles.drive.gym import ACTION_LAYOUTS, TableActions

CODECS = ("jpeg", "png", "raw")


@dataclass
class CollectorConfig:
    """A data collector: where its driving comes from and how its samples travel."""

    source: str = knob(
        "sim",
        "sim (the built-in sim), game:<source id> (GameFrames with controls from a capture agent on "
        "game.<source id>), gym:<env id> (a Gymnasium env driven by collector.expert) or dataset:<path> (a "
        "recorded dataset replayed, charles record; its pace: realtime and pace)",
    )
    dataset_loop: bool = knob(
        True,
        "dataset source: start again from the first record at the end (false: the collector stops there)",
    )
    expert: str = knob(
        "charles.sim.gym_env:npc_expert",
        "gym source: module:callable factory, called with the env, returning act(obs, info) -> action",
    )
    gym_kwargs: dict = knob({}, "gym source: keyword arguments for gymnasium.make (e.g. {max_steps: 600})")
    gym_action: str = knob(
        "auto",
        "gym source and charles eval --env: how the env's action holds (steering, throttle_brake): pair "
        "([steering, throttle_brake]), gas_brake ([steer, gas, brake], the pedal split in two), table (a "
        "discrete action set, gym_action_table), module:callable (a factory called with the action space), "
        "or auto (pair for 2 components, gas_brake for 3 whose last two are >= 0, table for a discrete "
        "space with a table; anything else is refused)",
    )
    gym_action_table: list = knob(
        [],
        "gym_action table: [steering, throttle_brake] for each discrete action index, in order (e.g. "
        "CarRacing-v3 with continuous=false: [[0, 0], [0.6, 0], [-0.6, 0], [0, 0.2], [0, -0.8]]); a model "
        "drives with the nearest entry",
    )
    codec: Literal["jpeg", "png", "raw"] = knob(
        "jpeg", "Frame codec on the wire: jpeg (small), png or raw (lossless)"
    )
    quality: int = knob(
        90, "JPEG quality; 90 keeps lane marks crisp at ~15 KB per 160x90 frame", min=1, max=100
    )
    history_rows: int = knob(
        60,
        "History rows every sample carries (the frames before it); the model's history_length wins when "
        "longer. Sent even when the model reads none: 1.2 KB a sample, and a history line can train on it",
        min=0,
        max=1024,
    )
    realtime: bool = knob(
        False,
        "sim/gym: pace game time to the wall clock (30 samples/s); false runs as fast as the CPU allows",
    )
    pace: float = knob(
        1.0,
        "realtime: game seconds per wall-clock second (30 x pace samples/s); >1 drives faster than real "
        "time, for a demo that needs more data than one real-time car makes and has no cores to spare for "
        "flat-out collectors",
        min=0.01,
        max=100.0,
    )
    flow: bool = knob(
        True,
        "realtime sim/gym: follow the trainers' demand (flow control, charles.flow): slower than pace when "
        "the trainer cannot use the data, back up to pace when it can; pace is the ceiling. A game is "
        "paced by its own clock and does not follow",
    )
    flow_min: float = knob(0.05, "flow: the lowest share of pace a collector slows to", min=0.001, max=1.0)
    flow_settle_s: float = knob(
        10.0,
        "flow: seconds between moves of the pace, so the trainer's demand (an average over its 10 s rate "
        "window) has seen the last move whole",
        min=0.1,
    )
    restart_s: float = knob(
        0.0,
        "sim: every this many game seconds, put the car at rest on a random road (0 = never). A driving "
        "stream almost never shows a start from standstill (under 1 % of samples below 0.5 m/s), and a model "
        "that never saw one stops at a junction and stays there",
        min=0.0,
    )
    restart_turn_deg: float = knob(
        0.0,
        "sim: each restart also turns the car up to this many degrees off the lane (and up to "
        "restart_offset_m sideways), so the stream shows starts from the odd poses a learning driver stops "
        "in: nose to a kerb, across a lane (0: along the lane)",
        min=0.0,
        max=180.0,
    )
    restart_offset_m: float = knob(
        0.0,
        "sim: with restart_turn_deg, how far (m) off the lane's centre a restart may put the car",
        min=0.0,
    )
    look: Literal["seed", "config", "vary"] = knob(
        "seed",
        "sim: seed draws weather, time of day and car colour per replica from its seed (variety across "
        "replicas); config uses sim.weather, sim.time_of_day and sim.car_color as set; vary starts as "
        "config and draws a new weather and hour (day and night) at every restart and Unstuck (variety "
        "within each replica)",
    )
    repaint: bool = knob(
        False,
        "sim: a new car paint (a palette colour, jittered) at every restart and Unstuck teleport. The hood "
        "is in every frame: a model trained behind two paints drove 30x worse behind a third",
    )
    send_queue: int = knob(
        64, "Samples waiting for the sender thread; past it new samples are dropped and counted", min=1
    )
    linger_s: float = knob(1.0, "On SIGTERM: how long queued samples may take to leave", min=0.0, max=30.0)
    console_s: float = knob(1.0, "Seconds between console.<id> updates for the viewer", min=0.1)

    def __post_init__(self) -> None:
        if self.gym_action not in ACTION_LAYOUTS and ":" not in self.gym_action:
            raise ConfigError(
                f"collector.gym_action: {self.gym_action!r} is not {', '.join(ACTION_LAYOUTS)} or module:callable"
            )
        if self.gym_action_table:
            try:
                TableActions(self.gym_action_table)
            except ValueError as e:
                raise ConfigError(f"collector.gym_action_table: {e}") from None
        kind, _, arg = self.source.partition(":")
        if kind == "sim" and not arg:
            return
        if kind in ("game", "gym", "dataset") and arg:
            return
        raise ConfigError(
            f"collector.source: {self.source!r} is not sim, game:<source id>, gym:<env id> or dataset:<path>"
        )
