"""The player's configuration section (``player:`` in the run configuration).

Every field carries its one-line help (``charles config show`` prints it). What the player shares with the
rest of the run is not here: the model is the run's ``model`` section (the trainer builds the same, so the
two cannot disagree about which network the weights belong to); the sim, its NPC and Unstuck are the
``sim``, ``npc`` and ``unstuck`` sections; the frame codec the model trained through is ``collector.codec``
and ``collector.quality``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from charles.config import knob

SWAP_POLICIES = ("unstuck", "immediate", "every_s")


@dataclass
class PlayerConfig:
    """The player: which game it drives, when new weights swap in, what it shows."""

    source: Literal["sim", "remote"] = knob(
        "sim",
        "sim: drive the built-in sim; remote: GameFrames from a capture agent in, Actions to a gamepad agent out",
    )
    source_id: str = knob("", "remote: capture agent to drive (game.<id>); empty: the first one heard")
    target: str = knob("", "remote: gamepad agent the actions are for (action.<id>); empty: the source's id")
    seed: int = knob(
        0, "sim: town and traffic seed (the launcher passes --seed); the run's sim section sets the rest"
    )
    realtime: bool = knob(
        True, "sim: pace the drive at 30 Hz of wall clock (off: as fast as it can, benchmarks)"
    )

    follow: str = knob(
        "newest",
        "Which weights to drive: newest (the line's version whose stream started last), a version (v3, 3 or "
        "<line>_v3), <version>@<batch> (that checkpoint only, e.g. streamed by `charles stream v3@1200`), or "
        "a local checkpoint folder or safetensors weights file (loaded at start; nothing from the bus)",
    )
    swap: Literal["unstuck", "immediate", "every_s"] = knob(
        "unstuck", "When new weights take over: at the next Unstuck (the seed's way), immediately, or every_s"
    )
    swap_every_s: float = knob(30.0, "every_s: at most one swap per this many seconds", min=0.0)
    swap_max_wait_s: float = knob(
        0.0,
        "unstuck: also swap once new weights have waited this long (s) for an Unstuck; 0: wait for one",
        min=0.0,
    )
    weights_from: list = knob(
        ["trainer"],
        "On CURVE (bus.secure): the key names whose weights are accepted (the broker vouches that a sender "
        "named trainer-<host> holds the trainer key); others are refused (weights_sender_not_allowed)",
    )
    accept_older: bool = knob(
        False,
        "Load weights of an older batch of the run it drives (a replayed or rolled-back publication); off: "
        "refused (older_batch)",
    )
    before_weights: Literal["brake", "npc"] = knob(
        "brake", "Until the first weights arrive: stand on the brake, or (sim) let the NPC drive"
    )

    deadzone_steering: float = knob(
        0.0, "Game's stick dead zone: |x| below it is ignored, so x maps to dz + (1-dz)|x|", min=0.0, max=0.95
    )
    deadzone_throttle: float = knob(
        0.0, "Game's right-trigger (throttle) dead zone, as for steering", min=0.0, max=0.95
    )
    deadzone_brake: float = knob(
        0.0, "Game's left-trigger (brake) dead zone, as for steering", min=0.0, max=0.95
    )

    device: str = knob("auto", "Inference device: auto (cuda when available), cpu, cuda, cuda:1")
    compile: bool = knob(False, "torch.compile the model (minutes of start-up for IRv2; pays on a GPU)")
    threads: int = knob(0, "torch CPU threads; 0: torch's default", min=0)
    convcam: bool = knob(True, "Capture the Convcam during each prediction (no extra forward pass)")
    convcam_layer: str = knob("", "Backbone layer the Convcam shows; empty: the last feature map")

    console_hz: float = knob(
        5.0, "Player Console updates per second for the viewer (0: none)", min=0.0, max=10.0
    )
    console_width: int = knob(
        640, "sim: width of the cinematic image in the console (16:9, JPEG)", min=64, max=1920
    )
    jpeg_quality: int = knob(80, "JPEG quality of the console images", min=10, max=100)
    camera_hz: float = knob(
        30.0,
        "Camera pictures (cinematic, hood) per second on camera.<id> for the stream page; 0: none (the "
        "console carries them instead, at console_hz)",
        min=0.0,
        max=60.0,
    )
    camera_width: int = knob(
        640, "Width of the camera pictures (wider ones are shrunk; the sim renders the cinematic this wide)",
        min=64, max=1920,
    )  # fmt: skip
    camera_quality: int = knob(
        70, "JPEG quality of the camera pictures (with camera_width: the stream's bandwidth)", min=10, max=100
    )
    terminal: bool = knob(True, "Draw a live view on stdout when stdout is a terminal")

    dagger: bool = knob(
        False,
        "Label the frames the model drives with the expert's action and publish them as samples (source "
        "dagger): the sim's NPC, or (remote) the game's autopilot, from a capture agent with capture.dagger "
        "and a mod with Charles' extension (frames without it are counted dagger_unlabelled, never sent)",
    )
    repaint: bool = knob(
        False,
        "sim: a new car paint at every Unstuck teleport (as collector.repaint), so DAgger frames do not all "
        "show the one hood colour of the player's town",
    )
    dagger_skip_standstill: bool = knob(
        True,
        "DAgger: no sample where the car stands and the expert says stand still (it has no reverse, so "
        "that label shows no way out; it would teach the model to wait for Unstuck)",
    )

    def __post_init__(self) -> None:
        from charles.proto.versions import Follow

        Follow.parse(self.follow, None)  # its form; that a version is the model line's, the player checks
        if self.source == "remote" and self.before_weights == "npc":
            raise ValueError("player.before_weights npc needs the sim; a remote game can only brake")
        if self.swap == "every_s" and self.swap_every_s <= 0:
            raise ValueError("player.swap_every_s must be positive with swap: every_s")

    @property
    def deadzones(self) -> dict[str, float]:
        """Dead zone per gamepad axis."""
        return {
            "steering": self.deadzone_steering,
            "throttle": self.deadzone_throttle,
            "brake": self.deadzone_brake,
        }
