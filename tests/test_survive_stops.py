"""Every service stops cleanly on SIGTERM, again and again, idle and mid-traffic.

Each service's real entry point runs ``CHARLES_STOP_CYCLES`` times (10 by default, 30 for the full barrage) as a fork of a server that
imported it once (survive_support.ForkServer: the same ``main`` and the same exit path as ``python -m``,
without thirty times the imports). Every third start is stopped mid-traffic: samples pouring into the
balancer, sets into the trainer, weights into the player, a page polling the viewer, a publisher flooding
the broker. Each stop must

- end with exit status 0 (the watchdog exits 1 past ``service.shutdown_s``; an abort in interpreter
  teardown is -6),
- take less than ``service.shutdown_s`` from SIGTERM to the reaped process,
- lose nothing it acknowledged: the balancer's flushed sets reach the bus with every sample its log says it
  flushed, the collector's "sent N samples" are N samples on the bus, and the trainer's final checkpoint is
  complete and is the one its manifest names.

``charles up`` gets the same treatment as a whole in tests/test_launcher.py (Ctrl-C stops every child with
status 0).
"""

from __future__ import annotations

import json
import os
import re
import threading
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from charles.proto import Sample
from charles.trainer.synthetic import make_frames, make_sample, make_set

from conftest import free_ports
from mod_support import DeepGtavServer
from survive_support import overrides, wait_for
from tests_support import weights_message

pytestmark = [pytest.mark.slow, pytest.mark.system]

CYCLES = int(os.environ.get("CHARLES_STOP_CYCLES", "10"))
"""Starts per service: `make test-system` runs 10 (CYCLES=30 there, CHARLES_STOP_CYCLES=30 here: the full barrage)."""
H, W = 36, 64


class Pump:
    """Calls ``send`` every ``period`` seconds on its own thread until stopped (traffic while a stop happens)."""

    def __init__(self, send: Callable[[int], None], period: float):
        self.n = 0
        self._stop = threading.Event()

        def run() -> None:
            while not self._stop.wait(period):
                send(self.n)
                self.n += 1

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)


class Busy:
    """A ``busy`` step for Stopper.cycle: start traffic, wait until the service has taken some, and leave the
    traffic running into the stop; ``close`` ends it after the stop."""

    def __init__(self, pump: Callable[[], Pump], enough: Callable[[], object], what: str):
        self.pump, self.enough, self.what = pump, enough, what
        self.running: Pump | None = None

    def __call__(self, _log: Path) -> None:
        self.running = self.pump()
        wait_for(self.enough, 30, self.what)

    def close(self) -> None:
        if self.running is not None:
            self.running.close()
            self.running = None


def metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
        text = r.read().decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


# ---------------------------------------------------------------------------------------------- the services


def test_broker_stops_cleanly_over_and_over(stopper, bus_ports, client_factory):
    from charles.proto import Console

    # a second broker on ports of its own (the fixture's one serves the other tests), flooded mid-traffic
    ports = dict(zip(bus_ports, free_ports(len(bus_ports)), strict=True))
    s = stopper("charles.broker.__main__", [], CHARLES__BUS__PORTS=json.dumps(ports))
    own = {"bus": {"host": "127.0.0.1", "ports": ports}}
    pub = client_factory("flood", **own).publisher("console")
    sub = client_factory("listener", **own).subscriber(["console.flood"], late_join=False, hwm=100000)

    def flood() -> Pump:
        return Pump(lambda n: pub.send("console.flood", Console("flood", {"n": n})), 0.001)

    busy = Busy(flood, lambda: sub.drain(100000), "the flood through the broker")
    for k in range(CYCLES):
        s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
    s.report("broker")


