"""The operating-system boundary of the agents: screen capture, the physical pad, the virtual pad.

Everything Windows-specific sits behind three small protocols so that the agents' logic runs, and is
tested, on Linux with fakes: :class:`Grabber` (dxcam), :class:`PadReader` (XInput) and :class:`~charles.pad.Pad`
(vgamepad). The real implementations import their library only when built, so importing this module never
needs Windows.
"""

from __future__ import annotations

import ctypes
import logging
import sys
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from charles.drive.controls import combine
from charles.pad import Pad

log = logging.getLogger("charles.agents.devices")

WINDOWS = sys.platform == "win32"


# ---------------------------------------------------------------------------------------------- screen


class Grabber(Protocol):
    """Takes the newest picture of the game."""

    def grab(self) -> np.ndarray | None:
        """RGB H x W x 3 uint8 of the region, or None when the screen has not changed since last time."""
        ...

    def close(self) -> None: ...


def find_window_region(title: str) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of a window's client area in screen pixels (Windows only).

    dxcam wants coordinates on one output; for a window on the primary monitor they are the same.
    """
    if not WINDOWS:
        raise OSError("finding a window needs Windows; give capture.region explicitly")
    from ctypes import wintypes

    user32 = ctypes.windll.user32  # type: ignore[attr-defined]
    user32.SetProcessDPIAware()  # real pixels, not scaled ones, like dxcam
    hwnd = user32.FindWindowW(None, title)
    if not hwnd:
        raise OSError(f"no window titled {title!r}: start the game, or set capture.region")
    rect = wintypes.RECT()
    user32.GetClientRect(hwnd, ctypes.byref(rect))
    origin = wintypes.POINT(0, 0)
    user32.ClientToScreen(hwnd, ctypes.byref(origin))
    return origin.x, origin.y, origin.x + rect.right, origin.y + rect.bottom


class DxcamGrabber:
    """Desktop Duplication capture with dxcam (``create(output_color="RGB")``, ``grab(region)``).

    ``threaded``: dxcam's own capture thread (``start(target_fps)``, ``get_latest_frame``) instead of a
    ``grab`` per tick; it smooths capture but adds a frame of latency.
    """

    def __init__(
        self,
        region: tuple[int, int, int, int],
        output_idx: int = 0,
        fps: float = 30.0,
        threaded: bool = False,
    ):
        import dxcam  # Windows only: the agents extra

        self.region = tuple(int(v) for v in region)
        self.camera = dxcam.create(output_idx=output_idx, output_color="RGB")
        self.threaded = threaded
        if threaded:
            self.camera.start(region=self.region, target_fps=int(round(fps)), video_mode=True)
        log.info(f"dxcam on output {output_idx}, region {self.region}{', threaded' if threaded else ''}")

    def grab(self) -> np.ndarray | None:
        if self.threaded:
            return self.camera.get_latest_frame()
        return self.camera.grab(region=self.region)

    def close(self) -> None:
        if self.threaded:
            self.camera.stop()
        release = getattr(self.camera, "release", None)
        if release is not None:
            release()


# ---------------------------------------------------------------------------------------------- physical pad


@dataclass(frozen=True, slots=True)
class PadState:
    """What a human's pad applies: steering [-1, 1] (left stick x), throttle and brake [0, 1] (triggers)."""

    steering: float = 0.0
    throttle: float = 0.0
    brake: float = 0.0
    connected: bool = True

    @property
    def throttle_brake(self) -> float:
        return combine(self.throttle, self.brake)


class PadReader(Protocol):
    def read(self) -> PadState: ...

    def close(self) -> None: ...


class NeutralPadReader:
    """A pad that never moves (Linux, or no pad connected): labels are all zeros, so warn loudly."""

    def __init__(self) -> None:
        log.warning("no physical pad reader on this system: human labels will be neutral (0, 0)")

    def read(self) -> PadState:
        return PadState(connected=False)

    def close(self) -> None:
        pass


