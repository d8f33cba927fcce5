"""End to end: who may drive the car. Player -> broker -> gamepad agent, with CURVE, bad weights and intruders.

Real processes: a broker with its CURVE endpoints, the player driving a remote game (``player.source:
remote``), and the gamepad agent (``python -m charles.agents.gamepad``, its pad a counting stand-in off
Windows) connected over CURVE. This test plays the two other parts: the capture agent (game frames over
CURVE at 30 Hz) and the trainer (weights on the plain in-cluster bus). It checks that

* the player's actions reach the pad through the broker's secure side, and the pad lets go of every input
  when the stream stops (the game went away, or the player died);
* weights that are not safetensors, are a pickle, hold NaN, or claim another model line or another
  network are refused by the player, counted by reason, and the car keeps being driven on the old ones;
* a client without an allowed CURVE key is refused (counted at the broker), receives nothing, and its
  actions reach nobody; a sender on the plain bus that is not on the agent's allow-list never drives.
"""

from __future__ import annotations

import io
import json
import shutil
import threading
import time

import numpy as np
import pytest
import torch

from charles import config
from charles.model.net import build_model
from charles.model.presets import get_config
from charles.model.weights import save_weights
from charles.proto import Action, Frame, GameFrame, Weights
from charles.runtime import Service
from charles.tools import make_keys

from conftest import free_ports, random_bus_ports
from survive_support import (
    kill9,
    overrides,
    rss_growth_within,
    rss_mb,
    running,
    scrape,
    service_env,
    start_service,
    stop,
    wait_for,
)
from tests_support import weights_message

pytestmark = [pytest.mark.slow, pytest.mark.system]

H, W = 36, 64
CFG = get_config("tiny", width=W, height=H)
PLAYER_ID, PAD_ID, GAME_ID = "player-e2e", "pad-1", "cap-1"


def weights(batch: int, payload: bytes, model: str = "tiny", cfg=CFG) -> Weights:
    return weights_message(payload, batch, cfg, model)


def model_bytes(cfg=CFG, poison: bool = False) -> bytes:
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():
        out = m.heads["throttle_brake"].out  # a car that always wants to go: actions with throttle
        out.weight.zero_()
        out.bias.fill_(0.5)
        if poison:
            next(m.parameters()).view(-1)[0] = float("nan")
    return save_weights(m, cfg, half=True)


def client(ports: dict, instance: str, keys=None, key: str = "") -> Service:
    bus = {"host": "127.0.0.1", "ports": ports, "connect_timeout_s": 2.0}
    if keys is not None:
        bus.update(secure=True, keys_dir=str(keys), client_key=key)
    data = {"bus": bus, "service": {"reject_log_period_s": 60}}
    return Service("test", config.load(data=data, environ={}), instance, http=False, signals=False)


class Game:
    """The capture agent's part: GameFrames of a moving car at 30 Hz over CURVE, while ``on`` is set."""

    def __init__(self, svc: Service):
        self.pub = svc.publisher("game")
        self.on = threading.Event()
        self.done = threading.Event()
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        frame = Frame.encode(np.full((H, W, 3), 90, np.uint8), "jpeg")
        while not self.done.wait(1 / 30):
            if self.on.is_set():
                x = self.sent * 0.3  # moving: Unstuck stays quiet
                self.pub.send(
                    f"game.{GAME_ID}",
                    GameFrame(GAME_ID, self.sent, self.sent / 30, frame, 9.0, (x, 0.0, 0.0), 0.0),
                )
                self.sent += 1

    def close(self) -> None:
        self.done.set()
        self.thread.join(2)