def test_balancer_stops_cleanly_and_flushes_what_it_holds(stopper, client_factory):
    s = stopper(
        "charles.balancer.__main__",
        ["--id", "balancer-stops", *overrides("balancer.set_timeout_s=60", "balancer.picture_s=0.2")],
        ["charles.balancer.service", "charles.balancer.plot", "matplotlib.pyplot"],
    )
    pub = client_factory("collector").publisher("sample")
    sets = client_factory("trainer").subscriber(["set."], late_join=False, hwm=100000)
    frame = make_frames(1, height=H, width=W)[0]
    flushed = re.compile(r"flushed (\d+) held samples in (\d+) sets")
    busy = Busy(
        lambda: Pump(lambda n: pub.send("sample.stops", _sample(n, frame)), 0.002),
        lambda: metric(s.http_port, "charles_balancer_samples_arrived_total") > 20,
        "samples into the balancer",
    )
    for k in range(CYCLES):
        sets.drain(100000)
        log = s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
        m = flushed.search(log.read_text())
        assert m, f"start #{k} did not say what it flushed\n{log.read_text()[-2000:]}"
        n, nsets = int(m.group(1)), int(m.group(2))
        if k % 3 != 2:
            continue
        assert n > 0, f"start #{k} held nothing mid-traffic"
        # The flushed sets are the last ones the balancer sent (one socket: order kept), and they carry
        # every sample its log says it flushed.
        got: list = []

        def flush_arrived(got: list = got, nsets: int = nsets, n: int = n) -> bool:
            got.extend(e.msg for e in sets.drain(100000))
            return len(got) >= nsets and sum(len(x.samples) for x in got[-nsets:]) == n

        wait_for(flush_arrived, 10, f"start #{k}: the {nsets} flushed sets ({n} samples) did not all arrive")
    s.report("balancer")


def _sample(n: int, frame) -> Sample:
    # synthetic labels fill the bins unevenly: sets complete now and then, the rest stays held
    return make_sample(n, frame, collector="stops")


def test_collector_stops_cleanly_and_sends_what_it_counted(stopper, client_factory):
    s = stopper(
        "charles.collector.__main__",
        ["--id", "stops-0"],
        ["charles.collector.service", "charles.sim.world"],
        CHARLES__SIM__HOOD_WIDTH=str(W),
        CHARLES__SIM__HOOD_HEIGHT=str(H),
    )
    sub = client_factory("balancer").subscriber(["sample.stops-"], late_join=False, hwm=100000)
    sent = re.compile(r"sent (\d+) samples")
    seen: Counter[str] = Counter()  # samples on the bus per collector id (one id per start)
    for k in range(CYCLES):
        cid = f"stops-{k}"
        log = s.cycle(k, argv=["--id", cid, "--realtime"], sending="sample")
        n = int(sent.search(log.read_text()).group(1))

        def arrived(cid: str = cid, n: int = n) -> bool:
            for e in sub.drain(100000):
                seen[e.msg.collector] += 1
            return seen[cid] >= n

        wait_for(arrived, 10, f"start #{k}: the bus saw {seen[cid]} of {n} samples")
        assert seen[cid] == n, f"start #{k}: {seen[cid]} samples on the bus, the log says {n}"
    s.report("collector")


def test_trainer_stops_cleanly_with_a_complete_final_checkpoint(stopper, client_factory, tmp_path):
    from charles.model.presets import get_config
    from charles.trainer.checkpoint import list_checkpoints, read_checkpoint
    from charles.trainer.runs import RunDir

    runs = tmp_path / "runs"
    run_path = runs / "tiny" / "tiny_v1"
    settings = [
        "trainer.batch_size=4",
        "trainer.buffer.capacity=64",
        "trainer.buffer.start_fraction=0.1",
        "trainer.checkpoint_every=1000",  # only the final one: each stop must write it
        "trainer.publish_every=5",
        "trainer.decode_threads=1",
        "trainer.prefetch=1",
        "trainer.torch_threads=1",
    ]
    s = stopper(
        "charles.trainer.__main__",
        ["--preset", "tiny", "--id", "trainer-stops", *overrides(*settings)],
        ["charles.trainer.service", "charles.model.net", "timm"],
        CHARLES_RUN_DIR=str(runs),
        CHARLES__MODEL__OVERRIDES=json.dumps({"width": W, "height": H}),
    )
    pub = client_factory("balancer").publisher("set")
    frames = make_frames(8, height=H, width=W)

    def feed(n: int) -> None:
        for name in ("steering", "throttle_brake"):
            samples = [make_sample(4 * n + i, frames[(4 * n + i) % 8], collector="sim-1") for i in range(4)]
            out = make_set([name], samples, version=3, labels_kept=["steering", "throttle_brake"])
            out.seq = n
            pub.send(f"set.{name}", out)

    batch = re.compile(r"stopped tiny_v1 at batch (\d+)")
    busy = Busy(lambda: Pump(feed, 0.02), lambda: metric(s.http_port, "charles_trainer_batches_total") > 0,
                    "a trained batch")  # fmt: skip
    mcfg = get_config("tiny", width=W, height=H)
    last = 0
    for k in range(CYCLES):
        log = s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
        b = int(batch.search(log.read_text()).group(1))
        assert b >= last, f"start #{k} stopped at batch {b}, before {last}"
        last = b
        if b:
            found = list_checkpoints(run_path / "checkpoints")
            assert found and found[-1][0] == b, f"start #{k}: no final checkpoint at batch {b}: {found}"
            assert read_checkpoint(found[-1][1], mcfg).batch == b
            assert RunDir(run_path).manifest.batch == b
    assert last > 0, "no cycle trained a batch"
    s.report("trainer")


