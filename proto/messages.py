"""The message kinds of the whole system, as plain structs (msgspec ``Struct``: built in C, which the
receive path does once per message; nothing here is validated or encoded directly, see codec.py).

``charles.proto.codec`` turns each into a ZeroMQ multipart message ``[topic, header, *blobs]`` and back,
validating on the way in. Units: metres, seconds, metres per second, radians. Controls are in [-1, 1]
(steering: negative is left; throttle_brake: positive is throttle, negative is brake).
"""

from __future__ import annotations

from msgspec import Struct, field

from charles.proto import wire
from charles.proto.frames import Frame

HISTORY_FIELDS = ("steering", "throttle_brake", "speed", "purpose_angle", "purpose_distance")
"""Columns of a sample's history array, oldest row first."""


class Sample(wire.SampleBody, gc=False):
    """One frame of driving and what the driver did on it (collector -> balancer -> trainer).

    - ``collector``: sender id of the collector replica; ``seq``: its sequence number, from 0 (gaps mean
      drops); ``game_time``: seconds of game time since the collector started (30 Hz steps).
    - ``frame``: the hood camera, RGB. Labels: ``steering`` in [-1, 1] (negative left) and
      ``throttle_brake``, combined throttle (positive) and brake (negative) in [-1, 1].
    - ``speed`` in m/s, >= 0; ``purpose``: direction to the target relative to the heading (radians,
      [-pi, pi], positive left) and its distance (m).
    - ``history``: float32 [T, 5] of HISTORY_FIELDS for the T frames *before* this one, oldest first;
      never this label (None: the line keeps no history).
    - ``stack``: past hood frames, oldest first, when the model line stacks frames.
    - ``previous``: (steering, throttle_brake) of the frame before; discrete-delta outputs bin the change
      from it. ``source``: who drove: npc, human, dagger (player frames labelled by the expert).

    It is the wire's ``SampleBody`` with Frames for its frame references, so a receiver decodes a sample in
    one call of msgspec's typed decoder, every range checked; ``charles.proto.codec`` then swaps each
    frame's blob index for its bytes and the history's reference for the array (``history`` is annotated
    as the wire's reference and holds the array in memory).
    """

    frame: Frame
    stack: wire.Stack[Frame] | None = field(default_factory=list)


class SampleSet(Struct):
    """A balanced set (balancer -> trainer): the samples, and which outputs they balance."""

    outputs: list[str]
    """Names of the outputs this set balances (one for v2/v3/v4 sets, all of them for v1)."""
    version: int
    """Balancing version that made it (1..4)."""
    samples: list[Sample]
    labels_kept: list[str] = field(default_factory=list)
    """Outputs whose labels travel with the samples (v2 keeps only the balanced one)."""
    seq: int | None = None
    """The sender's count of sets on this topic, from 0; a gap means sets were lost on the way (None: not
    numbered)."""


class Weights(Struct):
    """Model weights for players (trainer -> broker last value -> player)."""

    model: str
    """Model line, e.g. model_0004_inceptionresnetv2."""
    run: str
    """Version of the line, e.g. model_0004_inceptionresnetv2_v3."""
    batch: int
    """Batch counter of the run when these weights were taken."""
    config: dict
    """The model's configuration; a player refuses weights whose config differs from what it runs."""
    payload: bytes | memoryview
    """safetensors bytes (never pickle)."""
    created: float = 0.0
    """Unix time the weights were taken."""
    sha256: str = ""
    """Hex digest of payload; checked on receipt."""
    since: float = 0.0
    """Unix time this stream of the version started: the start of the training period that publishes it, or
    when ``charles stream`` put a saved checkpoint on the bus (0: not said, an older sender). Players that
    follow ``newest`` drive the version whose stream started last (charles.proto.versions)."""


class ConfigRequest(Struct):
    """Ask the broker for the run configuration (collector/player at start)."""

    role: str


class ConfigReply(Struct):
    config: dict
    """The resolved run configuration (see charles.config)."""
    error: str = ""