def test_only_the_player_drives_the_pad_and_bad_weights_never_do(tmp_path):
    keys, rogue = tmp_path / "keys", tmp_path / "rogue"
    make_keys(keys, ["pad-1:gamepad_agent", "capture-agent"])
    make_keys(rogue, ["capture-agent"])  # a real-looking key pair the broker never allowed
    shutil.copy(keys / "broker.key", rogue / "broker.key")
    ports = random_bus_ports()
    http = dict(zip(["broker", "player", "pad"], free_ports(3), strict=True))

    procs = {
        "broker": start_service(
            "charles.broker",
            overrides("broker.secure=true", "broker.secure_bind=127.0.0.1", f"bus.keys_dir={keys}"),
            service_env(ports, http["broker"]),
            tmp_path / "broker.log",
        ),
        "player": start_service(
            "charles.player",
            ["--preset", "tiny", "--id", PLAYER_ID]
            + overrides(
                "player.source=remote",
                f"player.source_id={GAME_ID}",
                f"player.target={PAD_ID}",
                "player.swap=immediate",
                "player.threads=1",
                "player.console_hz=0",
                "player.camera_hz=0",
                "player.terminal=false",
            ),
            service_env(
                ports, http["player"], CHARLES__MODEL__OVERRIDES=json.dumps({"width": W, "height": H})
            ),
            tmp_path / "player.log",
        ),
        "pad": start_service(
            "charles.agents.gamepad",
            ["--id", PAD_ID, "--allow", PLAYER_ID]
            + overrides(
                "bus.secure=true",
                f"bus.keys_dir={keys}",
                "bus.client_key=pad-1",
                "gamepad.deadman_s=0.3",
            ),
            service_env(ports, http["pad"]),
            tmp_path / "pad.log",
        ),
    }
    made: list[Service] = []

    def m(name: str):
        return scrape(http[name])

    def up(name: str) -> bool:
        assert procs[name].poll() is None, f"{name} exited: {(tmp_path / f'{name}.log').read_text()[-3000:]}"
        try:
            m(name)
            return True
        except OSError:
            return False

    try:
        for n in procs:
            wait_for(lambda n=n: up(n), 90, f"{n} never served /metrics")
        pids = {n: p.pid for n, p in procs.items()}
        trainer = client(ports, "trainer-e2e")
        game_svc = client(ports, "capture-agent", keys, "capture-agent")
        made += [trainer, game_svc]
        wpub = trainer.publisher("weights")
        game = Game(game_svc)

        def publish(w: Weights, until) -> None:
            # a message published before the subscription reached the publisher is lost: retry until seen
            wait_for(
                lambda: wpub.send(f"weights.{w.model}", w) and until(),
                30,
                f"weights batch {w.batch} never judged",
                0.3,
            )

        def rejects(reason: str) -> float:
            return m("player").value("charles_rejects_total", reason=reason)

        def applied() -> float:
            return m("pad").value("charles_agent_actions_applied_total")

        def released(reason: str) -> float:
            return m("pad").value("charles_agent_releases_total", reason=reason)

        # 1. the player drives the game on good weights; its actions reach the pad over CURVE
        game.on.set()  # weights swap in between two frames: frames first
        publish(weights(7, model_bytes()), lambda: m("player").value("charles_player_weights_batch") == 7)
        wait_for(lambda: applied() >= 10, 60, "no action of the player reached the pad")
        rss0 = {n: rss_mb(pid) for n, pid in pids.items()}  # warmed up: the player drives the pad
        pad_now = m("pad")
        assert pad_now.value("charles_agent_pad_value", input="throttle") > 0, "the car was not asked to go"

        # 2. bad weights, each refused by its reason while the car keeps being driven on batch 7
        buf = io.BytesIO()
        torch.save({"w": torch.zeros(3)}, buf)
        other_net = CFG.replace(width=128)
        bad = {
            "not_safetensors": weights(8, b"\x00" * 4096),
            "pickle": weights(9, buf.getvalue()),
            "non_finite": weights(10, model_bytes(poison=True)),
            # sent on weights.tiny, but for another model line
            "wrong_model": weights(11, model_bytes(), model="tiny_memory"),
            # says tiny and our network; the file inside holds another network
            "config_mismatch": weights(12, model_bytes(other_net)),
        }
        for reason, w in bad.items():
            before = rejects(reason)
            wait_for(
                lambda w=w, before=before, reason=reason: wpub.send("weights.tiny", w) and rejects(reason) > before,
                30, f"weights refused for {reason} were not counted", 0.3,
            )  # fmt: skip
        s = m("player")
        assert s.value("charles_player_weights_batch") == 7, "the player swapped in refused weights"
        preds, acts = s.value("charles_player_predictions_total"), applied()
        wait_for(lambda: m("player").value("charles_player_predictions_total") > preds + 10 and applied() > acts + 10, 30,
                 "the car stopped being driven after the refusals")  # fmt: skip

        # 3. the game stops sending: no frames, no actions, and the pad lets go of everything
        # (a loaded box can stall the player past the 0.3 s dead-man earlier on: count from here)
        deadman_before = released("deadman")
        game.on.clear()

        def let_go() -> bool:
            s = m("pad")
            return s.value("charles_agent_releases_total", reason="deadman") > deadman_before and all(
                s.value("charles_agent_pad_value", input=k) == 0 for k in ("steering", "throttle", "brake")
            )

        wait_for(let_go, 10, "the pad did not let go of everything when the actions stopped")
        time.sleep(0.5)  # and nothing drives it again once the game is quiet
        s = m("pad")
        assert all(
            s.value("charles_agent_pad_value", input=k) == 0 for k in ("steering", "throttle", "brake")
        )

        # 4. a client without an allowed key: refused, hears nothing, and its actions drive nothing
        failures = m("broker").value("charles_broker_auth_failures_total")
        rogue_svc = client(ports, PLAYER_ID, rogue, "capture-agent")  # claims to be the player, too
        listener = client(ports, "listener", keys, "capture-agent")
        made += [rogue_svc, listener]
        rogue_sub = rogue_svc.subscriber([""], late_join=False)
        heard = listener.subscriber(["heartbeat."], late_join=False)
        rogue_pub = rogue_svc.publisher("action")
        n_applied, got, t_end = applied(), 0, time.monotonic() + 3.0
        seq = 10**6
        while time.monotonic() < t_end:
            rogue_pub.send(f"action.{PAD_ID}", Action(seq, -0.77, 1.0, 0.0, PAD_ID))
            seq += 1
            got += len(rogue_sub.drain()) + (rogue_sub.recv(20) is not None)
        assert got == 0, f"an unauthenticated client received {got} messages"
        assert heard.recv(2000) is not None, (
            "an authenticated client heard nothing either: the check proves nothing"
        )
        assert applied() == n_applied, "an unauthenticated client's actions reached the pad"
        wait_for(
            lambda: m("broker").value("charles_broker_auth_failures_total") > failures,
            10,
            "refusal not counted",
        )
        assert m("broker").value("charles_rejects_total", reason="unauthenticated") > 0

        # 5. on the plain (in-cluster) bus the allow-list holds: an unknown sender never drives
        intruder = client(ports, "intruder")
        made.append(intruder)
        ipub = intruder.publisher("action")
        wait_for(lambda: ipub.send(f"action.{PAD_ID}", Action(seq, 0.5, 1.0, 0.0, PAD_ID))
                 and m("pad").value("charles_rejects_total", reason="sender_not_allowed") >= 3, 20, "intruder not refused")  # fmt: skip
        assert applied() == n_applied
        # the bad weights and the intruders cost nobody memory (the broker's queues may hold up to
        # broker.queue_bytes by design: tests/test_broker_queues.py)
        rss_growth_within(rss0, pids, "after bad weights and intruders", exempt=("broker",))

        # 6. the player dies mid-drive: the pad lets go again
        game.on.set()
        wait_for(lambda: applied() > n_applied + 10, 30, "the player did not drive again")
        before = released("deadman")
        kill9(procs["player"].pid)
        wait_for(lambda: released("deadman") > before, 10, "the pad did not release when the player died")
        s = m("pad")
        assert all(
            s.value("charles_agent_pad_value", input=k) == 0 for k in ("steering", "throttle", "brake")
        )
        assert all(running(pids[n]) for n in ("broker", "pad")), "the broker or the pad agent died"
        game.close()
    finally:
        for svc in made:
            svc.close()
        for name in ("pad", "player", "broker"):
            stop(procs[name])
    assert procs["pad"].returncode == 0 and procs["broker"].returncode == 0
