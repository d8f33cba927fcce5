"""The sim as a game process (charles.sim.agent): GameFrames out, Actions in, lockstep, a remote player.

Socket-free tests drive :class:`SimAgent` through injected inbox/outbox fakes (the action envelopes are
real, encoded and decoded); the others use real loopback sockets through the ``broker`` fixture, and the
last one runs the real entry point in a subprocess.
"""

from __future__ import annotations

import collections
import json
import math
import os
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from charles import config
from charles.proto import Action, GameFrame, Weights, decode, encode
from charles.runtime import Service
from charles.sim.agent import SimAgent, SimPad

from conftest import free_ports
from tests_support import counter_value, stop_by_sigterm, wait_for

GAME = "sim-t"
RUN = {"model": {"preset": "tiny"}, "sim": {"seed": 3, "traffic": 0}}
"""The tiny line's 160x90 input; no traffic, so nothing but our actions moves the car."""


class Inbox:
    """A subscriber stand-in: the envelopes queued here are what ``recv``/``drain`` give."""

    def __init__(self) -> None:
        self.q: collections.deque = collections.deque()

    def recv(self, timeout_ms: int = 100):
        if self.q:
            return self.q.popleft()
        time.sleep(timeout_ms / 1000)
        return None

    def drain(self, limit: int = 1000) -> list:
        out = []
        while self.q and len(out) < limit:
            out.append(self.q.popleft())
        return out


class Outbox:
    def __init__(self) -> None:
        self.sent: list[tuple[str, GameFrame]] = []

    def send(self, topic: str, msg) -> bool:
        self.sent.append((topic, msg))
        return True


def action(
    seq: int,
    steering: float = 0.0,
    throttle: float = 0.0,
    brake: float = 0.0,
    sender: str = "player-1",
    frame_seq: int | None = None,
):
    """An action as it arrives off the wire (encoded and validated like any other)."""
    return decode(encode(f"action.{GAME}", Action(seq, steering, throttle, brake, GAME, frame_seq), sender))


def make_agent(data: dict | None = None, **kw) -> tuple[SimAgent, Inbox, Outbox]:
    names = ["publish", "subscribe", "control"]
    d = {
        **RUN,
        "bus": {"host": "127.0.0.1", "ports": dict(zip(names, free_ports(3), strict=True))},
        **(data or {}),
    }
    cfg = config.load(data=d, environ={})
    svc = Service("sim_agent", cfg, instance=GAME, http=False, signals=False)
    inbox, outbox = Inbox(), Outbox()
    agent = SimAgent(svc, cfg, agent_id=GAME, sub=inbox, pub=outbox, **kw)
    return agent, inbox, outbox


@pytest.fixture
def agents():
    made = []

    def make(data: dict | None = None, **kw):
        agent, inbox, outbox = make_agent(data, **kw)
        made.append(agent)
        return agent, inbox, outbox

    yield make
    for a in made:
        a.close()
        a.svc.close()


# ---------------------------------------------------------------------------------------------- socket-free


def test_game_frames_carry_the_models_picture_and_the_cars_telemetry(agents):
    agent, inbox, outbox = agents(lockstep=True, timeout_s=0.01)
    for k in range(3):
        inbox.q.append(action(k))
        agent.tick()
    assert [t for t, _ in outbox.sent] == [f"game.{GAME}"] * 3
    frames = [gf for _, gf in outbox.sent]
    assert [gf.seq for gf in frames] == [0, 1, 2] and all(gf.source == GAME for gf in frames)
    gf = frames[-1]
    assert gf.frame.codec == "jpeg" and gf.frame.shape == (
        90,
        160,
        3,
    )  # the collectors' codec, the model's size
    img = gf.frame.decode()
    assert img.shape == (90, 160, 3) and img.std() > 5  # a picture, not a blank
    p = agent.world.player
    assert gf.position == pytest.approx((p.x, p.y, 0.0)) and -math.pi <= gf.heading < math.pi
    assert gf.game_time == pytest.approx(2 / 30) and 0.0 <= gf.speed <= 200.0
    assert -math.pi <= gf.purpose[0] < math.pi and gf.purpose[1] > 0
    assert frames[0].controls is None and gf.controls == (0.0, 0.0)  # what the car got on the step before
    again = decode(encode(f"game.{GAME}", gf, GAME)).msg  # valid on the wire
    assert again.frame.shape == gf.frame.shape and again.seq == 2
    assert [f.recovering for f in frames] == [False] * 3 and again.recovering is False
    agent.session.unstuck.trigger()  # Unstuck takes the car: the frames say so
    inbox.q.append(action(3))
    agent.tick()
    assert outbox.sent[-1][1].recovering is True


