"""Pictures pushed to the pages: one bounded queue per watching page, fed by the receive loop.

``/stream/<who>/<name>`` answers ``multipart/x-mixed-replace`` (MJPEG): each new picture of the
instance is one part, with its sequence number and the Unix time it was taken in the part's headers. A
browser's ``<img>``, OBS's media source and VLC show it as it is; the stream page reads it with
``fetch`` to paint each picture on a canvas and measure its latency.

Why MJPEG over HTTP and not a WebSocket: the viewer's server is the standard library's threaded HTTP
server, which can stream a response as it is but cannot speak WebSocket without a library the project does
not have; a part per picture is all a one-way picture channel needs, and it stays on the viewer's one
registry port, behind the same request bound as everything else.

The receive loop (``camera.*`` up to 30 Hz, ``console.*`` ~5 Hz) calls :meth:`Fanout.publish` once per
picture; each page's :class:`Feed` holds at most ``depth`` pictures, and a picture that would not fit
pushes out the oldest, counted as a drop: a page that cannot keep up loses pictures, never the player's
time nor the viewer's memory, and never makes another page wait.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable

from charles.viewer.board import Picture

DEPTH = 2
"""Pictures a page may fall behind before the oldest is dropped (two: one being written, one next)."""
MAX_FEEDS = 32
"""Pages streaming at once; one more is refused (503). Each holds one of the server's request threads."""


class Feed:
    """One page's stream of one picture name of one instance: a bounded queue, oldest dropped first."""

    def __init__(
        self, instance: str, name: str, depth: int = DEPTH, on_drop: Callable[[], None] | None = None
    ):
        self.instance = instance
        self.name = name
        self._queue: collections.deque[Picture] = collections.deque(maxlen=depth)
        self._ready = threading.Condition()
        self._on_drop = on_drop
        self.closed = False
        self.sent = 0
        self.dropped = 0

    def put(self, pic: Picture) -> None:
        with self._ready:
            if len(self._queue) == self._queue.maxlen:
                self.dropped += 1  # the oldest goes: it is stale, and the page is behind
                if self._on_drop is not None:
                    self._on_drop()
            self._queue.append(pic)
            self._ready.notify()

    def get(self, timeout: float) -> Picture | None:
        """The oldest picture waiting, or None after ``timeout`` s (or once closed)."""
        with self._ready:
            if not self._queue and not self.closed:
                self._ready.wait(timeout)
            return self._queue.popleft() if self._queue else None

    def close(self) -> None:
        with self._ready:
            self.closed = True
            self._ready.notify_all()


class Fanout:
    """Every open feed, by instance; the receive loop publishes, HTTP threads open, read and close."""

    def __init__(
        self, max_feeds: int = MAX_FEEDS, depth: int = DEPTH, on_drop: Callable[[], None] | None = None
    ):
        self.max_feeds = max_feeds
        self.depth = depth
        self._on_drop = on_drop
        self._feeds: dict[str, set[Feed]] = {}
        self._lock = threading.Lock()
        self.opened = 0

    def __len__(self) -> int:
        with self._lock:
            return sum(len(f) for f in self._feeds.values())

    def open(self, instance: str, name: str) -> Feed | None:
        """A new feed, or None when ``max_feeds`` pages stream already."""
        with self._lock:
            if sum(len(f) for f in self._feeds.values()) >= self.max_feeds:
                return None
            feed = Feed(instance, name, self.depth, self._on_drop)
            self._feeds.setdefault(instance, set()).add(feed)
            self.opened += 1
            return feed

    def close(self, feed: Feed) -> None:
        feed.close()
        with self._lock:
            mine = self._feeds.get(feed.instance)
            if mine is not None:
                mine.discard(feed)
                if not mine:
                    del self._feeds[feed.instance]

    def close_all(self) -> None:
        with self._lock:
            feeds = [f for fs in self._feeds.values() for f in fs]
            self._feeds.clear()
        for f in feeds:
            f.close()

    def publish(self, instance: str, pictures: dict[str, Picture]) -> None:
        """New pictures of one instance to every page streaming them (a dict lookup when nobody watches)."""
        if not pictures:
            return
        with self._lock:
            feeds = list(self._feeds.get(instance, ()))
        for feed in feeds:
            pic = pictures.get(feed.name)
            if pic is not None:
                feed.put(pic)
