"""The collector's socket-free parts: sources, the sample builder and encoder (charles.drive), the sender queue."""

from __future__ import annotations

import math
import random
import threading
import time

import numpy as np
import pytest

from charles.collector.sender import Sender
from charles.collector.sources import (
    WEATHER_MIX,
    GameSource,
    GymSource,
    SimSource,
    draw_sky,
    replica_seed,
    seeded_look,
)
from charles.drive.frames import as_trainer_sees, fit_frame
from charles.drive.past import FrameStack
from charles.drive.samples import Capture, Encoder, SampleBuilder
from charles.drive.shape import InputShape
from charles.drive.unstuck import UnstuckConfig
from charles.proto import Envelope, Frame, GameFrame
from charles.sim.config import NpcConfig, SimConfig

W, H = 96, 54
SMALL = SimConfig(blocks=3, traffic=1)  # a small town builds in a fraction of a second


def cap(t: int, label=(0.1, 0.2), executed=None, driving=True, image=None, reset=False) -> Capture:
    img = np.full((H, W, 3), t % 256, np.uint8) if image is None else image
    return Capture(t / 30, img, label, executed or label, 5.0 + t, (0.1, 100.0 - t), driving, reset=reset)


# ---------------------------------------------------------------------------------------------- history


def test_history_is_the_sims_own_record_and_never_holds_the_current_tick():
    """Against the DriveSession's own history: the rows before each tick, executed actions, no current label."""
    src = SimSource(
        seed=3,
        width=W,
        height=H,
        sim=SMALL,
        npc=NpcConfig(noise_rate_hz=3.0),  # frequent noise: labels and executed actions differ often
        unstuck=UnstuckConfig(window_s=3.0, min_distance_m=500.0),  # an Unstuck inside the run
        history_len=60,
    )
    builder = SampleBuilder(InputShape(W, H, history_rows=60))
    emitted = skipped = noisy = 0
    prev_executed = None
    for _ in range(240):
        record = src.session.history.copy()  # the sim's record of the ticks before this one
        c = src.next()
        p = builder.push(c)
        if p is None:
            assert not c.driving, "a driving tick must be emitted"
            skipped += 1
        else:
            emitted += 1
            np.testing.assert_allclose(p.history, record, atol=1e-5)
            now_row = np.array([*c.executed, c.speed, *c.purpose], np.float32)
            assert not np.any(np.all(np.isclose(p.history, now_row, atol=1e-6), axis=1)), (
                "history holds this tick"
            )
            if prev_executed is not None:
                assert p.previous == pytest.approx(prev_executed)
                np.testing.assert_allclose(p.history[-1, :2], prev_executed, atol=1e-6)
            assert p.label == pytest.approx(c.label)
            noisy += c.label != c.executed
        prev_executed = c.executed
    assert src.unstucks >= 1 and skipped > 0, "Unstuck fired and its fading ticks were not emitted"
    assert emitted > 150 and noisy > 10


def test_stack_takes_past_frames_stride_apart_and_waits_until_full():
    builder = SampleBuilder(InputShape(W, H, frames=3, frame_stride=2, history_rows=4))
    out = [builder.push(cap(t)) for t in range(8)]
    assert out[:4] == [None] * 4, "no sample before 4 past ticks exist"
    p = out[6]
    assert [t for t, _ in p.stack] == [2, 4] and p.tick == 6
    assert [int(img[0, 0, 0]) for _, img in p.stack] == [2, 4]
    assert [s.seq for s in out if s is not None] == [0, 1, 2, 3]
    builder.push(cap(8, reset=True))  # a new episode: the stack refills first
    assert builder.push(cap(9)) is None and builder.history.rows[:-2].sum() == 0


def test_frame_stack_pads_with_the_oldest_it_has():
    fs = FrameStack(3, 1)
    assert fs.past() == []
    fs.push(0, "a")
    assert fs.past() == [(0, "a"), (0, "a")] and not fs.full
    fs.push(1, "b")
    assert fs.past() == [(0, "a"), (1, "b")] and fs.full


