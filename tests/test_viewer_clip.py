"""charles clip: clips and highlights written with OpenCV's VideoWriter and read back (frames, size), and the
real command recording pictures off a broker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import cv2
import numpy as np

from charles.proto import Camera, Console, Frame
from charles.viewer.clip import Clip, Recorder, overlay


def _read(path) -> tuple[int, tuple[int, int], list[np.ndarray]]:
    """Frames counted by decoding every one (the container's count can be a guess), their size, the frames."""
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, img = cap.read()
        if not ok:
            break
        frames.append(img)
    cap.release()
    size = (frames[0].shape[1], frames[0].shape[0]) if frames else (0, 0)
    return len(frames), size, frames


def _picture(k: int, w: int = 320, h: int = 180) -> Frame:
    """A picture whose brightness says which one it is (k * 8), so a clip's frames can be told apart."""
    img = np.full((h, w, 3), (k * 8) % 256, np.uint8)
    return Frame.encode(img, "jpeg", 95)


def _player(controls: dict | None = None, **counters) -> Console:
    state = {
        "model": "tiny_v1",
        "model_batch": 300,
        "controls": controls or {"steering": 0.5, "throttle": 1.0},
    }
    return Console("player", {**state, **counters})


def test_a_clip_has_seconds_times_fps_frames_each_the_newest_picture_by_then(tmp_path):
    t0 = 1000.0
    clip = Clip(tmp_path / "c.mp4", seconds=1.0, fps=10, start=t0)  # 10 slots, at t0 + 0.1 k
    # pictures at 20 Hz for half a second, a pause, then two more: the second comes after the last slot
    for k in range(10):
        clip.add(t0 + 0.01 + 0.05 * k, np.full((90, 161, 3), k * 20, np.uint8))
    clip.add(t0 + 0.91, np.full((90, 161, 3), 250, np.uint8))
    assert clip.done and clip.close() == 10
    n, size, frames = _read(tmp_path / "c.mp4")
    assert n == 10 and size == (160, 90)  # mp4v wants even sides
    # slot k shows the newest picture taken by then (the first slot the first picture); paused: the last
    expected = [0, 20, 60, 100, 140, 180, 180, 180, 180, 180]
    assert np.allclose([float(f.mean()) for f in frames], expected, atol=8), [float(f.mean()) for f in frames]


def test_overlay_draws_the_controls_and_survives_odd_state():
    img = np.zeros((360, 640, 3), np.uint8)
    drawn = overlay(img, _player().state)
    assert drawn.shape == img.shape and (drawn != 0).mean() > 0.005 and not img.any()  # text and two bars
    for odd in ({}, {"controls": "none", "model": 7}, {"controls": {"steering": float("nan"), "brake": "x"}}):
        assert overlay(img, odd).shape == img.shape


def test_highlights_keep_the_seconds_before_each_unstuck_and_each_swap(tmp_path):
    rec = Recorder(tmp_path / "hl", fps=10, highlights=True, before_s=1.0)
    t0 = time.time() - 10
    made = rec.console(_player(unstucks=0, swaps=0))
    for k in range(40):  # 4 s at 10 Hz
        rec.camera(Camera(k, t0 + k / 10, {"cinematic": _picture(k), "hood": _picture(0, 64, 36)}))
        if k == 19:
            made += rec.console(_player(unstucks=1, swaps=0))
        if k == 34:
            made += rec.console(_player(unstucks=1, swaps=1))
    made += rec.console(_player(unstucks=1, swaps=1))  # nothing new: no clip
    assert [p.name.split("-", 2)[2] for p in made] == ["unstuck-1.mp4", "swap-1.mp4"]
    for path in made:
        n, size, frames = _read(path)
        assert n == 10 and size == (320, 180)
    # the unstuck's clip ends at the picture it came after (k = 19): the last second before it
    _, _, frames = _read(made[0])
    assert (
        abs(float(frames[-1][:100].mean()) - 19 * 8) < 12 and abs(float(frames[0][:100].mean()) - 10 * 8) < 12
    )
    assert rec.close() == 0 and len(rec.clips) == 2


def test_charles_clip_records_the_players_pictures_off_the_bus(client_factory, broker, tmp_path):
    _, data = broker
    out = tmp_path / "drive.mp4"
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__BUS__HOST": "127.0.0.1",
    }
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "charles.viewer.clip",
            "--seconds",
            "1.5",
            "--out",
            str(out),
            "--wait-s",
            "20",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    pub = client_factory("player").publisher()
    stop = threading.Event()

    def publish() -> None:  # 30 Hz, as a player does, until the command is done
        k = 0
        while not stop.is_set() and proc.poll() is None:
            if k % 6 == 0:
                pub.send("console.player-7", _player())
            pub.send("camera.player-7", Camera(k, time.time(), {"cinematic": _picture(k, 640, 360)}))
            k += 1
            time.sleep(1 / 30)

    t = threading.Thread(target=publish)
    t.start()
    try:
        output, _ = proc.communicate(timeout=60)
    finally:
        stop.set()
        t.join(5)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output
    assert "45 frames" in output and "player-7" in output
    n, size, frames = _read(out)
    assert n == 45 and size == (640, 360)
    # the predictions are drawn in the lower left; the rest is the picture
    assert frames[10][300:, :200].std() > 10 and frames[10][:150, 300:].std() < 6