class GameFrame(Struct):
    """A frame and telemetry from a running game or sim, for the player (capture agent -> player)."""

    source: str
    seq: int
    game_time: float
    frame: Frame
    speed: float
    position: tuple[float, float, float] | None = None
    heading: float | None = None
    """Radians, counter-clockwise from +x."""
    purpose: tuple[float, float] | None = None
    controls: tuple[float, float] | None = None
    """(steering, throttle_brake) the game's driver applied on this frame (its NPC, or a human's pad):
    present when a collector turns game frames into samples."""
    recovering: bool | None = None
    """True while the sender's own Unstuck recovers the car (fading, teleporting, settling): not driving, so
    no training sample. None: the sender does not say (the receiver may watch the telemetry itself)."""
    tick: int | None = None
    """The game's frame counter of ``frame`` when the game says it (a mod's tick): ``cinematic`` and every
    picture made of this frame downstream carry the same number."""
    cinematic: Frame | None = None
    """The third-person camera of the same moment, for people watching (the player's camera stream); never
    a model input."""
    expert: tuple[float, float] | None = None
    """(steering, throttle_brake) the game's own autopilot wants on this frame while someone else drives it
    (a mod with Charles' extension says so): the label of a DAgger sample made of this frame. None: the game
    cannot say (then nobody may label the frame with what was driven instead)."""


class Action(Struct):
    """Gamepad values (player -> gamepad agent). Values are already dead-zone compensated."""

    seq: int
    steering: float
    """Left stick x in [-1, 1]."""
    throttle: float
    """Right trigger in [0, 1]."""
    brake: float
    """Left trigger in [0, 1]."""
    target: str = ""
    """Which gamepad agent should apply it (empty: any)."""
    frame_seq: int | None = None
    """The ``seq`` of the GameFrame this action answers (None: not said). Lets a game with several frames in
    flight, and anyone measuring latency, pair each action with its frame."""


class Console(Struct):
    """A console or telemetry snapshot for the viewer and the consoles (any service -> viewer)."""

    service: str
    state: dict
    """Free-form JSON-able state; the viewer shows known keys."""
    images: dict[str, Frame] = field(default_factory=dict)
    """Named images (hood, cinematic, convcam, loss) as frames."""


class Camera(Struct):
    """Camera pictures at the player's frame rate, for the stream page's tiles (player -> viewer).

    Apart from the console (which carries state and the Convcam a few times a second) so that pictures
    can move at 30 Hz on a family of their own, rate-capped and never a last value: a camera frame is
    stale 33 ms later, and a viewer that falls behind drops pictures, never consoles.
    """

    seq: int
    """The sender's count of camera messages, from 0 (a gap: pictures dropped on the way)."""
    captured: float
    """Unix time the pictures were taken (the stream page measures its latency from it)."""
    images: dict[str, Frame] = field(default_factory=dict)
    """Named pictures of that moment (cinematic, hood), JPEG as a rule."""
    tick: int | None = None
    """The game tick both pictures belong to, when the game source tags its frames (GameFrame.tick)."""


class Score(wire.ScoreBody, gc=False, kw_only=True):
    """A version's driving score on held-out sim towns (judge -> viewer, trainer console, benches).

    - ``model`` the line, ``run`` the version (``line_vN``), ``version`` the weights topic's version
      suffix where the trainer publishes one (``weights.<line>.<version>``), else empty; ``batch`` and
      ``created``: which weights were judged.
    - ``seeds``: the towns, ``minutes``: game minutes driven in each with Unstuck active; ``figures``
      pooled over them (charles.evaluate.pool), ``reference`` the NPC's on the same towns (None when the
      judge does not drive it), ``wall_s`` what the judging took.
    - ``curve``: the version's points so far, oldest first, ``(batch, judged unix time,
      km_between_unstucks, on_road_fraction)``: the broker keeps the newest score per run, so a late
      joiner has the whole curve at once.

    It is the wire's ``ScoreBody`` itself (no blobs): the decoder makes it in one call.
    """


ScoreFigures = wire.ScoreFigures


class Heartbeat(Struct):
    service: str
    """Service name (broker, collector, ...)."""
    instance: str
    """Sender id, unique per process."""
    state: str = "ok"
    """ok, starting, waiting, degraded, stopping."""
    uptime: float = 0.0
    info: dict = field(default_factory=dict)
