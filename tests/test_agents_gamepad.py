"""The gamepad agent: clamping, the allow-list, stale seq, the dead-man switch, CURVE; only vgamepad is faked."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

from charles import config
from charles.agents import gamepad
from charles.proto import Action
from charles.proto.codec import Envelope
from charles.runtime import Service

from tests_support import counter_value, stop_by_sigterm, wait_for


class FakePad:
    """Where vgamepad would be: records what was applied and when everything was let go."""

    def __init__(self) -> None:
        self.applied: list[tuple[float, float, float]] = []
        self.releases: list[float] = []
        self.closed = False
        self.lock = threading.Lock()

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        with self.lock:
            self.applied.append((steering, throttle, brake))

    def release(self) -> None:
        with self.lock:
            self.releases.append(time.monotonic())

    def close(self) -> None:
        self.closed = True


def _settings(**kw) -> gamepad.GamepadSettings:
    base = {"id": "pad-1", "allowed_senders": ["player-1"], "deadman_s": 0.2, "require_secure": False}
    return config.from_dict(gamepad.GamepadSettings, {**base, **kw}, "gamepad")


def _env(a: Action, sender: str = "player-1", topic: str = "action.pad-1") -> Envelope:
    return Envelope(topic, "action", sender, 0.0, 0.0, a, 64)


@pytest.fixture
def offline():
    """A Service that never touches a socket: the agent's logic alone."""
    svc = Service("gamepad_agent", config.load(data={}, environ={}), "pad-1", http=False, signals=False)
    yield svc
    svc.close()


def test_every_value_is_clamped_before_it_reaches_the_pad(offline):
    pad = FakePad()
    agent = gamepad.GamepadAgent(offline, _settings(), pad)
    # the codec refuses out-of-range values on the wire; the agent clamps anyway (defence in depth)
    assert agent.handle(_env(Action(0, 3.0, 7.0, -2.0)), now=1.0)
    assert agent.handle(_env(Action(1, float("nan"), float("inf"), 0.5)), now=1.01)
    assert agent.handle(_env(Action(2, -1.5, 0.25, float("-inf"))), now=1.02)
    assert pad.applied == [(1.0, 1.0, 0.0), (0.0, 0.0, 0.5), (-1.0, 0.25, 0.0)]


def test_stale_and_out_of_order_seq_are_dropped_until_the_sender_resyncs(offline):
    pad = FakePad()
    agent = gamepad.GamepadAgent(offline, _settings(resync_s=1.0), pad)
    assert agent.handle(_env(Action(10, 0.1, 0.0, 0.0)), now=1.0)
    assert not agent.handle(_env(Action(9, 0.2, 0.0, 0.0)), now=1.05)  # late, older
    assert not agent.handle(_env(Action(10, 0.3, 0.0, 0.0)), now=1.06)  # duplicate
    assert agent.handle(_env(Action(12, 0.4, 0.0, 0.0)), now=1.07)  # a gap is fine
    assert counter_value(offline.metrics.registry, "charles_drops_total", {"cause": "stale_seq"}) == 2
    # a restarted player counts from 0 again: accepted once it has been silent for resync_s
    assert agent.handle(_env(Action(0, 0.5, 0.0, 0.0)), now=3.0)
    assert [v[0] for v in pad.applied] == [0.1, 0.4, 0.5]


def test_only_allowed_senders_and_the_right_target_drive(offline):
    pad = FakePad()
    agent = gamepad.GamepadAgent(offline, _settings(), pad)
    assert not agent.handle(_env(Action(0, 0.5, 1.0, 0.0), sender="intruder"), now=1.0)
    assert (
        counter_value(offline.metrics.registry, "charles_rejects_total", {"reason": "sender_not_allowed"})
        == 1
    )
    assert not agent.handle(_env(Action(1, 0.5, 1.0, 0.0, target="pad-2")), now=1.0)  # another agent's
    assert not agent.handle(
        _env(Action(2, 0.5, 1.0, 0.0), topic="action.pad-10"), now=1.0
    )  # a prefix look-alike
    assert agent.handle(_env(Action(3, 0.5, 1.0, 0.0, target="pad-1"), topic="action"), now=1.0)
    assert pad.applied == [(0.5, 1.0, 0.0)]
    other = Service("gamepad_agent", config.load(data={}, environ={}), "pad-1", http=False, signals=False)
    try:
        bc = gamepad.GamepadAgent(other, _settings(broadcast=True), FakePad())
        assert bc.prefixes == ["action"] and bc.handle(
            _env(Action(0, 0.1, 0.0, 0.0), topic="action.all"), now=1.0
        )
    finally:
        other.close()


