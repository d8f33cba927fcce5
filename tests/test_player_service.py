"""The player on real loopback sockets: weights from the broker, swaps, refusals, remote play, DAgger, console.

Each test runs :class:`PlayerService` in a thread of this process (``svc.stop`` is exactly what SIGTERM
calls), with the tiny preset, the sim unpaced and short Unstuck phases; the subprocess test runs the real
entry point.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest
import torch

from charles.model.predictor import Predictor
from charles.model.presets import get_config
from charles.player.console import ConsolePainter, terminal_view
from charles.player.service import PlayerMetrics, PlayerService
from charles.proto import Frame, GameFrame, Weights, decode

from tests_support import counter_value, driving_weights, stop_by_sigterm, wait_for, weights_message

torch.set_num_threads(1)

TINY = get_config("tiny")
# Unstuck never fires on its own here (a 100 s window), and recovers in 0.3 s of game time when triggered.
QUICK_UNSTUCK = {"window_s": 100.0, "fade_out_s": 0.1, "settle_s": 0.1, "fade_in_s": 0.1}
PLAYER = {"realtime": False, "console_hz": 0, "camera_hz": 0, "terminal": False, "threads": 1}


def blob(seed: int, throttle: float, cfg_json: str = TINY.to_json()) -> bytes:
    """Weights of a tiny model that always asks for ``throttle`` (so the car moves) and steers a little, by its seed."""
    return driving_weights(seed, throttle, cfg_json)


def weights(payload: bytes, batch: int, cfg=TINY, model: str = "tiny") -> Weights:
    return weights_message(payload, batch, cfg, model)


W1 = (1, 0.6)
W2 = (2, 0.3)


@pytest.fixture
def player(broker, client_factory):
    """start(player=..., unstuck=...) -> PlayerService running in a thread; stopped at the end."""
    running = []

    def start(player: dict | None = None, unstuck: dict | None = None, **kw):
        svc = client_factory(
            "player", player={**PLAYER, **(player or {})}, unstuck={**QUICK_UNSTUCK, **(unstuck or {})}
        )
        service = PlayerService(svc, **kw)
        t = threading.Thread(target=service.run, daemon=True)
        t.start()
        running.append((svc, t))
        if service.follow.mode != "file":  # a player on a local file reads no weights from the bus
            wait_for(service.feed.subscribed.is_set, 5, "the weights feed never subscribed")
        return service

    yield start
    for svc, t in running:
        svc.stop()
        t.join(5)


@pytest.fixture
def trainer(broker, client_factory):
    """publish(weights) -> the broker holds it as the last value of weights.<model> (late joiners get it)."""
    b, _ = broker
    pub = client_factory("trainer").publisher("weights")

    def publish(w: Weights, until=None, timeout: float = 10.0) -> None:
        topic = f"weights.{w.model}"
        before = b.lvc.items.get(topic)

        def sent() -> bool:
            pub.send(topic, w)
            if until is not None:
                return until()
            return b.lvc.items.get(topic) is not before

        wait_for(sent, timeout, f"weights batch {w.batch} never arrived", interval=0.2)

    return publish


def continuous(service: PlayerService) -> list:
    records = list(service.recent)
    seqs = [r.seq for r in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "a frame was dropped"
    return records


def probe(payload: bytes) -> dict:
    frame = np.random.default_rng(0).integers(0, 255, (TINY.height, TINY.width, 3), np.uint8)
    return Predictor.from_weights(payload).predict(frame)


# ---------------------------------------------------------------------------------------------- weights


def test_late_joiner_gets_the_newest_weights_and_drives(player, trainer, client_factory):
    trainer(weights(blob(*W1), batch=100))  # before the player exists: served from the broker's last value
    viewer = client_factory("viewer").subscriber(["console.", "camera."], late_join=False)
    service = player(player={"console_hz": 5, "camera_hz": 30})
    wait_for(lambda: service.predictions >= 60, 20, "the player never drove")
    assert service.swapper.meta.batch == 100 and service.swapper.swaps == 0
    reg = service.svc.metrics.registry
    assert counter_value(reg, "charles_player_predictions_total") >= 60
    assert counter_value(reg, "charles_player_weights_batch") == 100
    assert service.svc.status == "ok"
    assert service.source.world.odometer_m > 1.0, "the car never moved"
    assert all(r.action[1] == pytest.approx(0.6, abs=1e-3) for r in service.recent if r.predicted)
    continuous(service)

    env = None
    cameras = []
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        got = viewer.recv(200)
        if got is not None and got.kind == "camera":
            cameras.append((time.monotonic(), got))
        elif got is not None and got.msg.state.get("model") == "tiny_v1":
            env = got
            break
    assert env is not None and env.topic == f"console.{service.svc.instance}"
    state, images = env.msg.state, env.msg.images
    assert set(images) == {"convcam"}  # the cameras went on their own stream
    # the camera stream: cinematic and hood at camera_hz, although this player runs as fast as it can
    t0 = time.monotonic()
    while time.monotonic() - t0 < 2.0:
        got = viewer.recv(100)
        if got is not None and got.kind == "camera":
            cameras.append((time.monotonic(), got))
    last = cameras[-1][1]
    assert last.topic == f"camera.{service.svc.instance}" and set(last.msg.images) == {"cinematic", "hood"}
    assert last.msg.images["hood"].shape == (TINY.height, TINY.width, 3)
    assert last.msg.images["cinematic"].codec == "jpeg" and last.msg.images["cinematic"].shape[1] == 640
    assert 0 <= time.time() - last.msg.captured < 1.0
    # the rate by the pictures' own clock (what waited in the socket's queue came out in a burst)
    taken = [c.msg.captured for t, c in cameras if t >= t0]
    hz = (len(taken) - 1) / (taken[-1] - taken[0])
    assert hz <= 31, f"camera pictures at {hz:.1f} Hz with camera_hz 30"
    # below the cap only where the box is too busy, and then it says why: the loop itself ran slower, or
    # the encoder fell behind and the pictures it skipped were counted
    busy = counter_value(reg, "charles_drops_total", {"cause": "camera_busy"})
    assert hz >= 15 or busy > 0 or service.fps < 20, f"{hz:.1f} Hz, loop {service.fps:.0f} fps, none dropped"
    seqs = [c.msg.seq for _, c in cameras]
    assert seqs == sorted(seqs)
    assert state["model_batch"] == 100 and state["controls"]["throttle"] == pytest.approx(0.6, abs=1e-3)
    assert set(state["raw"]) == {"steering", "throttle_brake"}
    assert {"fps", "pps", "swaps", "unstucks", "policy_lag", "model_created"} <= set(state)
    wait_for(lambda: service.svc.info.get("model_batch") == 100, 3, "heartbeat info")
    assert {"model_batch", "pps", "fps", "swaps", "unstucks"} <= set(service.svc.info)


def test_two_versions_on_the_bus_a_pinned_player_and_a_newest_one(player, broker, client_factory):
    """v1 and v2 of one line stream on their own topics (v2 started later): the player pinned to v1 never
    loads v2's weights, the newest one drives v2 and stays there while v1 goes on publishing. (The same with
    trainer and player processes: test_versions_timeline.py, a system test.)"""
    from charles.proto.versions import weights_topic

    b, _ = broker
    pub = client_factory("trainer").publisher("weights")

    def publish(version: int, since: float, batch: int, w=W1) -> None:
        msg = weights(blob(*w), batch=batch)
        msg.run, msg.since = f"tiny_v{version}", since
        topic = weights_topic("tiny", version)

        def held() -> bool:
            pub.send(topic, msg)
            frames = b.lvc.items.get(topic)
            return frames is not None and decode([bytes(f) for f in frames]).msg.batch == batch

        wait_for(held, 10, f"v{version} batch {batch} never reached the broker", interval=0.2)

    publish(1, 100.0, 10)
    pinned = player(player={"follow": "v1", "swap": "immediate"})
    newest = player(player={"swap": "immediate"})
    wait_for(lambda: pinned.swapper.meta and newest.swapper.meta, 20, "the players never drove")
    assert pinned.swapper.meta.run == newest.swapper.meta.run == "tiny_v1"
    publish(2, 200.0, 3, W2)  # v2's trainer starts: a later stream
    wait_for(lambda: newest.swapper.meta.run == "tiny_v2", 10, "the newest player never moved to v2")
    publish(1, 100.0, 12)  # v1 goes on training
    wait_for(lambda: pinned.swapper.meta.batch == 12, 10, "the pinned player missed v1's batch 12")
    wait_for(lambda: newest.feed.not_followed >= 1, 10, "the newest player never passed v1 by")
    assert newest.swapper.meta.run == "tiny_v2" and pinned.swapper.meta.run == "tiny_v1"
    assert pinned.feed.not_followed >= 1 and pinned.feed.loaded == 2  # v1's two batches, never v2's
    assert newest.state()["model_version"] == 2 and pinned.state()["follow"] == "tiny_v1"
    reg = pinned.svc.metrics.registry
    assert counter_value(reg, "charles_drops_total", {"cause": "not_followed"}) == pinned.feed.not_followed
    assert {"weights.tiny.v1", "weights.tiny.v2"} <= set(
        b.lvc.items
    )  # the broker keeps each version's newest

    # pinned to a batch: v1's batch 12 (the broker's last value of v1) and nothing else
    at = player(player={"follow": "tiny_v1@12", "swap": "immediate"})
    wait_for(lambda: at.swapper.meta is not None, 20, "the batch-pinned player never drove")
    publish(1, 100.0, 14)
    wait_for(lambda: at.feed.not_followed >= 2, 10, "v1's batch 14 was not passed by")  # and v2's
    assert (at.swapper.meta.run, at.swapper.meta.batch, at.feed.loaded) == ("tiny_v1", 12, 1)


def test_a_player_following_a_local_checkpoint_drives_it_and_reads_no_weights(player, trainer, tmp_path):
    """player.follow: a checkpoint folder: loaded at start, and weights on the bus are never read."""
    folder = tmp_path / "runs" / "tiny" / "tiny_v4" / "checkpoints" / "batch_000000250"
    folder.mkdir(parents=True)
    (folder / "weights.safetensors").write_bytes(blob(*W2))
    trainer(weights(blob(*W1), batch=999))
    service = player(player={"follow": str(folder)})
    wait_for(lambda: service.predictions >= 30, 20, "the player never drove its checkpoint")
    meta = service.swapper.meta
    assert (meta.run, meta.version, meta.batch) == ("tiny_v4", 4, 0) and service.feed.received == 0
    assert all(r.action[1] == pytest.approx(0.3, abs=1e-3) for r in service.recent if r.predicted)  # W2's
    assert service.state()["follow"] == str(folder)


def test_without_the_camera_stream_the_console_carries_the_cameras(player, client_factory):
    viewer = client_factory("viewer").subscriber(["console.", "camera."], late_join=False)
    service = player(player={"console_hz": 10, "camera_hz": 0})
    wait_for(lambda: service.frames >= 30, 10, "no frames")
    env = None
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and (env is None or not env.msg.images):
        env = viewer.recv(200)
        assert env is None or env.kind == "console", "a camera message with camera_hz 0"
    assert env is not None and {"cinematic", "hood"} <= set(env.msg.images)
    assert env.msg.images["hood"].shape == (TINY.height, TINY.width, 3)


def test_before_the_first_weights_it_brakes_and_says_so(player):
    service = player()
    wait_for(lambda: service.frames >= 30, 10, "no frames")
    assert service.predictions == 0 and service.svc.status == "waiting"
    assert service.state()["model"] == "waiting for weights"
    assert all(r.action == (0.0, -1.0) for r in service.recent)
    assert service.source.unstucks == 0, "standing on the brake while waiting is not being stuck"


def test_swap_waits_for_unstuck_and_drops_no_frame(player, trainer):
    trainer(weights(blob(*W1), batch=1))
    service = player()
    wait_for(lambda: service.predictions >= 10, 20, "the player never drove")
    trainer(weights(blob(*W2), batch=2), until=lambda: service.swapper.pending is not None)
    at = service.frames
    wait_for(lambda: service.frames >= at + 20, 10, "the loop stalled")
    assert service.swapper.meta.batch == 1, "unstuck policy: no swap while the car drives"
    assert (
        service.swapper.lag == 1
        and counter_value(service.svc.metrics.registry, "charles_player_policy_lag_batches") == 1
    )

    service.source.session.unstuck.trigger()  # stuck (as water or the stuck window would say)
    wait_for(lambda: service.swapper.meta.batch == 2, 10, "no swap at the unstuck")
    wait_for(lambda: service.recent[-1].batch == 2, 10, "never drove on the new weights")
    records = continuous(service)
    first = next(i for i, r in enumerate(records) if r.batch == 2)
    k = first - 1
    while k >= 0 and not records[k].predicted:
        k -= 1
    assert k < first - 1, "the swap happened while Unstuck had the car (frames without predictions)"
    assert records[k].batch == 1
    assert service.swapper.swaps == 1 and service.source.unstucks == 1
    reg = service.svc.metrics.registry
    assert counter_value(reg, "charles_player_swaps_total") == 1
    assert counter_value(reg, "charles_player_unstucks_total") == 1
    assert records[-1].action[1] == pytest.approx(0.3, abs=1e-3)
    before, after = probe(blob(*W1)), probe(blob(*W2))
    now = service.swapper.active.predict(np.random.default_rng(0).integers(0, 255, (90, 160, 3), np.uint8))
    assert not np.allclose(before["steering"], after["steering"])
    np.testing.assert_allclose(now["steering"], after["steering"], rtol=1e-5, atol=1e-6)


def test_immediate_policy_swaps_between_two_driven_frames(player, trainer):
    trainer(weights(blob(*W1), batch=1))
    service = player(player={"swap": "immediate"})
    wait_for(lambda: service.predictions >= 10, 20, "the player never drove")
    trainer(weights(blob(*W2), batch=2), until=lambda: service.swapper.newest.batch == 2)
    wait_for(lambda: service.recent[-1].batch == 2, 5, "no immediate swap")
    records = continuous(service)
    first = next(i for i, r in enumerate(records) if r.batch == 2)
    assert records[first - 1].predicted and records[first - 1].batch == 1, (
        "swapped while driving, frame to frame"
    )
    assert service.swapper.swaps == 1 and service.source.unstucks == 0


def test_foreign_and_pickled_weights_are_refused_and_counted(player, trainer):
    trainer(weights(blob(*W1), batch=1))
    service = player()
    wait_for(lambda: service.predictions >= 5, 20, "the player never drove")
    reg = service.svc.metrics.registry

    def refused(reason: str):
        return lambda: counter_value(reg, "charles_rejects_total", {"reason": reason}) >= 1

    other = TINY.replace(width=128)  # another network under the same line name
    trainer(weights(blob(3, 0.1, other.to_json()), batch=5, cfg=other), until=refused("config_mismatch"))
    assert "different network" in service.feed.last_error and "width" in service.feed.last_error

    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    trainer(weights(buf.getvalue(), batch=6), until=refused("pickle"))
    assert "pickle" in service.feed.last_error and "safetensors" in service.feed.last_error

    trainer(weights(b"\x00" * 64, batch=7), until=refused("not_safetensors"))
    assert service.feed.refused == 3 and service.swapper.newest.batch == 1
    at = service.predictions
    wait_for(lambda: service.predictions > at + 10, 10, "stopped driving after a refusal")
    assert service.swapper.meta.batch == 1 and service.state()["weights_error"]


# ---------------------------------------------------------------------------------------------- sources


def test_remote_game_frames_in_actions_out(player, trainer, client_factory):
    mem = get_config("tiny_memory")  # reads history, speed and purpose: all from telemetry here
    trainer(weights(blob(1, 0.6, mem.to_json()), batch=1, cfg=mem, model="tiny_memory"))
    agent = client_factory("capture_agent").publisher("game")
    pad = client_factory("gamepad_agent").subscriber(["action.agent-1"], late_join=False)
    service = player(
        player={"source": "remote", "source_id": "agent-1", "deadzone_throttle": 0.1}, model_cfg=mem
    )
    wait_for(lambda: service.swapper.newest is not None, 20, "no weights")  # swapped in with the first frame
    rng = np.random.default_rng(1)
    got = []
    for k in range(400):  # a 320x180 capture (the model is 160x90): resized like the trainer's frames
        img = rng.integers(0, 255, (180, 320, 3), np.uint8)
        gf = GameFrame(
            "agent-1", k, k / 30, Frame.encode(img, "jpeg"), 8.0, (k * 0.3, 0.0, 0.0), 0.0, (0.1, 50.0)
        )
        agent.send("game.agent-1", gf)
        while (env := pad.recv(5)) is not None:
            got.append(env.msg)
        if len(got) >= 30:
            break
        time.sleep(0.01)
    assert len(got) >= 30, f"only {len(got)} actions"
    seqs = [a.seq for a in got]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    answered = [a.frame_seq for a in got]  # each action says which game frame it answers
    assert all(f is not None and 0 <= f < 400 for f in answered) and answered == sorted(set(answered))
    assert all(a.target == "agent-1" and -1 <= a.steering <= 1 and a.brake == 0.0 for a in got)
    assert got[-1].throttle == pytest.approx(0.1 + 0.9 * 0.6, abs=1e-3)  # 0.6 past a 0.1 dead zone
    rows = service.source.history.rows
    assert rows.shape == (30, 5) and tuple(rows[-1]) == pytest.approx(
        (got[-1].steering, 0.6, 8.0, 0.1, 50.0), abs=1e-3
    )
    assert service.predictions >= 30

    # the agent's Unstuck has the car (recovering): the player brakes and keeps no watch of its own
    def actions_for(recovering: bool, start: int) -> list:
        out = []
        for k in range(start, start + 200):
            img = rng.integers(0, 255, (180, 320, 3), np.uint8)
            gf = GameFrame(
                "agent-1", k, k / 30, Frame.encode(img, "jpeg"), 0.0, (0.0, 0.0, 0.0), 0.0, (0.1, 50.0)
            )
            gf.recovering = recovering
            agent.send("game.agent-1", gf)
            while (env := pad.recv(5)) is not None:
                out.append(env.msg)
            if sum(a.frame_seq is not None and a.frame_seq >= start + 5 for a in out) >= 10:
                return [a for a in out if a.frame_seq is not None and a.frame_seq >= start + 5]
            time.sleep(0.01)
        raise AssertionError(f"only {len(out)} actions while recovering={recovering}")

    held = actions_for(True, 1000)
    assert all(a.throttle == 0.0 and a.brake > 0.0 for a in held)
    assert service.source.unstuck.unstucks == 0
    assert any(a.throttle > 0.0 for a in actions_for(False, 2000))


def test_dagger_samples_are_labelled_by_the_npc_and_counted(player, trainer, client_factory):
    trainer(weights(blob(*W1), batch=1))
    balancer = client_factory("balancer").subscriber(["sample."], late_join=False)
    service = player(player={"dagger": True})
    samples = []
    deadline = time.monotonic() + 20
    while len(samples) < 20 and time.monotonic() < deadline:
        env = balancer.recv(100)
        if env is not None:
            samples.append(env)
    assert len(samples) >= 20
    env = samples[-1]
    s = env.msg
    assert env.topic == f"sample.{service.svc.instance}" and s.collector == service.svc.instance
    assert s.source == "dagger" and s.frame.shape == (TINY.height, TINY.width, 3)
    assert -1 <= s.steering <= 1 and -1 <= s.throttle_brake <= 1
    assert s.previous is not None and s.history is None  # tiny reads no history
    assert [e.msg.seq for e in samples] == sorted(e.msg.seq for e in samples)
    wait_for(lambda: service.dagger_samples >= 20, 2, "samples sent but not counted")
    assert service.predictions >= service.dagger_samples
    reg = service.svc.metrics.registry
    assert counter_value(reg, "charles_messages_total", {"direction": "out", "topic": "sample"}) >= 20


def test_dagger_skips_a_standing_car_the_expert_would_keep_standing(player, trainer, client_factory):
    """The NPC has no reverse: stopped, with "stand still firmly" as its label, it shows no way out, and
    such frames would teach the model to wait for Unstuck. They are counted, not published."""
    trainer(weights(blob(*W1), batch=1))
    balancer = client_factory("balancer").subscriber(["sample."], late_join=False)
    service = player(player={"dagger": True})
    real = service.source.expert
    service.source.expert = lambda: ((0.0, -1.0), (0.0, -1.0)) if real() is not None else None
    samples = []
    deadline = time.monotonic() + 20
    while (service.decider.skipped < 5 or len(samples) < 5) and time.monotonic() < deadline:
        env = balancer.recv(100)
        if env is not None:
            samples.append(env.msg)
    assert service.decider.skipped >= 5, "the car never stood (it starts at rest)"
    assert len(samples) >= 5, "the moving car's frames were not published"
    assert all(s.speed >= 0.5 for s in samples)  # every stand-still label published was a moving car's
    assert service.state()["dagger_skipped"] == service.decider.skipped


def test_remote_source_counts_game_frames_lost_on_the_way(client_factory):
    from charles.player.sources import RemoteSource
    from charles.proto import Envelope
    from charles.sections.player import PlayerConfig

    class Sub:  # what the bus delivered, two batches
        def __init__(self) -> None:
            self.batches: list[list] = []

        def drain(self, n: int) -> list:
            return self.batches.pop(0) if self.batches else []

        def recv(self, timeout_ms: int) -> None:
            return None

    img = Frame.encode(np.zeros((TINY.height, TINY.width, 3), np.uint8), "jpeg")

    def env(seq: int) -> Envelope:
        gf = GameFrame("agent-1", seq, seq / 30, img, 5.0, (seq * 0.2, 0.0, 0.0), 0.0, (0.1, 50.0))
        return Envelope("game.agent-1", "game_frame", "agent-1", 0.0, 0.0, gf, 0)

    svc = client_factory("player")
    sub = Sub()
    sub.batches = [[env(0), env(1), env(4)], [env(5), env(9)], [env(0)]]  # lost: 2-3, 6-8; then a restart
    src = RemoteSource(
        svc, PlayerConfig(source="remote", source_id="agent-1"), TINY, sub=sub, pub=svc.publisher("action")
    )
    views = [src.next(0.01) for _ in range(3)]
    assert [v.seq for v in views if v is not None] == [0, 1, 2]
    reg = svc.metrics.registry
    assert counter_value(reg, "charles_drops_total", {"cause": "game_frame_lost"}) == 5
    assert counter_value(reg, "charles_drops_total", {"cause": "stale_frame"}) == 3


@pytest.mark.parametrize("repaint", [False, True])
def test_player_repaints_its_car_at_each_unstuck_only_when_asked(repaint):
    from charles.drive.unstuck import UnstuckConfig
    from charles.player.sources import SimSource
    from charles.sections.player import PlayerConfig
    from charles.sim.config import SimConfig

    source = SimSource(
        PlayerConfig(realtime=False, repaint=repaint, seed=7),
        TINY,
        SimConfig(blocks=3, traffic=0),
        UnstuckConfig(window_s=1.0, min_distance_m=500.0, fade_out_s=0.1, settle_s=0.1, fade_in_s=0.1),
    )
    paints, hoods = [source.world.car_color], []
    while source.unstucks < 3:
        before = source.unstucks
        view = source.next()
        source.act(0.0, 0.5, None)
        if source.unstucks != before:
            paints.append(source.world.car_color)
        if view.unstuck.driving and len(hoods) < len(paints):
            hoods.append(view.frame[-2:].reshape(-1, 3).mean(0))
    if repaint:
        assert len(set(paints)) >= 3, "a new paint at each Unstuck"
        assert max(np.abs(a - b).max() for a, b in zip(hoods, hoods[1:], strict=False)) > 20
    else:
        assert set(paints) == {paints[0]}


# ---------------------------------------------------------------------------------------------- console


@pytest.mark.parametrize("per_output", [False, True], ids=["one_backbone", "two_backbones"])
def test_convcam_of_one_and_two_backbones(client_factory, per_output):
    from charles.model.convcam import convcam_image

    cfg = TINY.replace(backbone_per_output=per_output)
    predictor = Predictor(cfg, convcam=True)
    assert predictor.convcam() is None  # nothing predicted yet
    predictor.predict(np.full((cfg.height, cfg.width, 3), 120, np.uint8))
    painter = ConsolePainter(client_factory("player"))
    try:
        console = painter.paint({"model": "x"}, {"hood": np.zeros((90, 160, 3), np.uint8)}, predictor)
    finally:
        painter.close()
    maps = [m for m in predictor._tap.maps]
    assert len(maps) == (2 if per_output else 1)
    c, h, w = maps[0].shape[1:]
    expected = convcam_image(maps)
    assert c == 368 and (h, w) == (3, 5)  # regnetx_002's last feature map at 160x90
    assert console.images["convcam"].shape == expected.shape
    img = console.images["convcam"].decode()
    grey = np.abs(img[..., 0].astype(int) - img[..., 2].astype(int)).mean() < 3
    assert grey != per_output, "one backbone is grey, two are coloured"


def test_terminal_view_shows_raw_and_controller_side_by_side():
    text = terminal_view(
        {
            "model": "tiny_v1",
            "model_batch": 5,
            "raw": {"steering": 0.25, "throttle_brake": -0.5},
            "controls": {"steering": 0.4, "throttle": 0.0, "brake": 0.6},
            "fps": 30.0,
            "pps": 30.0,
            "swaps": 2,
            "unstucks": 1,
            "latency_ms": {"p50": 4.0, "p99": 6.0},
        }
    )
    assert "tiny_v1" in text and "30.0 pps" in text and "swaps 2" in text and "unstucks 1" in text
    row = next(line for line in text.splitlines() if line.startswith("steering"))
    assert "+0.250" in row and "+0.400" in row


def test_listed_player_metrics_are_what_the_player_exposes():
    from prometheus_client import CollectorRegistry
    from test_topology import _assert_listed_as_exposed, _exposed

    from charles import topology as t

    reg = CollectorRegistry()
    m = PlayerMetrics(reg)
    m.latency.observe(0.004)
    exposed = _exposed(reg)
    _assert_listed_as_exposed("player", exposed)
    listed = {n for x in t.METRICS.values() if x.owner == "player" for n in t.exposed_names(x)}
    assert set(exposed) == listed


def test_a_player_stopped_before_its_town_is_built_gives_the_build_up(client_factory):
    from charles.sim.town import BuildCancelled

    svc = client_factory("player", player={**PLAYER, "seed": 97531})  # a town no other test has cached
    svc.stop()  # what SIGTERM does; the player's main logs it and returns (exit 0)
    with pytest.raises(BuildCancelled):
        PlayerService(svc)


# ---------------------------------------------------------------------------------------------- process


def test_player_process_drives_serves_health_and_stops_promptly_on_sigterm(broker, trainer, tmp_path):
    """The player process takes the run's configuration from the broker: its own file names another model
    line, yet it drives the broker's (tiny), on the trainer's weights."""
    from conftest import free_ports

    _, data = broker
    trainer(weights(blob(*W1), batch=42))
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__PLAYER__THREADS": "1",
    }
    own = tmp_path / "player.yaml"
    own.write_text("model:\n  preset: model_0012_regnet\n")
    cmd = [
        sys.executable,
        "-m",
        "charles.player",
        "--config",
        str(own),
        "--seed",
        "3",
        "--id",
        "player-smoke",
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def get(path: str):
        with urllib.request.urlopen(url + path, timeout=1) as r:
            return json.load(r)

    def driving():
        if proc.poll() is not None:
            raise AssertionError(f"the player exited with {proc.returncode}: {proc.stdout.read().decode()}")
        try:
            return get("/state")["info"].get("model_batch") == 42 and get("/healthz")["status"] == "ok"
        except OSError:
            return False

    try:
        # a process that imports torch, builds a RegNet and a town: 22-39 s at load average 7 on two cores
        wait_for(driving, 90, "the player never drove on the broker's weights")
        with urllib.request.urlopen(url + "/metrics", timeout=1) as r:
            text = r.read().decode()
        assert "charles_player_predictions_total" in text and "charles_player_weights_batch 42.0" in text
        assert get("/state")["instance"] == "player-smoke"
        stop_by_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