def test_actions_drive_the_car_as_the_gamepad_agent_applies_them(agents):
    agent, inbox, outbox = agents(lockstep=True, timeout_s=0.01)
    x0, y0, h0 = agent.world.player.x, agent.world.player.y, agent.world.player.heading
    for k in range(45):  # 1.5 s: full throttle, stick hard left
        inbox.q.append(action(k, steering=-1.0, throttle=1.0))
        agent.tick()
    p = agent.world.player
    assert agent.world.speed > 3.0 and math.hypot(p.x - x0, p.y - y0) > 2.0
    assert math.remainder(p.heading - h0, 2 * math.pi) > 0.2  # left is counter-clockwise
    assert outbox.sent[-1][1].controls == (-1.0, 1.0)  # throttle - brake = the combined pedal
    assert agent.actions == 45 and agent.timeouts == 0 and len(agent.latencies) == 45
    fast = agent.world.speed
    for k in range(45, 75):  # brake
        inbox.q.append(action(k, throttle=0.0, brake=1.0))
        agent.tick()
    assert agent.world.speed < fast / 2
    assert agent.pad.action == (0.0, -1.0)
    inbox.q.append(action(5, throttle=1.0))  # an old seq from the same sender: stale, dropped
    agent.tick()
    assert agent.pad.action == (0.0, -1.0) and agent.actions == 75
    assert counter_value(agent.svc.metrics.registry, "charles_drops_total", {"cause": "stale_seq"}) == 1


def test_only_allowed_players_drive_when_named(agents):
    agent, inbox, _ = agents(lockstep=True, timeout_s=0.01, allowed_senders=["player-1"])
    inbox.q.append(action(0, throttle=1.0, sender="intruder"))
    agent.tick()
    assert agent.actions == 0 and agent.pad.action == (0.0, 0.0) and agent.timeouts == 1
    inbox.q.append(action(0, throttle=1.0, sender="player-1"))
    agent.tick()
    assert agent.actions == 1 and agent.pad.action == (0.0, 1.0)


def test_lockstep_waits_for_the_action_then_gives_the_frame_up(agents):
    agent, inbox, outbox = agents(lockstep=True, timeout_s=0.25)
    t0 = time.monotonic()
    agent.tick()  # nobody answers
    assert time.monotonic() - t0 >= 0.24 and agent.timeouts == 1 and agent.actions == 0
    assert (
        counter_value(agent.svc.metrics.registry, "charles_drops_total", {"cause": "lockstep_timeout"}) == 1
    )
    t0 = time.monotonic()
    for k in range(10):  # answered at once: no waiting
        inbox.q.append(action(k))
        agent.tick()
    assert time.monotonic() - t0 < 0.25 * 5 and agent.timeouts == 1 and agent.actions == 10
    assert len(outbox.sent) == 11


