"""The viewer's receive loop: consoles and camera pictures off the bus onto the board and out to the
pages that stream them (the process main stays thin)."""

from __future__ import annotations

import time

from charles.proto.codec import Envelope
from charles.runtime import Service
from charles.viewer.board import Board
from charles.viewer.web import Viewer


def accept(board: Board, env: Envelope, viewer: Viewer | None = None) -> None:
    """One ``console.<instance>`` or ``camera.<instance>`` message onto the board (the topic's suffix
    names the instance), and its pictures to the pages streaming them."""
    _, _, suffix = env.topic.partition(".")
    instance = suffix or env.sender
    if env.kind == "camera":
        kept = board.camera(instance, env.msg)
        if viewer is not None:
            viewer.pictures(instance, kept, camera=True)
        return
    entry = board.update(instance, env.msg, env.wall)
    if viewer is not None and entry.wall == env.wall:  # a newer console was not kept over this one
        viewer.pictures(instance, entry.images, camera=False)


def serve(svc: Service, board: Board, viewer: Viewer) -> None:
    """The receive loop: every console and camera message off the bus, gauges once a second."""
    # console: last-value family (the newest console of each instance at once); camera: up to 30 Hz
    sub = svc.subscriber(["console", "camera"])
    svc.ready()
    last_refresh = 0.0
    while svc.running:
        env = sub.recv(200)  # ~5 Hz per instance <- console.*; <= 30 Hz per player <- camera.*
        if env is not None and env.kind in ("console", "camera"):
            accept(board, env, viewer)
        now = time.monotonic()
        if now - last_refresh >= 1.0:
            last_refresh = now
            viewer.refresh()
