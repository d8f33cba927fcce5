"""What people see of the player: the Player Console and the camera stream for the viewer, and a live
view on a terminal.

The drive loop only hands over references (the hood frame, the cinematic frame it rendered, the predictor
whose Convcam tap holds the newest activations, a state dict); the painter thread draws the Convcam,
encodes the JPEGs and publishes on its own socket, newest job only, so a slow encode never holds up a
frame and never queues.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from charles.proto import Camera, Console, Frame
from charles.runtime import Publisher, Service

if TYPE_CHECKING:  # torch and timm: seconds of import that a tool sending pictures does not need
    from charles.model.predictor import Predictor

BAR = 10
"""Half-width of the terminal's bars in characters."""


class NewestOnly:
    """A thread that works on the newest job the drive loop handed over, never on a queue of them.

    The loop hands over references and goes on; a job not yet taken when the next comes is replaced
    (counted in ``overtaken`` where given), so slow work costs pictures, never frames of the drive.
    """

    def __init__(self, svc: Service, name: str, what: str, overtaken: Any = None):
        self.svc = svc
        self._what = what
        self._overtaken = overtaken
        self._lock = threading.Lock()
        self._job: tuple | None = None
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _hand(self, job: tuple) -> None:
        with self._lock:
            if self._job is not None and self._overtaken is not None:
                self._overtaken.inc()
            self._job = job
        self._wake.set()

    def work(self, *job: Any) -> Any:
        raise NotImplementedError

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.5)
            with self._lock:
                job, self._job = self._job, None
                self._wake.clear()
            if job is None or self._stop.is_set():
                continue
            try:
                self.work(*job)
            except Exception:  # a picture is never worth the drive
                self.svc.log.exception(f"could not {self._what}")

    def close(self, timeout_s: float = 1.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)


class ConsolePainter(NewestOnly):
    """``# <= console_hz -> console.<instance>``: Convcam, JPEGs and the publish, off the drive loop."""

    def __init__(
        self,
        svc: Service,
        quality: int = 80,
        max_width: int = 640,
        pub: Publisher | None = None,
        terminal: bool = False,
    ):
        self.quality = quality
        self.max_width = max_width
        """Wider pictures (a remote game's full-HD capture) are shrunk to this width before the JPEG."""
        self.pub = pub or svc.publisher("console")
        self.terminal = terminal and sys.stdout.isatty()
        self.published = 0
        self.last_state: dict[str, Any] = {}
        self._last_terminal = 0.0
        super().__init__(svc, "console", "draw the Player Console")

    def submit(self, state: dict, images: dict[str, np.ndarray], predictor: Predictor | None) -> None:
        self._hand((state, images, predictor))

    def work(self, state: dict, images: dict[str, np.ndarray], predictor: Predictor | None) -> Console:
        return self.paint(state, images, predictor)

    def paint(self, state: dict, images: dict[str, np.ndarray], predictor: Predictor | None) -> Console:
        frames = {
            name: Frame.encode(fit_width(img, self.max_width), "jpeg", self.quality)
            for name, img in images.items()
            if img is not None
        }
        if predictor is not None:
            cam = predictor.convcam()
            if cam is not None:
                frames["convcam"] = Frame.encode(cam, "jpeg", max(self.quality, 90))
        console = Console("player", state, frames)
        if self.pub.send(f"console.{self.svc.instance}", console):
            self.published += 1
        self.last_state = state
        now = time.monotonic()
        if self.terminal and now - self._last_terminal >= 0.5:
            self._last_terminal = now
            sys.stdout.write("\x1b[H\x1b[2J" + terminal_view(state, self.svc.instance) + "\n")
            sys.stdout.flush()
        return console


def fit_width(img: np.ndarray, max_width: int) -> np.ndarray:
    """Shrunk to ``max_width`` (aspect kept) when wider; as it is otherwise."""
    h, w = img.shape[:2]
    if w <= max_width:
        return img
    return cv2.resize(img, (max_width, max(1, round(h * max_width / w))), interpolation=cv2.INTER_AREA)