def test_inflight_keeps_two_frames_out_and_pairs_each_action_with_its_frame(agents):
    agent, inbox, outbox = agents(lockstep=True, timeout_s=0.3, inflight=2)
    t0 = time.monotonic()
    agent.tick()  # frame 0 out: one unanswered, below the window: no wait
    assert time.monotonic() - t0 < 0.2 and list(agent.unanswered) == [0] and agent.timeouts == 0
    agent.tick()  # frame 1 out: two unanswered, so it waits, then gives the oldest (0) up
    assert agent.timeouts == 1 and list(agent.unanswered) == [1]
    # an answer to frame 2 skips 1 (the player takes the newest frame it has): both answered
    inbox.q.append(action(0, throttle=1.0, frame_seq=2))
    agent.tick()  # frame 2 out, [1, 2] -> the answer -> []
    assert agent.actions == 1 and not agent.unanswered and len(agent.latencies) == 1
    t0 = time.monotonic()
    agent.tick()  # frame 3 out: below the window again, no wait
    assert time.monotonic() - t0 < 0.2 and list(agent.unanswered) == [3] and agent.timeouts == 1
    # an answer to the older of two frames out: paired with that one, the newer stays out
    inbox.q.append(action(1, frame_seq=3))
    agent.tick()  # frame 4 out, [3, 4] -> [4]
    assert agent.actions == 2 and list(agent.unanswered) == [4]
    # an action that does not say which frame answers the newest (the old lockstep rule)
    inbox.q.append(action(2))
    agent.tick()  # frame 5 out, [4, 5] -> []
    assert agent.actions == 3 and not agent.unanswered and len(agent.latencies) == 3
    assert [gf.seq for _, gf in outbox.sent] == [0, 1, 2, 3, 4, 5] and agent.timeouts == 1


def test_ahead_draws_the_next_frame_before_the_action_lands(agents):
    strict, s_in, s_out = agents(lockstep=True, timeout_s=0.01)
    ahead, a_in, a_out = agents(lockstep=True, timeout_s=0.01, ahead=True)
    for agent, inbox in ((strict, s_in), (ahead, a_in)):
        for k in range(4):
            inbox.q.append(action(k, throttle=0.25 * (k + 1)))
            agent.tick()
    strict_controls = [gf.controls for _, gf in s_out.sent]
    ahead_controls = [gf.controls for _, gf in a_out.sent]
    assert strict_controls == [None, (0.0, 0.25), (0.0, 0.5), (0.0, 0.75)]
    assert ahead_controls == [None, (0.0, 0.0), (0.0, 0.25), (0.0, 0.5)]  # one step later
    assert (
        [gf.seq for _, gf in a_out.sent] == [0, 1, 2, 3] and ahead._held is not None and ahead._held.seq == 4
    )


def test_paced_at_the_wall_clock(agents):
    agent, _, outbox = agents(fps=50.0)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 0.5:
        agent.tick()
    elapsed = time.monotonic() - t0
    assert 5 <= len(outbox.sent) <= 50 * elapsed + 2  # never faster than paced (a loaded box may be slower)


def test_the_pad_combines_the_triggers():
    pad = SimPad()
    pad.apply(0.5, 0.25, 0.75)
    assert pad.action == (0.5, -0.5)
    pad.release()
    assert pad.action == (0.0, 0.0)


# ---------------------------------------------------------------------------------------------- sockets


def run_in_thread(agent: SimAgent) -> threading.Thread:
    t = threading.Thread(target=agent.run, daemon=True)
    t.start()
    return t


def test_lockstep_on_the_bus_one_frame_per_answer(broker, client_factory):
    _, data = broker
    game = client_factory("player").subscriber([f"game.{GAME}"], late_join=False)
    pad = client_factory("player").publisher("action")
    svc = client_factory("sim_agent", **RUN)
    agent = SimAgent(svc, svc.cfg, agent_id=GAME, lockstep=True, timeout_s=1.0)
    t = run_in_thread(agent)
    try:
        first = game.recv(5000)  # frame 0, or 1 a timeout later should our subscription have been late for it
        assert first is not None and first.msg.frame.shape == (90, 160, 3)
        time.sleep(0.3)
        assert game.drain() == []  # no answer yet: no next frame
        got, seq = [first], 0
        deadline = time.monotonic() + 10
        while len(got) < 40 and time.monotonic() < deadline:  # answer every frame at once
            pad.send(f"action.{GAME}", Action(seq, 0.0, 0.5, 0.0, GAME))
            seq += 1
            env = game.recv(1000)
            if env is not None:
                got.append(env)
        seqs = [e.msg.seq for e in got]
        assert len(got) >= 40 and seqs == list(range(seqs[0], seqs[0] + len(seqs)))
        wait_for(lambda: agent.actions >= 30, 3, "actions not applied")
        assert len(agent.latencies) >= 30 and max(agent.latencies) < 1.0
        assert agent.world.speed > 0.5  # half throttle
    finally:
        svc.stop()
        t.join(5)
    assert not t.is_alive()


