"""The GTA V side against the protocol stand-in (tests/mod_support.py ``ExtendedMod``) on real sockets.

Two cameras from a mod that alternates them, reaching the player and its camera stream with one tick;
purpose targets that change when reached; noise bursts driven through the mod's override and labelled
with the autopilot's wish; DAgger, the player's model driving over the autopilot and its frames labelled
with what the autopilot wanted (and nothing labelled without the extension); telemetry matched to dxcam
captures and the skew metric; the public mod's speed bug worked around. The pure pieces (pairing, interpolation, targets, the clock) are tested first.
"""

from __future__ import annotations

import math
import threading
import time

import cv2
import numpy as np
import pytest

from charles import config
from charles.agents import capture
from charles.agents.deepgtav import (
    CameraPairer,
    DeepGtavFeed,
    GameMessage,
    Scenario,
    Telemetry,
    dataset,
    plan_speed_start,
    start_speed,
)
from charles.agents.timing import GameClock, SkewStats, match
from charles.drive.purpose import Targets
from charles.proto import GameFrame, Sample
from charles.runtime import Service

from mod_support import ExtendedMod, labels, mod_servers, msvc_rand_stream
from tests_support import counter_value, stream_parts, wait_for, weights_message


@pytest.fixture
def xmod():
    with mod_servers(ExtendedMod) as make:
        yield make


def _msg(received: float, tick: int | None = None, camera: str | None = None, **tele) -> GameMessage:
    frame = np.full((2, 2, 3), tick or 0, np.uint8)
    return GameMessage(0, received, frame, Telemetry(tick=tick, camera=camera, **tele), {})


# ---------------------------------------------------------------------------------------------- pieces


def test_the_pairer_tags_a_hood_frame_with_the_cinematic_of_the_tick_before_and_never_waits():
    events: list[str] = []
    p = CameraPairer(events.append)
    first = p.push(_msg(0.0, 9, "hood"))  # nothing before it: out alone, at once
    assert [m.telemetry.tick for m in first] == [9] and first[0].cinematic is None
    assert p.push(_msg(0.0, 10, "cinematic")) == []
    out = p.push(_msg(0.1, 11, "hood"))
    assert len(out) == 1 and out[0].telemetry.tick == 11 and int(out[0].cinematic[0, 0, 0]) == 10
    out = p.push(_msg(0.2, 13, "hood"))  # 12 was lost: 13 goes out alone
    assert [m.telemetry.tick for m in out] == [13] and out[0].cinematic is None
    p.push(_msg(0.3, 14, "cinematic"))
    p.push(_msg(0.4, 16, "cinematic"))  # only the newest cinematic is kept
    assert int(p.push(_msg(0.5, 17, "hood"))[0].cinematic[0, 0, 0]) == 16
    assert events == ["camera_unpaired", "camera_unpaired"]
    assert p.push(_msg(0.6, None, None))[0].cinematic is None  # a mod that does not alternate


def test_telemetry_is_interpolated_to_the_capture_time_and_the_skew_is_the_gap_to_the_nearest():
    recent = [
        _msg(1.0, speed=10.0, location=(0.0, 0.0, 0.0), steering=0.0, game_ms=1000.0),
        _msg(1.1, speed=20.0, location=(10.0, 4.0, 0.0), steering=0.5, game_ms=1100.0),
    ]
    m = match(1.075, recent)
    assert m.telemetry.speed == pytest.approx(17.5) and m.telemetry.location == pytest.approx((7.5, 3.0, 0.0))
    assert m.telemetry.steering == pytest.approx(0.375) and m.game_ms == pytest.approx(1075.0)
    assert m.skew_s == pytest.approx(0.025)
    late = match(1.3, recent)  # after the newest: the newest, never extrapolated
    assert late.telemetry.speed == 20.0 and late.skew_s == pytest.approx(0.2)
    assert match(1.0, []) is None
    stats = SkewStats()
    for v in [0.001] * 98 + [0.03, 0.03]:
        stats.add(v)
    p50, p99 = stats.quantiles()
    assert p50 == pytest.approx(0.001) and 0.001 < p99 <= 0.03