class XInputPadReader:
    """An Xbox-compatible pad through XInput (``XInputGetState``), Windows only.

    The virtual pad of the gamepad agent is an XInput pad too: give the physical pad's ``index`` when both
    run on one machine.
    """

    _STICK = 32767.0
    _TRIGGER = 255.0

    def __init__(self, index: int = 0, deadzone: float = 0.0):
        from ctypes import wintypes

        class _Gamepad(ctypes.Structure):
            _fields_ = [
                ("wButtons", wintypes.WORD),
                ("bLeftTrigger", ctypes.c_ubyte),
                ("bRightTrigger", ctypes.c_ubyte),
                ("sThumbLX", ctypes.c_short),
                ("sThumbLY", ctypes.c_short),
                ("sThumbRX", ctypes.c_short),
                ("sThumbRY", ctypes.c_short),
            ]

        class _State(ctypes.Structure):
            _fields_ = [("dwPacketNumber", wintypes.DWORD), ("Gamepad", _Gamepad)]

        self._state = _State()
        self._dll = None
        for name in ("xinput1_4", "xinput1_3", "xinput9_1_0"):
            try:
                self._dll = ctypes.WinDLL(name)  # type: ignore[attr-defined]
                break
            except OSError:
                continue
        if self._dll is None:
            raise OSError("XInput is not available (xinput1_4.dll / xinput1_3.dll)")
        self.index = index
        self.deadzone = deadzone
        self._was_connected: bool | None = None

    def read(self) -> PadState:
        rc = self._dll.XInputGetState(self.index, ctypes.byref(self._state))
        connected = rc == 0
        if connected != self._was_connected:
            (log.info if connected else log.warning)(
                f"pad {self.index} {'connected' if connected else 'not connected'}"
            )
            self._was_connected = connected
        if not connected:
            return PadState(connected=False)
        g = self._state.Gamepad
        x = max(-1.0, g.sThumbLX / self._STICK)
        if abs(x) < self.deadzone:
            x = 0.0
        return PadState(x, g.bRightTrigger / self._TRIGGER, g.bLeftTrigger / self._TRIGGER)

    def close(self) -> None:
        pass


def make_pad_reader(index: int = 0, deadzone: float = 0.0) -> PadReader:
    if WINDOWS:
        return XInputPadReader(index, deadzone)
    return NeutralPadReader()


# ---------------------------------------------------------------------------------------------- virtual pad


class VgamepadPad:
    """vgamepad's ``VX360Gamepad`` (needs the ViGEmBus driver, installed with vgamepad on Windows)."""

    def __init__(self) -> None:
        import vgamepad  # Windows only: the agents extra

        self.pad = vgamepad.VX360Gamepad()
        log.info("virtual Xbox 360 pad plugged in")

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        self.pad.left_joystick_float(x_value_float=steering, y_value_float=0.0)
        self.pad.right_trigger_float(value_float=throttle)
        self.pad.left_trigger_float(value_float=brake)
        self.pad.update()

    def release(self) -> None:
        self.pad.reset()
        self.pad.update()

    def close(self) -> None:
        self.release()
        del self.pad


class NullPad:
    """No virtual pad (Linux, a dry run): remembers the last values so that they can be inspected."""

    def __init__(self, quiet: bool = False) -> None:
        self.values = (0.0, 0.0, 0.0)
        if not quiet:
            log.warning("no virtual pad on this system: actions are validated and counted, not applied")

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        self.values = (steering, throttle, brake)

    def release(self) -> None:
        self.values = (0.0, 0.0, 0.0)

    def close(self) -> None:
        self.release()


def make_pad(kind: str = "auto") -> Pad:
    """``vgamepad``, ``none``, or ``auto`` (vgamepad on Windows, none elsewhere)."""
    if kind == "vgamepad" or (kind == "auto" and WINDOWS):
        return VgamepadPad()
    return NullPad()
