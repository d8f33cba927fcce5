"""The capture agent and its DeepGTAV client, against a real TCP server speaking the mod's protocol.

``DeepGtavServer`` below stands in for the GTA V mod: it accepts one client on loopback, reads
length-prefixed JSON messages (recording every one), and once started sends frame+data pairs at the
requested rate: 24-bit BGR bitmaps with rows padded to 4 bytes (the padding filled with 0xAB so that a
client that forgets to strip it sees garbage), then the dataset JSON. Frame ``i`` is painted with
R = i % 256 and carries steering/throttle/brake labels that are a function of ``i``, so a test can check
that a sample's labels belong to its own picture. Only dxcam and XInput are faked.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from charles import config
from charles.agents import capture
from charles.agents.common import Pacer, check_bus, load_agent_config
from charles.agents.deepgtav import (
    DeepGtavClient,
    DeepGtavFeed,
    Scenario,
    bitmap_to_rgb,
    dataset,
    frame_nbytes,
    rgb_to_bitmap,
    row_stride,
    start_message,
)
from charles.agents.devices import PadState
from charles.drive.shape import InputShape
from charles.proto import GameFrame, Sample
from charles.runtime import Service

from mod_support import PAD_BYTE, DeepGtavServer, frame_rgb, labels, mod_servers
from tests_support import counter_value, stop_by_sigterm, wait_for


@pytest.fixture
def mod():
    with mod_servers(DeepGtavServer) as make:
        yield make


# ---------------------------------------------------------------------------------------------- protocol


@pytest.mark.parametrize("w,h", [(1, 1), (161, 37), (3, 5), (4, 2)])
def test_bitmap_rows_are_padded_to_four_bytes_and_come_back_rgb(w, h):
    img = np.random.default_rng(w * h).integers(0, 256, (h, w, 3), dtype=np.uint8)
    bmp = rgb_to_bitmap(img, PAD_BYTE)
    assert row_stride(w) % 4 == 0 and row_stride(w) - w * 3 in (0, 1, 2, 3)
    assert len(bmp) == frame_nbytes(w, h) == row_stride(w) * h
    np.testing.assert_array_equal(bitmap_to_rgb(bmp, w, h), img)
    # byte order on the wire is B, G, R
    assert tuple(bmp[:3]) == tuple(int(v) for v in img[0, 0, ::-1])


def test_client_round_trip_with_the_mod(mod):
    srv = mod()
    client = DeepGtavClient("127.0.0.1", srv.port, timeout_s=2.0)
    client.connect()
    try:
        scenario = Scenario(location=[10.0, 20.0], weather="RAIN", driving_mode=786603, driving_speed=12.0)
        client.send(start_message(scenario, dataset(30, (161, 37))))
        msgs = [client.recv((161, 37)) for _ in range(3)]
        for m in msgs:
            i = int(m.frame[0, 0, 0])  # R carries the frame number
            np.testing.assert_array_equal(m.frame, frame_rgb(i, 161, 37))
            lab = labels(i)
            assert m.telemetry.steering == pytest.approx(lab["steering"])
            assert m.telemetry.controls == pytest.approx((lab["steering"], lab["throttle"] - lab["brake"]))
            assert m.telemetry.speed == 15.0 and m.telemetry.yaw_rate == 1.5 and m.telemetry.hour == 12
            assert m.telemetry.location is not None and m.telemetry.location[1:] == (
                20.0,
                30.0,
            )  # the start location
        client.send({"commands": {"throttle": 0.3, "brake": 0.0, "steering": -0.2}})
        client.send({"stop": {}})
        wait_for(lambda: len(srv.received) >= 3, 2, "the mod did not get our messages")
        start = srv.received[0]["start"]
        assert start["scenario"] == {
            "location": [10.0, 20.0],
            "time": [12, 0],
            "weather": "RAIN",
            "vehicle": "blista",
            "drivingMode": [786603, 12.0],
        }
        assert start["dataset"]["frame"] == [161, 37] and start["dataset"]["rate"] == 30
        assert all(
            start["dataset"][k] is True for k in ("throttle", "brake", "steering", "speed", "location")
        )
        assert srv.received[1] == {"commands": {"throttle": 0.3, "brake": 0.0, "steering": -0.2}}
        assert srv.received[2] == {"stop": {}}
    finally:
        client.close()


def test_feed_reconnects_with_backoff_after_the_mod_restarts(mod):
    srv = mod()
    port = srv.port
    feed = DeepGtavFeed(
        "127.0.0.1",
        port,
        Scenario(location=[1.0, 2.0]),
        dataset(60, (21, 9)),
        backoff_min_s=0.05,
        backoff_max_s=0.2,
        silence_s=2.0,
    )
    events: list[str] = []
    feed.on_event = events.append
    feed.start()
    try:
        first = feed.next(3.0)
        assert first is not None and first.frame.shape == (9, 21, 3)
        feed.teleport([50.0, 60.0])  # remembered: a reconnect starts the scenario where we last put it
        wait_for(lambda: srv.messages("config"), 2, "teleport not received")
        srv.close()
        wait_for(lambda: feed.state == "disconnected", 3, "the feed did not notice the mod going away")
        time.sleep(0.3)  # a few refused attempts while the game is down
        srv2 = mod(port=port)
        wait_for(lambda: srv2.started.is_set(), 5, "the feed did not reconnect")
        msg = feed.next(3.0)
        assert msg is not None and msg.index > first.index and msg.frame is not None
        assert srv2.messages("start")[0]["scenario"]["location"] == [50.0, 60.0]
        assert feed.connections == 2 and events.count("connected") == 2 and "disconnected" in events
    finally:
        feed.close()


def test_a_frame_of_the_wrong_size_is_counted_not_guessed(mod):
    srv = mod()
    client = DeepGtavClient("127.0.0.1", srv.port, timeout_s=2.0)
    client.connect()
    try:
        client.send(start_message(Scenario(), dataset(30, (40, 10))))
        m = client.recv((41, 10))  # we expect another size than the mod sends
        assert m.frame is None and m.raw["_frame_bytes"] == frame_nbytes(40, 10)
        assert m.telemetry.speed == 15.0  # the data is still good
    finally:
        client.close()


def test_pacer_keeps_deadlines_from_the_start_and_skips_missed_ticks():
    now = [100.0]
    slept: list[float] = []

    def sleep(d: float) -> None:
        slept.append(d)
        now[0] += d

    p = Pacer(10.0, clock=lambda: now[0], sleep=sleep)
    assert p.wait() == (0, 100.0)
    now[0] += 0.03  # work took 30 ms: sleep the remaining 70
    k, due = p.wait()
    assert k == 1 and due == pytest.approx(100.1) and slept[-1] == pytest.approx(0.07)
    now[0] += 0.35  # a long stall (now 100.45): ticks 2 and 3 are gone, 4 is taken at once, no burst
    k, due = p.wait()
    assert k == 4 and due == pytest.approx(100.4) and p.missed == 2
    assert p.wait() == (5, pytest.approx(100.5))


def test_agent_settings_come_from_one_file_env_and_overrides(tmp_path):
    f = tmp_path / "capture.yaml"
    f.write_text(
        "bus: {host: game-server, secure: true, keys_dir: nowhere}\ncapture: {id: cap-7, fps: 20, mode: play}\n"
    )
    cfg, s = load_agent_config(
        "capture",
        capture.CaptureSettings,
        str(f),
        ["capture.fps=25", "bus.connect_timeout_s=3"],
        environ={"CHARLES__CAPTURE__DRIVER": "human", "CHARLES__SERVICE__LOG_LEVEL": "DEBUG"},
    )
    assert (s.id, s.fps, s.mode, s.driver) == ("cap-7", 25.0, "play", "human")
    assert (cfg.bus.host, cfg.bus.connect_timeout_s, cfg.service.log_level) == ("game-server", 3.0, "DEBUG")
    with pytest.raises(config.ConfigError, match="nowhere"):
        check_bus(cfg, True, s.id)  # no key files there
    cfg.bus.secure = False
    with pytest.raises(config.ConfigError, match="bus.secure is false"):
        check_bus(cfg, True, s.id)
    with pytest.raises(config.ConfigError, match="deepgtav"):
        load_agent_config("capture", capture.CaptureSettings, None, ["capture.deepgtav=false"], environ={})


# ---------------------------------------------------------------------------------------------- the agent


class FakeGrabber:
    """What dxcam would return: a 120 x 200 RGB picture, a new one per grab (every third is 'unchanged')."""

    def __init__(self) -> None:
        self.n = 0

    def grab(self):
        self.n += 1
        if self.n % 3 == 0:
            return None
        img = np.zeros((120, 200, 3), np.uint8)
        img[..., 1] = self.n % 256
        return img

    def close(self) -> None:
        pass


class FakePad:
    def __init__(self, state: PadState):
        self.state = state

    def read(self) -> PadState:
        return self.state

    def close(self) -> None:
        pass


def _settings(srv: DeepGtavServer, **kw) -> capture.CaptureSettings:
    base = {
        "id": "cap-1",
        "frames": "deepgtav",
        "fps": 60,
        "width": 80,
        "height": 20,
        "history_length": 5,
        "codec": "raw",
        "deepgtav_port": srv.port,
        "deepgtav_frame": [161, 37],
        "unstuck": False,
        "require_secure": False,
        "telemetry_timeout_s": 1.0,
        "purpose": "off",  # purpose targets, the marker and the speed fix: tests/test_agents_gta.py
        "speed_fix": False,
    }
    return config.from_dict(capture.CaptureSettings, {**base, **kw}, "capture")


class Running:
    """An agent on its own thread against the test broker, and a subscriber that collects what it sends."""

    def __init__(self, data: dict, s: capture.CaptureSettings, prefix: str, **kw):
        cfg = config.load(data=data, environ={})
        self.svc = Service("capture_agent", cfg, s.id, http=False, signals=False)
        self.listener = Service("listener", cfg, "listener", http=False, signals=False)
        self.sub = self.listener.subscriber([prefix], late_join=False)
        self.agent = capture.build(self.svc, s, **kw)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()
        self.got: list = []

    def collect(self, n: int, timeout: float = 8.0) -> list:
        deadline = time.monotonic() + timeout
        while len(self.got) < n and time.monotonic() < deadline:
            env = self.sub.recv(100)
            if env is not None:
                assert env.sender == self.svc.instance
                self.got.append((env.topic, env.msg))
        assert len(self.got) >= n, f"only {len(self.got)} messages arrived"
        return self.got

    def close(self) -> None:
        self.svc.stop()
        self.thread.join(timeout=3)
        self.agent.close()
        self.svc.close()
        self.listener.close()


def test_collect_mode_publishes_samples_whose_history_is_strictly_the_past(broker, mod):
    srv = mod()
    _, data = broker
    run = Running(data, _settings(srv), "sample.")
    try:
        got = run.collect(12)
    finally:
        run.close()
    assert srv.messages("start")[0]["scenario"]["drivingMode"] == [786603, 15.0]  # autopilot = the NPC
    samples = [m for _, m in got]
    assert all(t == "sample.cap-1" and isinstance(m, Sample) for t, m in got)
    pairs = 0
    for prev, cur in zip(samples, samples[1:], strict=False):
        img = cur.frame.decode()
        assert img.shape == (20, 80, 3) and cur.source == "npc" and cur.collector == "cap-1"
        i = int(img[0, 0, 0])  # resized from 161x37 with R untouched: the frame's number
        lab = labels(i)
        assert cur.steering == pytest.approx(lab["steering"]) and cur.throttle_brake == pytest.approx(
            lab["throttle"] - lab["brake"]
        )
        assert cur.speed == 15.0 and cur.purpose == (0.0, 0.0)
        assert cur.history.shape == (5, 5) and cur.history.dtype == np.float32
        # the history never holds this frame's label: no row is (steering, throttle_brake) of now
        now_row = np.array([cur.steering, cur.throttle_brake], np.float32)
        assert not np.any(np.all(np.isclose(cur.history[:, :2], now_row), axis=1))
        if cur.seq == prev.seq + 1:  # consecutive ticks: the newest history row is the previous label
            pairs += 1
            np.testing.assert_allclose(
                cur.history[-1, :3], [prev.steering, prev.throttle_brake, prev.speed], rtol=1e-6
            )
            assert cur.previous == pytest.approx((prev.steering, prev.throttle_brake))
            assert cur.game_time > prev.game_time
    assert pairs >= 5


def test_unstuck_asks_the_mod_for_a_new_location(broker, mod):
    srv = mod(moving=False)  # a car that never moves is stuck
    _, data = broker
    s = _settings(
        srv,
        unstuck=True,
        spawn_points=[[500.0, -300.0]],
        unstuck_config={
            "window_s": 0.3,
            "min_distance_m": 1.0,
            "fade_out_s": 0.05,
            "settle_s": 0.05,
            "fade_in_s": 0.05,
            "grace_s": 0.1,
        },
    )
    run = Running(data, s, "sample.")
    try:
        wait_for(lambda: srv.messages("config"), 5, "no teleport asked of the mod")
        cfg_msg = srv.messages("config")[0]
        assert cfg_msg["scenario"]["location"] == [500.0, -300.0]
        assert cfg_msg["dataset"]["frame"] == [161, 37]  # the mod reads the whole dataset on config
        assert srv.location[:2] == [500.0, -300.0]
        assert counter_value(run.svc.metrics.registry, "charles_agent_unstucks_total") >= 1
        run.collect(3)
    finally:
        run.close()


FAST_UNSTUCK = {
    "window_s": 0.3,
    "min_distance_m": 1.0,
    "fade_out_s": 0.1,
    "settle_s": 0.1,
    "fade_in_s": 0.1,
    "grace_s": 0.1,
}


def test_play_mode_marks_the_frames_of_an_unstuck_recovery(broker, mod):
    # a collector reading game.<id> must know which frames are the car being moved, not driving
    srv = mod(moving=False)
    _, data = broker
    s = _settings(srv, mode="play", unstuck=True, unstuck_config=FAST_UNSTUCK)
    run = Running(data, s, "game.")
    try:
        wait_for(lambda: srv.messages("config"), 5, "no teleport asked of the mod")
        run.collect(90)  # 1.5 s at 60 fps: stuck after 0.3 s, recovered 0.3 s later
    finally:
        run.close()
    marks = [m.recovering for _, m in run.got]
    assert set(marks) == {True, False}, "driving frames say false, the recovery's frames true"
    assert marks.index(True) > 0, "the car drives before it is found stuck"
    # the recovery lasts fade out + settle + fade in (0.3 s of game time), then the car drives again
    first = marks.index(True)
    last = first + marks[first:].index(False) - 1
    assert run.got[last][1].game_time - run.got[first][1].game_time == pytest.approx(0.3, abs=0.1)


def test_play_mode_without_unstuck_says_it_is_not_recovering(broker, mod):
    srv = mod()
    _, data = broker
    run = Running(data, _settings(srv, mode="play"), "game.")
    try:
        got = run.collect(5)
    finally:
        run.close()
    assert all(m.recovering is False for _, m in got)


def test_play_mode_publishes_game_frames_from_dxcam_at_a_steady_rate(broker, mod):
    srv = mod()
    _, data = broker
    s = _settings(srv, mode="play", frames="dxcam", width=50, height=30, deepgtav_frame=[])
    run = Running(data, s, "game.", grabber=FakeGrabber())
    try:
        got = run.collect(10)
    finally:
        run.close()
    assert srv.size == (16, 9)  # dxcam takes the pictures: the mod is asked for a tiny one
    assert srv.messages("start")[0]["scenario"]["drivingMode"] == -1  # the player drives
    frames = [m for _, m in got]
    assert all(t == "game.cap-1" and isinstance(m, GameFrame) for t, m in got)
    for g in frames:
        assert g.frame.shape == (30, 50, 3) and g.frame.decode().shape == (30, 50, 3)
        assert g.speed == 15.0 and g.position is not None and g.position[1] == 200.0
        assert g.controls is not None and -1 <= g.controls[0] <= 1
    assert [g.seq for g in frames] == sorted(g.seq for g in frames)
    assert any(g.heading is not None and abs(g.heading) < 1e-6 for g in frames)  # the car moves along +x
    # dxcam ticks are paced from the start of the loop: game times are whole multiples of 1/fps
    for g in frames:
        k = g.game_time * 60
        assert abs(k - round(k)) < 1e-6


def test_a_human_drives_with_the_pad_and_the_mod_gets_the_pad_as_commands(broker, mod):
    srv = mod()
    _, data = broker
    s = _settings(srv, driver="human")
    run = Running(data, s, "sample.", pad=FakePad(PadState(steering=0.25, throttle=0.8, brake=0.2)))
    try:
        got = run.collect(4)
        wait_for(lambda: srv.messages("commands"), 2, "no commands reached the mod")
    finally:
        run.close()
    assert srv.messages("start")[0]["scenario"]["drivingMode"] == -1
    assert srv.messages("commands")[0] == pytest.approx({"throttle": 0.8, "brake": 0.2, "steering": 0.25})
    for _, smp in got:
        assert smp.source == "human" and smp.steering == 0.25 and smp.throttle_brake == pytest.approx(0.6)


def test_stale_telemetry_holds_samples_back(broker, mod):
    srv = mod()
    _, data = broker
    s = _settings(srv, frames="dxcam", deepgtav_frame=[], telemetry_timeout_s=0.2)
    cfg = config.load(data=data, environ={})
    svc = Service("capture_agent", cfg, "cap-1", http=False, signals=False)
    agent = capture.build(svc, s, grabber=FakeGrabber())
    try:
        wait_for(lambda: agent.feed.latest() is not None, 3, "no telemetry")
        srv.close()  # the game stops talking
        time.sleep(0.4)
        tick = agent.next_tick()
        assert tick is not None and agent.process(*tick) is False
        assert counter_value(svc.metrics.registry, "charles_drops_total", {"cause": "telemetry_stale"}) >= 1
        assert svc.status == "waiting"
    finally:
        agent.close()
        svc.close()


def test_entry_point_publishes_and_stops_on_sigterm(broker, mod):
    from conftest import free_ports

    srv = mod()
    _, data = broker
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__CAPTURE__REQUIRE_SECURE": "false",
    }
    listener = Service("listener", config.load(data=data, environ={}), "listener", http=False, signals=False)
    sub = listener.subscriber(["sample.smoke"], late_join=False)
    cmd = [
        sys.executable,
        "-m",
        "charles.agents.capture",
        "--id",
        "smoke",
        "--frames",
        "deepgtav",
        "--width",
        "32",
        "--height",
        "16",
        "--set",
        f"capture.deepgtav_port={srv.port}",
        "--set",
        "capture.fps=60",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 15
        env_msg = None
        while env_msg is None and time.monotonic() < deadline and proc.poll() is None:
            env_msg = sub.recv(200)
        assert env_msg is not None, (
            proc.stdout.read().decode() if proc.poll() is not None else "no sample from the entry point"
        )
        assert env_msg.msg.frame.shape == (16, 32, 3) and env_msg.sender == "smoke"
        import urllib.request

        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=2) as r:
            assert b"charles_agent_frames_total" in r.read()
        out = stop_by_sigterm(proc)
        assert "collect mode" in out and "connected" in out
        wait_for(lambda: srv.messages("stop"), 10, "the agent did not stop the mod's scenario on shutdown")
    finally:
        if proc.poll() is None:
            proc.kill()
        listener.close()


def test_purpose_points_at_the_target_relative_to_the_heading():
    h = capture.MotionHeading()
    assert h.update((0.0, 0.0, 0.0)) is None
    assert h.update((0.0, 2.0, 0.0)) == pytest.approx(math.pi / 2)  # moving north
    assert h.update((1000.0, 2.0, 0.0)) is None  # a teleport forgets the heading


def test_stacked_frames_are_past_frames_stride_apart_and_a_pad_alone_needs_no_mod():
    s = config.from_dict(
        capture.CaptureSettings,
        {
            "driver": "human",
            "deepgtav": False,
            "frames": "dxcam",
            "width": 8,
            "height": 4,
            "codec": "raw",
            "require_secure": False,
        },
        "capture",
    )
    svc = Service("capture_agent", config.load(data={}, environ={}), "cap-s", http=False, signals=False)
    try:
        agent = capture.CaptureAgent(
            svc,
            s,
            InputShape(8, 4, frames=3, frame_stride=2, history_rows=3),
            pad=FakePad(PadState(-0.5, 0.0, 1.0)),
        )
        sent: list = []
        agent.pub.send = lambda topic, msg, kind=None: sent.append(msg)
        for k in range(7):
            assert agent.process(float(k) / 30, np.full((4, 8, 3), k, np.uint8), None)
        stacks = [[int(f.decode()[0, 0, 0]) for f in smp.stack] for smp in sent]
        assert stacks == [[0, 0], [0, 0], [0, 0], [0, 1], [0, 2], [1, 3], [2, 4]]
        assert all(smp.source == "human" and smp.speed == 0.0 and smp.throttle_brake == -1.0 for smp in sent)
        np.testing.assert_allclose(sent[-1].history[:, :2], [[-0.5, -1.0]] * 3)
        assert sent[0].previous is None and sent[1].previous == (-0.5, -1.0)
    finally:
        svc.close()