def test_the_game_clock_follows_the_mod_stands_still_when_paused_and_survives_a_restart():
    c = GameClock()
    assert c.at(50.0, 5000.0) == 0.0 and c.advance(0.0)
    assert c.at(50.1, 5033.0) == pytest.approx(0.033) and c.advance(0.033)
    assert c.at(50.2, 5033.0) == pytest.approx(0.033) and not c.advance(0.033)  # paused: no new tick
    t = c.at(50.3, 200.0)  # the game restarted: its clock went back; ours goes on
    assert t == pytest.approx(0.033) and c.at(50.4, 233.0) == pytest.approx(0.066)
    pc = GameClock()  # no game clock: the PC's
    assert pc.at(7.0, None) == 0.0 and pc.at(7.5, None) == 0.5


def test_targets_follow_waypoints_in_order_and_random_ones_keep_their_distance():
    t = Targets([(0.0, 100.0), (50.0, 100.0)], reach_m=10.0)
    assert not t.update((0.0, 0.0)) and t.target == (0.0, 100.0)
    assert not t.update((0.0, 80.0))
    assert t.update((0.0, 95.0)) and t.target == (50.0, 100.0) and t.reached == 1
    assert t.update((45.0, 100.0)) and t.target == (0.0, 100.0)  # and round again
    r = Targets(box=(-500.0, 500.0, -500.0, 500.0), min_m=300.0, seed=3)
    r.update((0.0, 0.0))
    assert math.hypot(*r.target) >= 300.0


def test_the_speed_the_public_mod_draws_is_msvc_rand_after_srand_of_the_second():
    sc = Scenario(location=[1.0, 2.0]).to_json()
    draws = msvc_rand_stream(1_700_000_000)
    assert start_speed(1_700_000_000, sc) == float(next(draws) % 20)
    random_place = Scenario(location=None).to_json()  # two draws for x and y come first
    draws = msvc_rand_stream(1_700_000_000)
    next(draws), next(draws)
    assert start_speed(1_700_000_000, random_place) == float(next(draws) % 20)
    t = plan_speed_start(1_700_000_000.2, 15.0, sc, horizon_s=200)
    assert t >= 1_700_000_002 and start_speed(t, sc) == 15.0


# ---------------------------------------------------------------------------------------------- stand-in


def _settings(srv: ExtendedMod, **kw) -> capture.CaptureSettings:
    base = {
        "id": "gta-1",
        "frames": "deepgtav",
        "fps": 30,
        "width": 80,
        "height": 20,
        "history_length": 5,
        "codec": "raw",
        "deepgtav_port": srv.port,
        "deepgtav_frame": [161, 37],
        "unstuck": False,
        "require_secure": False,
        "telemetry_timeout_s": 1.0,
        "speed_fix": False,
    }
    return config.from_dict(capture.CaptureSettings, {**base, **kw}, "capture")


class Agent:
    """A capture agent on its own thread against the test broker."""

    def __init__(self, data: dict, s: capture.CaptureSettings, **kw):
        cfg = config.load(data=data, environ={})
        self.svc = Service("capture_agent", cfg, s.id, http=False, signals=False)
        self.agent = capture.build(self.svc, s, **kw)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def metric(self, name: str, labels: dict | None = None) -> float:
        return counter_value(self.svc.metrics.registry, name, labels or {})

    def close(self) -> None:
        self.svc.stop()
        self.thread.join(timeout=3)
        self.agent.close()
        self.svc.close()


def _gap(img: np.ndarray, tick: int) -> int:
    """How far a picture's red is from what the stand-in paints for ``tick``."""
    return abs(int(img[-1, 0, 0]) - (tick * 8) % 256)


def _received(sub, until, timeout: float = 10.0) -> list:
    got: list = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not until(got):
        env = sub.recv(100)
        if env is not None:
            got.append(env.msg)
    return got