def test_labels_and_telemetry_are_clamped_to_the_wires_ranges():
    p = SampleBuilder(InputShape(W, H, history_rows=0)).push(
        Capture(0.0, np.zeros((H, W, 3), np.uint8), (1.5, -3.0), (0.0, 0.0), -2.0, (7.0, -1.0))
    )
    assert p.label == (1.0, -1.0) and p.speed == 0.0 and p.history is None
    assert -np.pi <= p.purpose[0] < np.pi and p.purpose[1] == 0.0


# ---------------------------------------------------------------------------------------------- frames


def test_fit_and_the_trainers_view():
    img = np.random.default_rng(0).integers(0, 256, (270, 480, 3), dtype=np.uint8)
    assert fit_frame(img, 160, 90).shape == (90, 160, 3)
    assert fit_frame(img, 480, 270) is img
    seen = as_trainer_sees(img, 160, 90, "jpeg", 90)
    assert seen.shape == (90, 160, 3) and seen.dtype == np.uint8
    np.testing.assert_array_equal(as_trainer_sees(img, 160, 90, "png"), fit_frame(img, 160, 90))


def test_encoder_fits_encodes_each_stacked_frame_once_and_passes_matching_frames_through():
    shape = InputShape(W, H, frames=3, frame_stride=1, history_rows=8)
    enc = Encoder("c1", shape, "jpeg", 90)
    builder = SampleBuilder(shape)
    big = [cap(t, image=np.full((2 * H, 2 * W, 3), 10 * t, np.uint8)) for t in range(6)]
    samples = [enc.sample(p) for c in big if (p := builder.push(c)) is not None]
    assert [s.seq for s in samples] == [0, 1, 2, 3]
    assert all(s.frame.shape == (H, W, 3) and len(s.stack) == 2 for s in samples)
    assert samples[1].stack[1] is samples[0].frame, "the previous frame is reused, not encoded again"
    assert len(enc._cache) <= shape.span + 1
    ready = Frame.encode(np.zeros((H, W, 3), np.uint8), "jpeg")
    assert enc.frame(ready) is ready
    other = enc.frame(Frame.encode(np.zeros((2 * H, 2 * W, 3), np.uint8), "png"))
    assert other.shape == (H, W, 3) and other.codec == "jpeg"


def test_sender_never_blocks_and_counts_what_a_full_queue_drops():
    gate = threading.Event()
    sent = []

    def publish(sample):
        gate.wait(5)  # a bus that does not take anything yet
        sent.append(sample.seq)
        return True

    drops = []
    shape = InputShape(W, H, history_rows=0)
    sender = Sender(Encoder("c1", shape), publish, maxsize=2, on_drop=lambda: drops.append(1))
    sender.start()
    builder = SampleBuilder(shape)
    t0 = time.perf_counter()
    accepted = [sender.offer(builder.push(cap(t))) for t in range(10)]
    assert time.perf_counter() - t0 < 0.5, "offer never waits on the bus"
    assert accepted.count(False) == len(drops) == sender.dropped >= 6
    gate.set()
    assert sender.close(2.0) == 0
    assert sent == sorted(sent) and len(sent) == accepted.count(True)


# ---------------------------------------------------------------------------------------------- sources


def test_replicas_get_their_own_seed_and_look():
    assert replica_seed("collector-a") != replica_seed("collector-b")
    assert replica_seed("collector-a") == replica_seed("collector-a")
    looks = {seeded_look(s)["weather"] for s in range(40)}
    assert len(looks) >= 3


def test_look_vary_draws_a_new_sky_at_every_restart_nights_included():
    from charles.sim.config import SimConfig

    src = SimSource(7, 64, 36, SimConfig(blocks=3, traffic=0), look="vary", restart_s=1.0, repaint=True)
    assert (src.info()["weather"], src.info()["hour"]) == ("clear", 13.0), "it starts as configured"
    skies = set()
    for _ in range(30 * 8):  # 8 game seconds: 7 restarts
        src.next()
        skies.add((src.info()["weather"], src.info()["hour"]))
    assert src.restarts >= 7 and src.skies >= src.restarts
    assert len(skies) >= 7, skies
    frame = src.world.hood_frame()
    assert frame.shape == (36, 64, 3)
    src.close()
    # over many draws, every weather and the night (before 5:30 or after 21:30) come up
    rng = random.Random(1)
    draws = [draw_sky(rng) for _ in range(400)]
    assert {d["weather"] for d in draws} == set(WEATHER_MIX)
    night = sum(d["time_of_day"] < 5.5 or d["time_of_day"] > 21.5 for d in draws) / len(draws)
    assert 0.25 < night < 0.45, night


