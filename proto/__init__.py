"""The wire contract: topics, message kinds, framing and validation (see proto/README.md).

Imports: nothing of charles but itself: every other package may import it.
"""

from charles.proto.codec import REASONS, SCHEMA_VERSION, Envelope, ProtocolError, decode, encode
from charles.proto.frames import Frame, FrameError
from charles.proto.messages import (
    HISTORY_FIELDS,
    Action,
    Camera,
    ConfigReply,
    ConfigRequest,
    Console,
    GameFrame,
    Heartbeat,
    Sample,
    SampleSet,
    Score,
    ScoreFigures,
    Weights,
)
from charles.proto.registry import registry

__all__ = [
    "HISTORY_FIELDS",
    "REASONS",
    "SCHEMA_VERSION",
    "Action",
    "Camera",
    "ConfigReply",
    "ConfigRequest",
    "Console",
    "Envelope",
    "Frame",
    "FrameError",
    "GameFrame",
    "Heartbeat",
    "ProtocolError",
    "Sample",
    "SampleSet",
    "Score",
    "ScoreFigures",
    "Weights",
    "decode",
    "encode",
    "registry",
]