def test_player_stops_cleanly_while_weights_arrive(stopper, client_factory):
    from safetensors.torch import save

    from charles import config
    from charles.model.net import build_model
    from charles.model.presets import get_config

    mcfg = get_config("tiny", width=W, height=H)
    payload = save({k: v.contiguous() for k, v in build_model(mcfg).state_dict().items()})
    cfg = config.load(data={"model": {"preset": "tiny", "overrides": {"width": W, "height": H}}}, environ={})
    s = stopper(
        "charles.player.__main__",
        ["--preset", "tiny", "--id", "player-stops"],
        ["charles.player.service", "charles.model.net", "timm"],
        CHARLES__MODEL__OVERRIDES=json.dumps({"width": W, "height": H}),
        CHARLES__SIM__HOOD_WIDTH=str(W),
        CHARLES__SIM__HOOD_HEIGHT=str(H),
    )
    pub = client_factory("trainer").publisher("weights")
    busy = Busy(
        lambda: Pump(lambda n: pub.send("weights.tiny", weights_message(payload, n + 1, cfg)), 0.2),
        lambda: metric(s.http_port, 'charles_messages_total{direction="in",topic="weights"}') > 0,
        "weights arriving at the player",
    )
    for k in range(CYCLES):
        s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
    s.report("player")


def test_viewer_stops_cleanly_while_a_page_polls(stopper):
    s = stopper("charles.viewer.__main__", [], ["charles.viewer.app"])
    polled: list[int] = []

    def poll(_n: int) -> None:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{s.http_port}/api/state", timeout=1) as r:
                polled.append(r.status)
        except OSError:
            pass

    busy = Busy(lambda: Pump(poll, 0.01), lambda: polled, "the page's polls")
    for k in range(CYCLES):
        polled.clear()
        s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
    s.report("viewer")


# ---------------------------------------------------------------------------------------------- the agents


def test_sim_agent_stops_cleanly_over_and_over(stopper):
    s = stopper("charles.sim.agent", ["--id", "game-stops"], ["charles.sim.world"],
                CHARLES__SIM__HOOD_WIDTH=str(W), CHARLES__SIM__HOOD_HEIGHT=str(H))  # fmt: skip
    for k in range(CYCLES):
        s.cycle(k, sending="game")
    s.report("sim-agent")


def test_gamepad_agent_stops_cleanly_while_actions_arrive(stopper, client_factory):
    from charles.proto import Action

    player = client_factory("player")
    s = stopper(
        "charles.agents.gamepad",
        ["--id", "pad-stops", "--allow", player.instance, *overrides("gamepad.pad=none")],
        CHARLES__GAMEPAD__REQUIRE_SECURE="false",
    )
    pub = player.publisher("action")
    busy = Busy(
        lambda: Pump(lambda n: pub.send("action.pad-stops", Action(n, 0.1, 0.5, 0.0, "pad-stops")), 1 / 30),
        lambda: metric(s.http_port, "charles_agent_actions_applied_total") > 0,
        "actions applied to the pad",
    )
    for k in range(CYCLES):
        s.cycle(k, busy=busy if k % 3 == 2 else None)
        busy.close()
    s.report("gamepad-agent")


def test_capture_agent_stops_cleanly_while_the_mod_streams(stopper):
    mod = DeepGtavServer()
    try:
        s = stopper(
            "charles.agents.capture",
            ["--id", "capture-stops", "--frames", "deepgtav", "--width", "32", "--height", "16",
             *overrides(f"capture.deepgtav_port={mod.port}", "capture.fps=60")],
            CHARLES__CAPTURE__REQUIRE_SECURE="false",
        )  # fmt: skip
        for k in range(CYCLES):
            s.cycle(k)
        s.report("capture-agent")
    finally:
        mod.close()