def test_a_remote_player_drives_the_sim_agent(broker, client_factory):
    """The player with ``source: remote`` against the sim agent, exactly as against a capture agent."""
    import torch

    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights
    from charles.player.service import PlayerService

    torch.set_num_threads(1)
    b, _ = broker
    cfg = get_config("tiny")
    torch.manual_seed(0)
    model = build_model(cfg)
    with torch.no_grad():  # always asks for throttle 0.6 and steers a little: a car that goes
        model.heads["throttle_brake"].out.weight.zero_()
        model.heads["throttle_brake"].out.bias.fill_(0.6)
        model.heads["steering"].out.weight.mul_(0.1)
        model.heads["steering"].out.bias.zero_()
    w = Weights("tiny", "tiny_v1", 7, cfg.to_dict(), save_weights(model, cfg, half=True), time.time())
    trainer = client_factory("trainer").publisher("weights")

    def held() -> bool:
        trainer.send("weights.tiny", w)
        return "weights.tiny" in b.lvc.items

    wait_for(held, 10, "the broker never held the weights", interval=0.2)
    player_svc = client_factory(
        "player",
        model={"preset": "tiny"},
        player={"source": "remote", "source_id": GAME, "threads": 1, "console_hz": 0, "terminal": False},
    )
    player = PlayerService(player_svc)
    agent_svc = client_factory("sim_agent", **RUN)
    agent = SimAgent(agent_svc, agent_svc.cfg, agent_id=GAME, lockstep=True, timeout_s=0.5)
    threads = [threading.Thread(target=player.run, daemon=True), run_in_thread(agent)]
    threads[0].start()
    x0, y0 = agent.world.player.x, agent.world.player.y
    try:
        wait_for(
            lambda: player.predictions >= 60 and agent.actions >= 60,
            30,
            "the player never drove the sim agent",
        )
        assert player.swapper.meta.batch == 7 and player.source.name == f"remote-{GAME}"
        assert agent.gamepad.driver == player_svc.instance
        p = agent.world.player
        assert math.hypot(p.x - x0, p.y - y0) > 1.0  # the model's throttle moved the car
        assert agent.pad.throttle == pytest.approx(0.6, abs=1e-3) and agent.pad.brake == 0.0
        assert player.recent[-1].predicted
        # lockstep never leaves the player two frames to choose from, unless a frame timed out meanwhile
        stale = counter_value(player_svc.metrics.registry, "charles_drops_total", {"cause": "stale_frame"})
        assert stale <= agent.timeouts
    finally:
        agent_svc.stop()
        player_svc.stop()
        for t in threads:
            t.join(5)


# ---------------------------------------------------------------------------------------------- process


def test_sim_agent_process_serves_health_and_stops_promptly_on_sigterm(broker):
    _, data = broker
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
    }
    env.pop("CHARLES_CONFIG", None)
    cmd = [sys.executable, "-m", "charles.sim.agent", "--id", "sim-smoke", "--seed", "3", "--set", "model.preset=tiny",
           "--lockstep", "--timeout", "0.05"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def state() -> dict:
        with urllib.request.urlopen(url + "/state", timeout=1) as r:
            return json.load(r)

    def publishing() -> bool:
        if proc.poll() is not None:
            raise AssertionError(
                f"the sim agent exited with {proc.returncode}: {proc.stdout.read().decode()}"
            )
        try:
            s = state()
        except OSError:
            return False
        return s["healthy"] and s["info"].get("frames", 0) > 3

    try:
        wait_for(publishing, 40, "the sim agent never published")
        s = state()
        assert (
            s["instance"] == "sim-smoke" and s["service"] == "sim_agent" and "lockstep" in s["info"]["mode"]
        )
        with urllib.request.urlopen(url + "/metrics", timeout=1) as r:
            text = r.read().decode()
        assert (
            'charles_agent_sent_total{kind="game"}' in text and "charles_agent_action_latency_seconds" in text
        )
        stop_by_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