class FakeSub:
    def __init__(self, msgs):
        self.msgs = list(msgs)

    def recv(self, timeout_ms):
        return (
            Envelope("game.agent-1", "game_frame", "agent-1", 0.0, 0.0, self.msgs.pop(0), 0)
            if self.msgs
            else None
        )


def game_frame(seq: int, t: float, controls=(0.25, -0.5), **kw) -> GameFrame:
    img = Frame.encode(np.full((H, W, 3), seq, np.uint8), "jpeg")
    return GameFrame(
        "agent-1", seq, t, img, kw.pop("speed", 12.0), purpose=(0.3, 80.0), controls=controls, **kw
    )


def test_game_source_labels_with_controls_rejects_unlabelled_and_keeps_30_hz():
    rejects = []
    frames = [
        game_frame(0, 100.0),
        game_frame(1, 100.01),
        game_frame(2, 100.0 + 1 / 30),
        game_frame(3, 100.1, None),
    ]
    src = GameSource("agent-1", FakeSub(frames), lambda reason, detail: rejects.append(reason))
    caps = [src.next(0.01) for _ in range(5)]
    assert caps[0].label == caps[0].executed == (0.25, -0.5) and caps[0].game_time == 0.0
    assert caps[1] is None and src.skipped == 1, "a frame closer than 1/30 s of game time is skipped"
    assert (
        caps[2].game_time == pytest.approx(1 / 30)
        and caps[2].speed == 12.0
        and caps[2].purpose == (0.3, 80.0)
    )
    assert caps[3] is None and rejects == ["no_controls"]
    assert caps[4] is None


def test_game_source_labels_a_frame_someone_else_drove_with_what_the_autopilot_wanted():
    """A capture agent with capture.dagger: the player's model drove (controls), the autopilot said what it
    wanted (expert): the label is the autopilot's, the history keeps what the car got."""
    frames = [game_frame(0, 5.0, (0.9, 1.0), expert=(-0.2, 0.4)), game_frame(1, 5.0 + 1 / 30, (0.9, 1.0))]
    caps = drain(GameSource("agent-1", FakeSub(frames)), 2)
    assert caps[0].label == (-0.2, 0.4) and caps[0].executed == (0.9, 1.0)
    assert caps[1].label == caps[1].executed == (0.9, 1.0)  # no expert: the driver's controls, as before


def test_game_source_counts_frames_lost_on_the_way_but_not_an_agent_restart():
    dropped = []
    seqs = [0, 1, 2, 5, 6, 10, 0, 1, 3]  # 3, 4 and 7-9 lost; then the agent restarts (0) and 2 is lost
    frames = [game_frame(q, 10 + i / 30) for i, q in enumerate(seqs)]
    src = GameSource("agent-1", FakeSub(frames), drop=lambda cause, n: dropped.append((cause, n)))
    caps = drain(src, len(frames))
    assert len(caps) == len(frames), "every frame that arrived is a capture"
    assert dropped == [("game_frame_lost", 2), ("game_frame_lost", 3), ("game_frame_lost", 1)]
    assert src.gaps.missing == 6 and src.info()["lost"] == 6


def drain(src: GameSource, n: int) -> list[Capture]:
    return [c for _ in range(n) if (c := src.next(0.01)) is not None]


