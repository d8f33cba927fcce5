"""``charles clip``: the player's cinematic camera to MP4, with its predictions drawn over it.

    charles clip --seconds 30 --out drive.mp4           # the next 30 s of the player's cinematic camera
    charles clip --highlights clips/ --minutes 60       # the 10 s before each Unstuck and each model swap

It listens on the bus like the viewer (``camera.<player>`` for the pictures, ``console.<player>`` for
the predictions, the model and the Unstuck and swap counters) and writes with OpenCV's ``VideoWriter``
(``mp4v``: no codec library beyond what opencv-python-headless carries). A clip plays in real time: it has
``fps`` frames per second of the player's time, each the newest picture taken by then (a picture is
repeated where the stream paused and skipped where it ran faster), so N seconds are N x fps frames.
"""

from __future__ import annotations

import argparse
import collections
import math
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from charles import config as config_mod
from charles.cli import help_text
from charles.proto import Camera, Console
from charles.runtime import Service, run_main, setup_logging

BEFORE_S = 10.0
"""Highlights: seconds kept before each Unstuck and each model swap."""
EVENTS = {"unstucks": "unstuck", "swaps": "swap"}
"""Player console counters whose increase is a highlight, and the name its clip gets."""


class Clip:
    """One MP4 of ``seconds`` x ``fps`` frames, filled by the pictures' own times (``captured``, Unix s)."""

    def __init__(self, path: Path, seconds: float, fps: float = 30.0, start: float | None = None):
        """``start``: the Unix time of the first slot (default: the first picture's)."""
        self.path = Path(path)
        self.fps = fps
        self.total = max(1, round(seconds * fps))
        self.written = 0
        self.size: tuple[int, int] | None = None
        self._writer: cv2.VideoWriter | None = None
        self._t0 = start
        self._latest: np.ndarray | None = None

    @property
    def done(self) -> bool:
        return self.written >= self.total

    def add(self, captured: float, bgr: np.ndarray) -> None:
        """The next picture (BGR); the slots before its time show the picture before it."""
        if self._t0 is None:
            self._t0 = captured
        while self._latest is not None and not self.done and self._t0 + self.written / self.fps < captured:
            self._write(self._latest)
        self._latest = bgr

    def _write(self, bgr: np.ndarray) -> None:
        if self._writer is None:
            h, w = bgr.shape[:2]
            self.size = (w - w % 2, h - h % 2)  # mp4v wants even sides
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._writer = cv2.VideoWriter(
                str(self.path), cv2.VideoWriter_fourcc(*"mp4v"), self.fps, self.size
            )
            if not self._writer.isOpened():
                raise OSError(f"OpenCV cannot write {self.path} with mp4v")
        if (bgr.shape[1], bgr.shape[0]) != self.size:
            bgr = cv2.resize(bgr, self.size, interpolation=cv2.INTER_AREA)
        self._writer.write(bgr)
        self.written += 1

    def close(self, fill: bool = False) -> int:
        """Finish the file (``fill``: the rest of the slots with the newest picture); the frames written."""
        while fill and self._latest is not None and not self.done:
            self._write(self._latest)
        if self._writer is None and self._latest is not None:
            self._write(self._latest)  # a clip of one picture is still a clip
        if self._writer is not None:
            self._writer.release()
            self._writer = None
        return self.written


