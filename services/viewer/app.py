"""The viewer's receive loop: consoles off the bus onto the board (the process main stays thin)."""

from __future__ import annotations

import time

from charles.proto.codec import Envelope
from charles.runtime import Service
from charles.viewer.board import Board
from charles.viewer.web import Viewer


def accept(board: Board, env: Envelope) -> None:
    """One ``console.<instance>`` message onto the board (the topic's suffix names the instance)."""
    _, _, suffix = env.topic.partition(".")
    board.update(suffix or env.sender, env.msg, env.wall)


def serve(svc: Service, board: Board, viewer: Viewer) -> None:
    """The receive loop: every console off the bus onto the board, gauges once a second."""
    sub = svc.subscriber(["console"])  # last-value family: the newest console of each instance at once
    svc.ready()
    last_refresh = 0.0
    while svc.running:
        env = sub.recv(200)  # ~5 Hz per instance <- console.*
        if env is not None and env.kind == "console":
            accept(board, env)
        now = time.monotonic()
        if now - last_refresh >= 1.0:
            last_refresh = now
            viewer.refresh()