def test_game_source_takes_no_sample_of_the_agents_recovery_and_counts_each_once():
    # 60 fps with the odd frames a little early: they fall between two 30 Hz ticks and are skipped; the
    # second recovery starts on such a frame (31), and the capture after it says so
    marks = [False] * 6 + [True] * 12 + [False] * 13 + [True] * 6 + [False] * 3
    frames = [game_frame(i, 10 + i / 60 - 0.004 * (i % 2), recovering=m) for i, m in enumerate(marks)]
    frames[10] = game_frame(10, 10 + 10 / 60, None, recovering=True)  # no label needed while recovering
    src = GameSource("agent-1", FakeSub(frames), lambda reason, detail: pytest.fail(reason))
    caps = drain(src, len(frames))
    ticked = [round(c.game_time * 60) for c in caps]
    assert ticked == list(range(0, 40, 2)) and src.skipped == 20
    assert [c.driving for c in caps] == [not marks[i] for i in ticked]
    starts = [i for i, c in zip(ticked, caps, strict=True) if c.unstuck]
    assert starts == [6, 32], "once per recovery, at its first tick"
    assert src.unstucks == 2 and src.info()["unstucks"] == 2
    for c in caps:
        if not c.driving:
            assert c.executed == c.label == (0.0, -1.0) and c.distance_m == 0.0 and c.image is not None
    builder = SampleBuilder(InputShape(W, H, history_rows=4))
    samples = [p for c in caps if (p := builder.push(c)) is not None]
    assert len(samples) == sum(c.driving for c in caps), "recovery frames are not training samples"


def test_game_source_runs_the_shared_unstuck_when_the_sender_does_not_say():
    cfg = UnstuckConfig(window_s=1.0, min_distance_m=2.0, fade_out_s=0.2, settle_s=0.2, fade_in_s=0.2)
    parked = [game_frame(i, i / 30, position=(5.0, 5.0, 0.0)) for i in range(75)]
    src = GameSource("agent-1", FakeSub(parked), unstuck=cfg)
    caps = drain(src, 75)
    idle = [i for i, c in enumerate(caps) if not c.driving]
    assert idle[0] == 30, "stuck after 1 s without moving 2 m"
    assert idle == list(range(30, 30 + len(idle))) and 17 <= len(idle) <= 21, "0.6 s of recovery"
    assert src.unstucks == 1 and sum(c.unstuck for c in caps) == 1
    # no position: the speed is the odometer; a moving car is never stuck
    rolling = [game_frame(i, i / 30, speed=3.0) for i in range(90)]
    src = GameSource("agent-1", FakeSub(rolling), unstuck=cfg)
    assert all(c.driving for c in drain(src, 90)) and src.unstucks == 0
    stopped = [game_frame(i, i / 30, speed=0.0) for i in range(45)]
    src = GameSource("agent-1", FakeSub(stopped), unstuck=cfg)
    assert not drain(src, 45)[-1].driving and src.unstucks == 1


def test_game_source_takes_the_agents_word_over_its_own_watch():
    # an agent saying "not recovering" about a parked car is believed: its Unstuck is the one that acts
    parked = [game_frame(i, i / 30, position=(5.0, 5.0, 0.0), recovering=False) for i in range(90)]
    cfg = UnstuckConfig(window_s=1.0, min_distance_m=2.0)
    src = GameSource("agent-1", FakeSub(parked), unstuck=cfg)
    assert all(c.driving for c in drain(src, 90)) and src.unstucks == 0


def test_gym_source_drives_the_env_with_the_expert():
    src = GymSource(
        "Charles/Drive-v0", "charles.sim.gym_env:npc_expert", seed=1, env_kwargs={"max_steps": 40}
    )
    try:
        builder = SampleBuilder(InputShape(160, 90, history_rows=10))
        caps = [src.next() for _ in range(60)]
        samples = [p for c in caps if (p := builder.push(c)) is not None]
    finally:
        src.close()
    assert len(samples) == 60 and src.episodes == 2
    assert caps[0].reset and caps[40].reset and not caps[1].reset
    assert caps[0].image.shape == (54, 96, 3) and caps[0].image.dtype == np.uint8
    assert any(c.label[1] > 0 for c in caps) and all(c.label == c.executed for c in caps)
    assert samples[41].history[:-1].sum() == 0, "a new episode starts with an empty history"
    enc = Encoder("gym", InputShape(160, 90, history_rows=10)).sample(samples[5])
    assert enc.frame.shape == (90, 160, 3)