def overlay(bgr: np.ndarray, state: dict[str, Any]) -> np.ndarray:
    """The player's controls and model drawn in the lower left (as the stream page's console shows them)."""
    out = bgr.copy()
    h, w = out.shape[:2]
    s = max(0.6, w / 1280)  # readable on a 640-wide picture
    controls = state.get("controls") if isinstance(state.get("controls"), dict) else {}
    x0, y0, bw = int(12 * s), h - int(92 * s), int(160 * s)
    cv2.rectangle(out, (0, y0 - int(22 * s)), (x0 + bw + int(120 * s), h), (0, 0, 0), -1)
    model = state.get("model")
    batch = state.get("model_batch")
    title = (
        f"{model}" + (f"  batch {batch}" if isinstance(batch, int) else "") if isinstance(model, str) else ""
    )
    cv2.putText(
        out,
        title[:48],
        (x0, y0 - int(6 * s)),
        cv2.FONT_HERSHEY_SIMPLEX,
        0.5 * s,
        (255, 255, 255),
        1,
        cv2.LINE_AA,
    )
    rows = (
        ("steering", -1.0, (255, 200, 60)),
        ("throttle", 0.0, (80, 220, 80)),
        ("brake", 0.0, (60, 60, 240)),
    )
    for i, (name, lo, colour) in enumerate(rows):
        y = y0 + int((10 + 24 * i) * s)
        v = controls.get(name)
        v = float(v) if isinstance(v, int | float) and math.isfinite(v) else 0.0
        v = min(1.0, max(lo, v))
        cv2.putText(
            out,
            f"{name} {v:+.2f}",
            (x0, y + int(5 * s)),
            cv2.FONT_HERSHEY_SIMPLEX,
            0.45 * s,
            (230, 230, 230),
            1,
            cv2.LINE_AA,
        )
        bx = x0 + int(120 * s)
        cv2.rectangle(out, (bx, y - int(6 * s)), (bx + bw, y + int(6 * s)), (70, 70, 70), 1)
        mid = bx + bw // 2 if lo < 0 else bx
        end = mid + int(v * (bw // 2 if lo < 0 else bw))
        cv2.rectangle(out, (min(mid, end), y - int(5 * s)), (max(mid, end), y + int(5 * s)), colour, -1)
    return out


class Recorder:
    """Pictures and consoles of one player in; one clip, or a clip per highlight, out.

    Socket-free (``main`` feeds it), so the tests drive it with messages they make.
    """

    def __init__(
        self,
        out: Path,
        seconds: float = 10.0,
        fps: float = 30.0,
        *,
        highlights: bool = False,
        before_s: float = BEFORE_S,
        name: str = "cinematic",
        predictions: bool = True,
    ):
        self.out = Path(out)
        self.fps = fps
        self.name = name
        self.predictions = predictions
        self.highlights = highlights
        self.before_s = before_s
        self.state: dict[str, Any] = {}
        self.clip = None if highlights else Clip(self.out, seconds, fps)
        self.clips: list[tuple[Path, int]] = []
        """Highlights written: (path, frames)."""
        # the last before_s of pictures (JPEG bytes, decoded only into a highlight): bounded by time and count
        self._ring: collections.deque[tuple[float, bytes]] = collections.deque(maxlen=int(before_s * 120) + 1)
        self._counts: dict[str, int] = {}

    @property
    def done(self) -> bool:
        return self.clip is not None and self.clip.done

    def console(self, c: Console) -> list[Path]:
        """A console of the player: the predictions to draw; in highlights mode, a clip per new event."""
        state = c.state if isinstance(c.state, dict) else {}
        self.state = state
        made = []
        for key, kind in EVENTS.items():
            n = state.get(key)
            if not isinstance(n, int):
                continue
            seen = self._counts.get(key)
            self._counts[key] = n
            if self.highlights and seen is not None and n > seen and self._ring:
                made.append(self._highlight(kind, n))
        return made

    def camera(self, cam: Camera) -> None:
        f = cam.images.get(self.name)
        if f is None:
            return
        if self.highlights:
            self._ring.append((cam.captured, bytes(f.data) if f.codec == "jpeg" else _jpeg(f.decode())))
            while self._ring and self._ring[0][0] < cam.captured - self.before_s:
                self._ring.popleft()
        elif self.clip is not None and not self.clip.done:
            self.clip.add(cam.captured, self._draw(_bgr(f.decode())))

    def _draw(self, bgr: np.ndarray) -> np.ndarray:
        return overlay(bgr, self.state) if self.predictions else bgr

    def _highlight(self, kind: str, n: int) -> Path:
        t_end = self._ring[-1][0]
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(t_end))
        clip = Clip(
            self.out / f"{stamp}-{kind}-{n}.mp4", self.before_s, self.fps, start=t_end - self.before_s
        )
        for captured, jpeg in self._ring:
            clip.add(captured, self._draw(cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_COLOR)))
        frames = clip.close(fill=True)
        self.clips.append((clip.path, frames))
        return clip.path

    def close(self) -> int:
        return self.clip.close() if self.clip is not None else 0