def test_both_cameras_reach_the_player_and_its_stream_with_one_tick_and_targets_change(
    broker, client_factory, xmod
):
    from charles.model.presets import get_config
    from charles.player.service import PlayerService
    from charles.viewer.app import serve
    from charles.viewer.board import Board
    from charles.viewer.web import Viewer

    srv = xmod()  # the car drives east 0.5 m a frame from (100, 200)
    _, data = broker
    vsvc = client_factory("viewer")  # the real viewer: its receive loop and its page's picture streams
    board = Board()
    web = Viewer(vsvc, board)
    web.start(host="127.0.0.1", port=0)
    vt = threading.Thread(target=serve, args=(vsvc, board, web), daemon=True)
    vt.start()
    viewer = client_factory("listener").subscriber(["camera."], late_join=False)
    game = client_factory("listener").subscriber(["game."], late_join=False)
    psvc = client_factory(
        "player",
        player={
            "source": "remote",
            "source_id": "gta-1",
            "realtime": False,
            "console_hz": 5,
            "camera_hz": 30,
            "terminal": False,
            "threads": 1,
        },
    )
    player = PlayerService(psvc, get_config("tiny"))
    pt = threading.Thread(target=player.run, daemon=True)
    pt.start()
    waypoints = [[100.0 + 20.0 * k, 200.0] for k in range(1, 40)]
    agent = Agent(
        data,
        _settings(
            srv,
            mode="play",
            cameras="alternate",
            purpose="waypoints",
            purpose_waypoints=waypoints,
            purpose_reach_m=6.0,
            quality=95,
        ),
    )
    pages: dict[str, list] = {}

    def page(name: str) -> None:
        pages[name] = stream_parts(web.port, f"/stream/player/{name}.mjpg", 15)[1]

    try:
        frames = _received(game, lambda g: len(g) >= 40)
        cams = _received(viewer, lambda c: sum(m.tick is not None for m in c) >= 10)
        wait_for(lambda: board.resolve("player") is not None, 10, "the viewer never heard of the player")
        readers = [threading.Thread(target=page, args=(n,)) for n in ("cinematic", "hood")]
        for r in readers:
            r.start()
        for r in readers:
            r.join(15)
    finally:
        agent.close()
        psvc.stop()
        pt.join(5)
        vsvc.stop()
        vt.join(3)
        web.close()
    assert srv.messages("start")[0]["dataset"]["rate"] == 60  # hood and cinematic: 30 Hz each
    assert srv.messages("start")[0]["dataset"]["cameras"] == ["hood", "cinematic"]
    assert len(frames) >= 40 and all(isinstance(f, GameFrame) for f in frames)
    paired = [f for f in frames if f.cinematic is not None]
    assert len(paired) >= len(frames) - 1  # the very first hood frame may have had no cinematic before it
    for f in frames:  # the mod's odd ticks are hood frames
        assert f.tick is not None and f.tick % 2 == 1
        hood = f.frame.decode()
        assert int(hood[-1, 0, 0]) == (f.tick * 8) % 256 and int(hood[-1, 0, 1]) == 0
    for f in paired:  # each with the cinematic of the tick before (JPEG: within a few levels)
        cine = f.cinematic.decode()
        assert _gap(cine, f.tick - 1) <= 3 and int(cine[-1, 0, 1]) > 240
    # the game's clock, not the PC's: one hood frame every 2 mod frames of 1000/60 ms
    steps = {
        round(b.game_time - a.game_time, 4)
        for a, b in zip(frames, frames[1:], strict=False)
        if b.tick == a.tick + 2
    }
    assert steps == {round(2 / 60, 4)}
    # purpose: new targets as the car reaches them; the marker is drawn at the top of the hood frame
    reached = agent.metric("charles_agent_purpose_targets_reached_total")
    assert reached >= 2 and len({round(f.purpose[1]) for f in frames}) > 5
    top = frames[-1].frame.decode()[:4, 36:44]
    assert (top[:, :, 1] > 0).any()  # the magenta arrow over a picture whose green is 0
    # the camera stream the viewer shows: the same tick on both pictures, the cinematic one the mod's
    tagged = [c for c in cams if c.tick is not None]
    both = [c for c in tagged if set(c.images) == {"cinematic", "hood"}]
    assert len(tagged) >= 10 and len(both) >= len(tagged) - 1  # the first frame may have come alone
    for c in both:
        assert c.tick % 2 == 1
        cine = c.images["cinematic"].decode()
        assert _gap(cine, c.tick - 1) <= 4 and int(cine[-1, 0, 1]) > 230
        hood = c.images["hood"].decode()
        assert abs(int(hood[-1, 0, 0]) - (c.tick * 8) % 256) <= 4 and int(hood[-1, 0, 1]) < 25
    # and the viewer's page streams them, each part tagged with its tick: the same ticks on both tiles
    ticks = {}
    for name, parts in pages.items():
        tagged_parts = [(int(h["X-Game-Tick"]), body) for h, body in parts if "X-Game-Tick" in h]
        assert len(tagged_parts) >= 10, f"{name}: {len(tagged_parts)} tagged pictures"
        ticks[name] = {t for t, _ in tagged_parts}
        for t, body in tagged_parts:
            img = cv2.cvtColor(
                cv2.imdecode(np.frombuffer(body, np.uint8), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB
            )
            if name == "cinematic":
                assert _gap(img, t - 1) <= 4 and int(img[-1, 0, 1]) > 230
            else:
                assert _gap(img, t) <= 4 and int(img[-1, 0, 1]) < 25
    assert len(ticks["cinematic"] & ticks["hood"]) >= 5


def test_noise_bursts_override_the_autopilot_and_are_labelled_with_what_it_wanted(
    broker, client_factory, xmod
):
    srv = xmod(size=(80, 20))
    _, data = broker
    sub = client_factory("listener").subscriber(["sample."], late_join=False)
    agent = Agent(
        data,
        _settings(
            srv, deepgtav_frame=[80, 20], purpose="off", noise_rate_hz=4.0, noise_duration_s=[0.2, 0.3]
        ),
    )
    try:
        samples = _received(sub, lambda g: len(g) >= 90 and len(srv.overridden_ticks) >= 10)
    finally:
        agent.close()
    assert all(isinstance(s, Sample) for s in samples)
    overrides = srv.messages("commands")
    assert overrides and all(c["override"] is True for c in overrides)
    overridden = set(srv.overridden_ticks)
    checked = 0
    for s in samples:
        i = int(s.frame.decode()[0, 0, 0])  # frame i is painted R = i % 256 (raw codec: exact)
        want = labels(i)
        # every label is the autopilot's wish, whether or not the mod drove the car with our override
        assert s.steering == pytest.approx(want["steering"]) and s.throttle_brake == pytest.approx(
            want["throttle"] - want["brake"]
        )
        checked += i in {t % 256 for t in overridden}
    assert checked >= 5, "no sample of an overridden frame"
    noisy = agent.metric("charles_agent_noise_frames_total")
    assert noisy >= 10
    # the history records what the car got: during bursts, the offset actions, not the labels
    rows = np.concatenate([s.history for s in samples if s.history is not None])
    sent = {round(c["steering"], 4) for c in overrides}
    assert any(round(float(r), 4) in sent for r in rows[:, 0])


def test_without_the_autopilot_extension_burst_frames_are_dropped_not_mislabelled(
    broker, client_factory, xmod
):
    srv = xmod(size=(80, 20), extended=False)  # the public mod: no ``autopilot``, overrides ignored
    _, data = broker
    agent = Agent(
        data,
        _settings(
            srv, deepgtav_frame=[80, 20], purpose="off", noise_rate_hz=4.0, noise_duration_s=[0.2, 0.3]
        ),
    )
    try:
        wait_for(
            lambda: agent.metric("charles_drops_total", {"cause": "noise_unlabelled"}) >= 5,
            10,
            "no burst frame was dropped",
        )
    finally:
        agent.close()
    assert srv.overridden_ticks == []


def _dagger_run(broker, client_factory, srv: ExtendedMod, enough) -> dict:
    """A capture agent with ``dagger`` and the real player (tiny model, ``dagger``) on the stand-in, until
    ``enough(run)``; what crossed the bus and both services' counters."""
    import torch

    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights
    from charles.player.service import PlayerService

    tiny = get_config("tiny")
    _, data = broker
    samples = client_factory("balancer").subscriber(["sample."], late_join=False)
    actions = client_factory("listener").subscriber(["action."], late_join=False)
    psvc = client_factory(
        "player",
        player={
            "source": "remote",
            "source_id": "gta-1",
            "dagger": True,
            "realtime": False,
            "console_hz": 0,
            "camera_hz": 0,
            "terminal": False,
            "threads": 1,
        },
        collector={"codec": "raw"},  # the agent's raw frames pass through: the sample's picture is exact
    )
    player = PlayerService(psvc, tiny)
    pt = threading.Thread(target=player.run, daemon=True)
    pt.start()
    torch.manual_seed(0)
    w = weights_message(save_weights(build_model(tiny), tiny, half=True), 1, tiny)
    wpub = client_factory("trainer").publisher("weights")
    agent = Agent(
        data,
        _settings(
            srv,
            mode="play",
            dagger=True,
            allowed_senders=["player"],
            width=tiny.width,
            height=tiny.height,
            deepgtav_frame=[tiny.width, tiny.height],
            purpose="off",
        ),
    )
    run: dict = {"samples": [], "actions": [], "player": player, "agent": agent}
    try:
        # the weights until the player drives (a publisher's first message may meet no subscriber yet)
        wait_for(lambda: wpub.send("weights.tiny", w) and player.predictions > 0, 20, "the model never drove")
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not enough(run):
            for sub, got in ((samples, run["samples"]), (actions, run["actions"])):
                env = sub.recv(20)
                if env is not None:
                    got.append(env)
    finally:
        agent.close()
        psvc.stop()
        pt.join(5)
    while (env := actions.recv(300)) is not None:  # those sent after the last look
        run["actions"].append(env)
    return run


def test_dagger_the_model_drives_over_the_autopilot_and_its_frames_get_the_autopilots_labels(
    broker, client_factory, xmod
):
    srv = xmod(size=(160, 90))
    run = _dagger_run(
        broker,
        client_factory,
        srv,
        lambda r: len(r["samples"]) >= 40 and len(srv.overridden_ticks) >= 20,
    )
    player, agent, samples = run["player"], run["agent"], run["samples"]
    assert len(samples) >= 40, f"{len(samples)} DAgger samples"
    # the model drove: the player's actions reached the mod as overrides, and the car got them
    sent = {
        (round(a.msg.steering, 6), round(a.msg.throttle, 6), round(a.msg.brake, 6)) for a in run["actions"]
    }
    overrides = srv.messages("commands")
    assert len(overrides) >= 20 and all(c["override"] is True for c in overrides)
    assert {
        (round(c["steering"], 6), round(c["throttle"], 6), round(c["brake"], 6)) for c in overrides
    } <= sent
    assert agent.metric("charles_agent_actions_applied_total") >= 20 and len(srv.overridden_ticks) >= 20
    driven = {(round(c["steering"], 4), round(c["throttle"] - c["brake"], 4)) for c in overrides}
    overridden = set(srv.overridden_ticks)
    on_overridden = 0
    for env in samples:
        s = env.msg
        assert env.topic == f"sample.{player.svc.instance}" and s.source == "dagger"
        i = int(s.frame.decode()[0, 0, 0])  # frame i is painted R = i % 256 (raw all the way: exact)
        ticks = [j for j in range(i, srv.sent + 1, 256) if j > 0]
        wishes = [labels(j) for j in ticks]
        # exactly what the stand-in's autopilot wanted on that frame, never what the model drove
        assert any(
            s.steering == pytest.approx(x["steering"])
            and s.throttle_brake == pytest.approx(x["throttle"] - x["brake"])
            for x in wishes
        ), (i, s.steering, s.throttle_brake)
        assert (round(s.steering, 4), round(s.throttle_brake, 4)) not in driven
        on_overridden += any(j in overridden for j in ticks)
    assert on_overridden >= 10, "no sample of a frame the model's override drove"
    assert player.dagger_samples >= len(samples) and player.decider.unlabelled == 0
    reg = player.svc.metrics.registry
    assert counter_value(reg, "charles_drops_total", {"cause": "dagger_unlabelled"}) == 0


def test_dagger_without_the_extension_the_models_frames_are_counted_never_labelled(
    broker, client_factory, xmod
):
    srv = xmod(size=(160, 90), extended=False)  # the public mod: no ``autopilot``, overrides ignored

    def dropped(r) -> float:
        reg = r["player"].svc.metrics.registry
        return counter_value(reg, "charles_drops_total", {"cause": "dagger_unlabelled"})

    run = _dagger_run(broker, client_factory, srv, lambda r: dropped(r) >= 30)
    player, agent = run["player"], run["agent"]
    assert dropped(run) >= 30 and dropped(run) == player.decider.unlabelled
    assert run["samples"] == [] and player.dagger_samples == 0  # nothing labelled with what was driven
    assert player.predictions >= 30 and srv.messages("commands"), "the model never drove"
    assert srv.overridden_ticks == []  # the public mod's autopilot kept the car
    assert agent.metric("charles_agent_deepgtav_events_total", {"event": "no_autopilot"}) == 1
    assert player.state()["dagger_unlabelled"] == player.decider.unlabelled


def test_dagger_settings_are_checked():
    ok = {"mode": "play", "dagger": True, "allowed_senders": ["player"], "require_secure": False}
    assert config.from_dict(capture.CaptureSettings, ok, "capture").dagger
    for bad, why in (
        ({"mode": "collect"}, "mode=play"),
        ({"deepgtav": False, "frames": "dxcam", "driver": "human"}, "deepgtav=true"),
        ({"allowed_senders": []}, "allowed_senders"),
    ):
        with pytest.raises((ValueError, config.ConfigError), match=why):
            config.from_dict(capture.CaptureSettings, {**ok, **bad}, "capture")


def test_dxcam_frames_get_telemetry_interpolated_to_their_capture_and_the_skew_is_measured(
    broker, client_factory, xmod
):
    class Screen:
        def grab(self):
            return np.zeros((20, 80, 3), np.uint8)

        def close(self):
            pass

    srv = xmod(size=(16, 9))
    _, data = broker
    sub = client_factory("listener").subscriber(["game."], late_join=False)
    agent = Agent(
        data,
        _settings(srv, mode="play", frames="dxcam", deepgtav_frame=[16, 9], purpose="off"),
        grabber=Screen(),
    )
    try:
        frames = _received(sub, lambda g: len(g) >= 60)
    finally:
        agent.close()
    reg = agent.svc.metrics.registry
    count = reg.get_sample_value("charles_agent_telemetry_skew_seconds_count")
    p50 = reg.get_sample_value("charles_agent_telemetry_skew_quantile_seconds", {"quantile": "0.5"})
    p99 = reg.get_sample_value("charles_agent_telemetry_skew_quantile_seconds", {"quantile": "0.99"})
    assert count >= 60 and p50 is not None and p99 is not None
    from prometheus_client import generate_latest

    from charles import topology

    exposed = generate_latest(reg).decode()
    for m in (m for m in topology.METRICS.values() if m.owner == "capture_agent"):
        assert all(n in exposed for n in topology.exposed_names(m)), f"{m.name}: listed, not exposed"
    # 30 Hz telemetry around each capture: the nearest data message is at most half a period away
    # (p99: a loaded box may deliver one late)
    assert 0.0 <= p50 <= 1 / 60 + 0.005 and p50 <= p99 < 0.25
    # positions between the mod's 0.5 m steps: interpolated, not the newest message's
    xs = [f.position[0] for f in frames if f.position is not None]
    assert any(abs(x * 2 - round(x * 2)) > 0.01 for x in xs)
    # game time from the mod's clock (gameTime), at the capture times: rising with the frames
    assert all(b.game_time > a.game_time for a, b in zip(frames, frames[1:], strict=False))


def test_the_public_mods_speed_bug_is_worked_around_by_a_timed_restart(xmod):
    srv = xmod()
    sc = Scenario(location=[100.0, 200.0], driving_speed=0.0)
    now = time.time()
    # the speed a start would draw two seconds from now: the feed must get the mod to it
    want = start_speed(int(now) + 2 + (now % 1 > 0.5), sc.to_json())
    sc.driving_speed = want
    feed = DeepGtavFeed("127.0.0.1", srv.port, sc, dataset(30, (16, 9)), speed_fix=True)
    events: list[str] = []
    feed.on_event = events.append
    feed.start()
    try:
        wait_for(lambda: "speed_restart" in events and len(srv.speeds) >= 2, 70, "no timed restart")
        wait_for(lambda: (m := feed.latest()) is not None and m.telemetry.speed == want, 5, "wrong speed")
        kinds = [k for m in srv.received for k in m]
    finally:
        feed.close()
    assert kinds == ["start", "stop", "start"]
    assert srv.speeds[-1] == want == feed.expected_speed
    assert srv.messages("start")[-1]["scenario"]["drivingMode"] == [786603, want]  # what it ignores


def test_a_mod_that_reads_the_speed_is_left_alone(xmod):
    srv = xmod(honours_speed=True)
    feed = DeepGtavFeed("127.0.0.1", srv.port, Scenario(driving_speed=12.0), dataset(30, (16, 9)))
    feed.start()
    try:
        wait_for(lambda: (m := feed.latest()) is not None and m.telemetry.speed == 12.0, 5, "no data")
        time.sleep(1.5)  # past the moment a restart would be planned for
        kinds = [k for m in srv.received for k in m]
    finally:
        feed.close()
    assert kinds == ["start"] and feed.expected_speed == 12.0