def test_restarts_put_the_car_at_rest_elsewhere_on_time_and_are_not_unstucks():
    src = SimSource(seed=4, width=W, height=H, sim=SMALL, restart_s=4.0)
    poses, speeds_after = [], []
    for _ in range(30 * 13):  # 13 s of game time: restarts at 4, 8 and 12 s
        before = src.restarts
        c = src.next()
        if src.restarts != before:
            poses.append((src.world.player.x, src.world.player.y))
            speeds_after.append(c.speed)
            assert c.driving, "a restart is a new start, driven at once (no fade like Unstuck's)"
    assert src.restarts == 3 and src.unstucks == 0
    assert speeds_after == [0.0, 0.0, 0.0], "every restart starts from standstill"
    assert len({(round(x), round(y)) for x, y in poses}) == 3, "each restart is somewhere else"
    assert src.info()["restarts"] == 3
    # the NPC drives off from each of them: the stream holds starts from standstill, labelled
    assert src.world.player.speed > 1.0


def _hood_rgb(img: np.ndarray) -> np.ndarray:
    """Mean colour of the hood: the bottom rows of the hood camera."""
    return img[-2:].reshape(-1, 3).mean(0)


def test_repaint_gives_the_car_a_new_paint_at_every_restart_and_unstuck_and_the_frames_show_it():
    unstuck = UnstuckConfig(window_s=2.0, min_distance_m=500.0)  # Unstucks inside the run too
    src = SimSource(4, W, H, SMALL, unstuck=unstuck, restart_s=5.0, repaint=True)
    paints, hoods = [src.world.car_color], []
    for _ in range(30 * 16):
        restarts, unstucks = src.restarts, src.unstucks
        c = src.next()
        if src.restarts != restarts or src.unstucks != unstucks:
            paints.append(src.world.car_color)
            if c.image is not None:
                hoods.append(_hood_rgb(c.image))
    assert src.restarts >= 2 and src.unstucks >= 1
    assert len(paints) == src.restarts + src.unstucks + 1
    assert len(set(paints)) >= len(paints) - 1, "a new paint (nearly always a different one) each time"
    assert src.world.player.color == src.world.car_color, "the car itself wears it, not only the record"
    assert max(np.abs(a - b).max() for a, b in zip(hoods, hoods[1:], strict=False)) > 20, (
        "the hood in the frames changes colour"
    )
    # the same seed paints the same sequence (a replica's stream is reproducible), another seed another
    runs = {}
    for seed in (4, 4, 5):
        other = SimSource(seed=seed, width=W, height=H, sim=SMALL, restart_s=1.0, repaint=True)
        seen = []
        for _ in range(30 * 6):
            other.next()
            if not seen or seen[-1] != other.world.car_color:
                seen.append(other.world.car_color)
        runs.setdefault(seed, []).append(seen)
    assert len(runs[4][0]) >= 5 and runs[4][0] == runs[4][1] and runs[5][0] != runs[4][0]


def test_without_repaint_the_car_keeps_its_paint():
    src = SimSource(seed=4, width=W, height=H, sim=SMALL, restart_s=2.0)
    paint = src.world.car_color
    for _ in range(30 * 7):
        src.next()
    assert src.restarts == 3 and src.world.car_color == paint


def test_turned_restarts_start_off_the_lane_and_the_npc_labels_a_way_out():
    src = SimSource(4, W, H, SMALL, restart_s=3.0, restart_turn_deg=70.0, restart_offset_m=2.0)
    town = src.world.town
    turns, labels, moved = [], [], []
    start = last = None
    for _ in range(30 * 3 * 12 + 10):  # 12 restarts, 3 s of driving after each
        before = src.restarts
        c = src.next()
        p = src.world.player
        if src.restarts != before:
            if start is not None:
                moved.append(math.hypot(last[0] - start[0], last[1] - start[1]))
            lane, idx, _ = town.nearest_lane(p.x, p.y)
            off = (p.heading - town.lanes[lane].headings[idx]) % math.pi  # either way along the street
            turns.append(min(off, math.pi - off))
            labels.append(c.label)
            start = (p.x, p.y)
        last = (p.x, p.y)
    assert src.restarts == 12 and src.unstucks == 0
    assert max(turns) > math.radians(30), "restarts start turned off the lane"
    assert all(tb > 0 for _, tb in labels), "from standstill the label drives off"
    assert np.mean([abs(st) for st, _ in labels]) > 0.2, "...and steers back towards the lane"
    assert np.mean([m > 5.0 for m in moved]) >= 0.8, "the NPC gets going from nearly all of them"