def _bgr(rgb: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(rgb, cv2.COLOR_GRAY2BGR if rgb.shape[2] == 1 else cv2.COLOR_RGB2BGR)


def _jpeg(rgb: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", _bgr(rgb), [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles clip", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    ap.add_argument("--seconds", type=float, default=10.0, help="length of the clip (default 10)")
    ap.add_argument(
        "--out", default=None, help="the MP4 (default clip-<time>.mp4); with --highlights a folder"
    )
    ap.add_argument("--player", default="", help="player instance (default: the first one heard)")
    ap.add_argument("--camera", default="cinematic", help="picture to record: cinematic (default) or hood")
    ap.add_argument("--fps", type=float, default=30.0, help="frames per second of the clip (default 30)")
    ap.add_argument("--no-predictions", action="store_true", help="the picture only, nothing drawn over it")
    ap.add_argument(
        "--highlights", action="store_true", help=f"a clip of the {BEFORE_S:g} s before each Unstuck and swap"
    )
    ap.add_argument("--before-s", type=float, default=BEFORE_S, help="highlights: seconds before each event")
    ap.add_argument("--minutes", type=float, default=0.0, help="highlights: stop after this long (0: Ctrl-C)")
    ap.add_argument("--wait-s", type=float, default=30.0, help="give up when no picture came this long")
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config, overrides=args.set)
    setup_logging(cfg.service.log_level, cfg.service.log_format)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = Path(args.out or (f"highlights-{stamp}" if args.highlights else f"clip-{stamp}.mp4"))
    rec = Recorder(
        out,
        args.seconds,
        args.fps,
        highlights=args.highlights,
        before_s=args.before_s,
        name=args.camera,
        predictions=not args.no_predictions,
    )
    svc = Service("clip", cfg, http=False)
    suffix = f".{args.player}" if args.player else ""
    sub = svc.subscriber([f"camera{suffix}", f"console{suffix}"])
    player = args.player
    heard = time.monotonic()
    end = heard + args.minutes * 60 if args.minutes > 0 else math.inf
    try:
        # <= 30 Hz <- camera.<player>; ~5 Hz <- console.<player>
        while svc.running and not rec.done and time.monotonic() < end:
            if time.monotonic() - heard > args.wait_s:
                svc.log.warning(f"no picture for {args.wait_s:g} s; stopping")
                break
            env = sub.recv(200)
            if env is None:
                continue
            instance = env.topic.partition(".")[2]
            if env.kind == "camera":
                player = player or instance
                if instance == player:
                    heard = time.monotonic()
                    rec.camera(env.msg)
            elif env.kind == "console" and env.msg.service == "player" and instance == (player or instance):
                for path in rec.console(env.msg):
                    print(f"highlight: {path}", flush=True)
    except KeyboardInterrupt:
        pass
    finally:
        frames = rec.close()
        svc.close()
    if args.highlights:
        print(f"{len(rec.clips)} highlight(s) in {out}/", flush=True)
        return 0
    if frames == 0:
        print("no picture came: nothing written", flush=True)
        return 1
    print(f"{out}: {frames} frames ({frames / args.fps:.1f} s at {args.fps:g} fps) of {player}", flush=True)
    return 0


if __name__ == "__main__":
    run_main(main)