def test_deadman_releases_when_actions_stop_and_shutdown_releases_too(offline):
    pad = FakePad()
    agent = gamepad.GamepadAgent(offline, _settings(deadman_s=0.2), pad)
    n0 = len(pad.releases)  # released once at start: a fresh pad holds nothing
    agent.handle(_env(Action(0, 0.3, 0.6, 0.0)), now=10.0)
    assert not agent.check_deadman(now=10.15)
    assert agent.check_deadman(now=10.25)
    assert not agent.check_deadman(now=10.5)  # once
    assert len(pad.releases) == n0 + 1
    assert counter_value(offline.metrics.registry, "charles_agent_releases_total", {"reason": "deadman"}) == 1


# ---------------------------------------------------------------------------------------------- on the bus


class Driving:
    """The agent's run loop on a thread against a broker."""

    def __init__(self, data: dict, s: gamepad.GamepadSettings, **bus):
        d = {**data, "bus": {**data["bus"], **bus}}
        self.svc = Service("gamepad_agent", config.load(data=d, environ={}), s.id, http=False, signals=False)
        self.pad = FakePad()
        self.agent = gamepad.GamepadAgent(self.svc, s, self.pad)
        self.thread = threading.Thread(target=self.agent.run, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.svc.stop()
        self.thread.join(timeout=3)
        self.agent.close()
        self.svc.close()


def _player(data: dict, instance: str, **bus) -> Service:
    d = {**data, "bus": {**data["bus"], **bus}}
    return Service("player", config.load(data=d, environ={}), instance, http=False, signals=False)


def _drive(pub, topic: str, seconds: float, until=None, start_seq: int = 0) -> int:
    """Publish 50 Hz actions for a while (or until a condition holds): the slow-joiner rule applies."""
    seq = start_seq
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pub.send(topic, Action(seq, 0.25, 0.5, 0.0))
        seq += 1
        if until is not None and until():
            break
        time.sleep(0.02)
    return seq


def test_actions_flow_through_the_broker_and_silence_trips_the_deadman(broker):
    _, data = broker
    run = Driving(data, _settings(deadman_s=0.2))
    player = _player(data, "player-1")
    intruder = _player(data, "intruder")
    try:
        pub = player.publisher("action")
        _drive(pub, "action.pad-1", 5, until=lambda: len(run.pad.applied) >= 5)
        assert run.pad.applied[-1] == (0.25, 0.5, 0.0)
        t_last = time.monotonic()
        releases = len(run.pad.releases)
        wait_for(lambda: len(run.pad.releases) > releases, 2, "the dead-man switch did not release")
        assert run.pad.releases[-1] - t_last >= 0.15
        assert (
            counter_value(run.svc.metrics.registry, "charles_agent_releases_total", {"reason": "deadman"})
            == 1
        )
        # an intruder on the same bus: rejected and counted, never applied
        n = len(run.pad.applied)
        ipub = intruder.publisher("action")
        _drive(
            ipub,
            "action.pad-1",
            5,
            until=lambda: (
                counter_value(
                    run.svc.metrics.registry, "charles_rejects_total", {"reason": "sender_not_allowed"}
                )
                >= 3
            ),
        )
        assert len(run.pad.applied) == n
    finally:
        run.stop()
        player.close()
        intruder.close()
    assert (
        counter_value(run.svc.metrics.registry, "charles_agent_releases_total", {"reason": "shutdown"}) == 1
    )
    assert run.pad.closed


@pytest.fixture
def secure_broker(tmp_path, bus_ports):
    """A broker with CURVE endpoints; keys for the gamepad agent and the player, and a rogue pair."""
    from charles.broker.broker import Broker
    from charles.tools import make_keys

    keys = tmp_path / "keys"
    make_keys(keys, ["gamepad-agent", "player"])
    rogue = tmp_path / "rogue"
    make_keys(rogue, ["player"])  # same name, a key the broker never allowed
    shutil.copy(keys / "broker.key", rogue / "broker.key")
    data = {
        "bus": {"host": "127.0.0.1", "ports": bus_ports, "keys_dir": str(keys)},
        "broker": {"secure": True, "secure_bind": "127.0.0.1"},
    }
    svc = Service("broker", config.load(data=data, environ={}), http=False, signals=False)
    b = Broker(svc, {"run": "secure-test"})
    b.start()
    t = threading.Thread(target=b.serve, daemon=True)
    t.start()
    yield b, {"bus": {"host": "127.0.0.1", "ports": bus_ports}}, keys, rogue
    svc.stop()
    t.join(3)
    b.close()
    svc.close()


def test_a_player_without_the_right_curve_key_cannot_reach_the_pad(secure_broker):
    b, data, keys, rogue = secure_broker
    secure = {"secure": True, "keys_dir": str(keys), "client_key": "gamepad-agent", "connect_timeout_s": 1.0}
    run = Driving(data, _settings(allowed_senders=["player-1"], require_secure=True), **secure)
    # claims an allowed id, but holds a key the broker does not know
    impostor = _player(data, "player-1", secure=True, keys_dir=str(rogue), client_key="player")
    player = _player(data, "player-1", secure=True, keys_dir=str(keys), client_key="player")
    try:
        _drive(impostor.publisher("action"), "action.pad-1", 0.6)
        assert run.pad.applied == []
        wait_for(
            lambda: (
                counter_value(
                    b.svc.metrics.registry, "charles_broker_auth_failures_total", {"event": "auth_refused"}
                )
                >= 1
            ),
            5,
            "refusal not counted",
        )
        _drive(player.publisher("action"), "action.pad-1", 5, until=lambda: len(run.pad.applied) >= 3)
        assert run.pad.applied[-1] == (0.25, 0.5, 0.0)
    finally:
        run.stop()
        impostor.close()
        player.close()


def test_entry_point_refuses_plain_bus_and_empty_allow_list_then_runs(broker):
    from conftest import free_ports

    _, data = broker
    env = {**os.environ, "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"])}
    cmd = [sys.executable, "-m", "charles.agents.gamepad", "--id", "pad-9"]
    r = subprocess.run([*cmd, "--allow", "player-1"], env=env, capture_output=True, text=True, timeout=20)
    assert r.returncode == 2 and "bus.secure is false" in r.stderr
    r = subprocess.run(
        [*cmd, "--set", "gamepad.require_secure=false"], env=env, capture_output=True, text=True, timeout=20
    )
    assert r.returncode == 2 and "allowed_senders is empty" in r.stderr

    (http_port,) = free_ports(1)
    env["CHARLES__SERVICE__HTTP_PORT"] = str(http_port)
    proc = subprocess.Popen(
        [*cmd, "--allow", "player-1", "--set", "gamepad.require_secure=false"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    player = _player(data, "player-1")
    try:

        def applied() -> bool:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=1) as r:
                    for line in r.read().decode().splitlines():
                        if line.startswith("charles_agent_actions_applied_total "):
                            return float(line.split()[1]) >= 3
            except OSError:
                pass
            return False

        # generous: a cold interpreter on a loaded 2-core box can take many seconds to start and connect
        _drive(player.publisher("action"), "action.pad-9", 45, until=applied)
        assert applied(), "the entry point applied no actions"
        out = stop_by_sigterm(proc)
        assert "no virtual pad on this system" in out and "released every input (shutdown)" in out
    finally:
        if proc.poll() is None:
            proc.kill()
        player.close()