class CameraStream(NewestOnly):
    """``# <= camera_hz -> camera.<instance>``: the cinematic and hood pictures as JPEGs, off the drive loop.

    Newest job only; an overtaken one is ``charles_drops_total{cause="camera_busy"}``. How many people
    watch does not matter here: the viewer fans the one stream out.
    """

    def __init__(self, svc: Service, quality: int = 70, max_width: int = 640, pub: Publisher | None = None):
        self.quality = quality
        self.max_width = max_width
        self.pub = pub or svc.publisher("camera")
        self.published = 0
        super().__init__(
            svc, "camera", "send the camera pictures", svc.metrics.drops.labels(cause="camera_busy")
        )

    def submit(self, images: dict[str, np.ndarray | None], captured: float, tick: int | None = None) -> None:
        """``captured``: Unix time the pictures were taken (the stream page's latency starts there);
        ``tick``: the game tick they belong to, when the source tags its frames."""
        self._hand(({k: v for k, v in images.items() if v is not None}, captured, tick))

    def work(self, images: dict[str, np.ndarray], captured: float, tick: int | None = None) -> Camera | None:
        return self.send(images, captured, tick)

    def send(self, images: dict[str, np.ndarray], captured: float, tick: int | None = None) -> Camera | None:
        if not images:
            return None
        frames = {
            k: Frame.encode(fit_width(v, self.max_width), "jpeg", self.quality) for k, v in images.items()
        }
        camera = Camera(self.published, captured, frames, tick)
        if self.pub.send(f"camera.{self.svc.instance}", camera):
            self.published += 1
        return camera


# ---------------------------------------------------------------------------------------------- terminal


def _bar(v: float, lo: float = -1.0) -> str:
    """[-1, 1] (or [0, 1]) as a bar of '=' around a centre mark."""
    if not isinstance(v, int | float) or not math.isfinite(v):
        return " " * (2 * BAR + 1)
    v = min(max(float(v), lo), 1.0)
    n = round(abs(v) * BAR)
    if lo < 0:
        left = " " * (BAR - n) + "=" * n if v < 0 else " " * BAR
        right = "=" * n + " " * (BAR - n) if v > 0 else " " * BAR
        return f"{left}|{right}"
    return " " * BAR + "|" + "=" * n + " " * (BAR - n)  # a trigger: from the same centre as the stick


def _age(created: float | None) -> str:
    if not created:
        return "-"
    s = max(0.0, time.time() - created)
    return f"{s / 3600:.1f} h" if s >= 3600 else f"{s / 60:.1f} min" if s >= 60 else f"{s:.0f} s"


def _num(v: Any) -> float:
    if isinstance(v, list | tuple):  # a classification output: show its most likely class index
        return float(int(np.argmax(v))) if v else float("nan")
    return float(v) if isinstance(v, int | float) else float("nan")


def terminal_view(state: dict, instance: str = "player") -> str:
    """Raw predictions and controller values side by side, rates, model and counters."""
    lat = state.get("latency_ms") or {}
    lines = [
        f"Charles player {instance}   {state.get('source', '')}   {state.get('status', '')}",
        f"model {state.get('model', '-')}   batch {state.get('model_batch', '-')}   age {_age(state.get('model_created'))}"
        f"   lag {state.get('policy_lag', 0)} batches",
        f"hood camera {state.get('fps', 0):5.1f} fps   predictions {state.get('pps', 0):5.1f} pps   latency "
        f"p50 {lat.get('p50', float('nan')):.1f} ms  p99 {lat.get('p99', float('nan')):.1f} ms",
        f"swaps {state.get('swaps', 0)}   unstucks {state.get('unstucks', 0)}   dagger samples {state.get('dagger_samples', 0)}",
        "",
        f"{'raw prediction':<46}controller",
    ]
    raw = list((state.get("raw") or {}).items())
    pad = [("steering", -1.0), ("throttle", 0.0), ("brake", 0.0)]
    controls = state.get("controls") or {}
    for i in range(max(len(raw), len(pad))):
        left = ""
        if i < len(raw):
            name, v = raw[i]
            left = f"{name[:14]:<15}{_num(v):+.3f} {_bar(_num(v))}"
        right = ""
        if i < len(pad):
            name, lo = pad[i]
            v = controls.get(name, float("nan"))
            right = f"{name:<9}{_num(v):+.3f} {_bar(_num(v), lo)}"
        lines.append(f"{left:<46}{right}")
    return "\n".join(lines)
