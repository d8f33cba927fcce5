"""charles (folder core/): what every process shares — the run configuration (``config``, ``sections``),
the process runtime (``runtime``: Service, sockets, heartbeats, metrics), output kinds and bins
(``outputs``), the topology facts and checkers (``topology``), the local launcher (``launcher``), the
pad gate shared by the gamepad and sim agents (``pad``), ``charles eval`` (``evaluate``), flow control
between the trainer and the collectors (``flow``), datasets on disk (``dataset``: tar shards and their
manifest) and ``charles record`` (``record``), the CLI.

Imports: charles.proto, charles.drive, charles.sim, charles.model (lazily); never a service package
(broker, collector, balancer, trainer, player, viewer): services import core, not the other way round.
tests/test_architecture.py holds every package to its rule.
"""

import os

# OpenCV reads its decode pixel limit once, when cv2 loads, and some charles modules import cv2 before
# charles.proto does: the package itself sets it first. The value is the largest frame charles.proto
# accepts (registry.yaml limits.max_side squared); tests/test_proto_wire.py holds the two together.
os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(4096 * 4096))
