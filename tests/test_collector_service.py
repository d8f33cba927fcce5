"""Collectors on real loopback sockets: broker -> configuration -> collector -> sample.* -> a subscriber.

Each in-process test runs :func:`charles.collector.service.serve` (what ``main`` runs) in a thread;
``svc.stop`` is exactly what SIGTERM calls. The last test runs the real entry point in a subprocess.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from charles import config
from charles.collector.service import CollectorService, make_source, serve
from charles.config import run_config
from charles.proto import Frame, GameFrame

from tests_support import counter_value, stop_by_sigterm, wait_for

SMALL_SIM = {"blocks": 3, "traffic": 1}  # a town that builds in a fraction of a second


@pytest.fixture
def served_broker(bus_ports):
    """start(served sections) -> the data a client needs; a broker serving exactly that configuration."""
    from charles.broker.broker import Broker
    from charles.runtime import Service

    base = {"bus": {"host": "127.0.0.1", "ports": bus_ports}, "service": {"http_port": 0, "shutdown_s": 2}}
    running = []

    def start(**sections):
        cfg = config.load(data={**base, **sections}, environ={})
        svc = Service("broker", cfg, http=False, signals=False)
        b = Broker(svc, cfg.to_dict())
        b.start()
        t = threading.Thread(target=b.serve, daemon=True)
        t.start()
        running.append((svc, b, t))
        return base

    yield start
    for svc, b, t in running:
        svc.stop()
        t.join(timeout=3)
        b.close()
        svc.close()


@pytest.fixture
def clients(bus_ports):
    """Client Services on the served_broker's ports (client_factory would start a second broker)."""
    from charles.runtime import Service

    made = []

    def make(name: str):
        data = {"bus": {"host": "127.0.0.1", "ports": bus_ports}}
        svc = Service(name, config.load(data=data, environ={}), http=False, signals=False)
        made.append(svc)
        return svc

    yield make
    for s in made:
        s.close()


@pytest.fixture
def collectors():
    """start(data, instance, seed, *overrides) -> the collector's Service, serving in a thread."""
    from charles.runtime import Service

    running = []

    def start(data, instance, seed=None, *overrides):
        local = config.load(data=data, environ={})
        svc = Service("collector", local, instance, http=False, signals=False)
        t = threading.Thread(target=serve, args=(svc, local, overrides, seed, {}), daemon=True)
        t.start()
        running.append((svc, t))
        return svc

    yield start
    for svc, t in running:
        svc.stop()
        t.join(5)
        assert not t.is_alive(), "a collector did not stop"
        svc.close()


def receive(sub, seconds: float, until=None) -> list:
    got, deadline = [], time.monotonic() + seconds
    while time.monotonic() < deadline:
        env = sub.recv(50)
        if env is not None:
            got.append((time.monotonic(), env))
            if until and until(got):
                break
    return got


def test_configuration_waits_for_the_broker_and_stops_on_sigterm(bus_ports, caplog):
    from charles.runtime import Service

    data = {"bus": {"host": "127.0.0.1", "ports": bus_ports, "connect_timeout_s": 0.3}}
    svc = Service("collector", config.load(data=data, environ={}), "collector-w", http=False, signals=False)
    result = []
    t = threading.Thread(target=lambda: result.append(svc.acquire_config("collector")), daemon=True)
    with caplog.at_level(logging.WARNING, logger="charles.collector"):
        t.start()
        wait_for(lambda: "no run configuration from the broker" in caplog.text, 3, "no waiting log")
        assert svc.status == "waiting" and svc.health()["healthy"]
        t0 = time.monotonic()
        svc.stop()
        t.join(2)
    assert not t.is_alive() and time.monotonic() - t0 < 1.0 and result == [None]
    assert f"tcp://127.0.0.1:{bus_ports['control']}" in caplog.text
    svc.close()


def test_configuration_from_the_broker_shapes_samples_sent_at_30_hz(served_broker, collectors, clients):
    # The broker's model section decides the resolution and the stack; its collector section real time.
    data = served_broker(
        model={"overrides": {"width": 96, "height": 54, "frames": 3}},
        collector={"realtime": True, "codec": "jpeg", "quality": 80},
        sim=SMALL_SIM,
    )
    sub = clients("trainer").subscriber(["sample.", "console.collector-1"], late_join=False)
    svc = collectors(data, "collector-1", 1)
    got = receive(sub, 6, until=lambda g: sum(e.topic.startswith("sample.") for _, e in g) > 1)
    assert got, "no sample arrived"
    t0 = got[-1][0]
    got = receive(sub, 3.0)
    samples = [e.msg for _, e in got if e.topic == "sample.collector-1"]
    rate = (len(samples) - 1) / (got[-1][0] - t0)
    assert 22 <= rate <= 38, f"{rate:.1f} samples/s in real time, expected ~30"
    s = samples[-1]
    assert s.collector == "collector-1" and s.frame.shape == (54, 96, 3) and s.frame.codec == "jpeg"
    assert len(s.stack) == 2 and all(f.shape == (54, 96, 3) for f in s.stack)
    assert s.history.shape == (60, 5) and s.previous is not None and s.source == "npc"
    assert s.frame.decode().shape == (54, 96, 3)
    seqs = [x.seq for x in samples]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "no gaps at 30 Hz"
    assert np.allclose(np.diff([x.game_time for x in samples]), 1 / 30, atol=1e-6), "30 Hz of game time"
    consoles = [e.msg.state for _, e in got if e.topic == "console.collector-1"]
    assert consoles and {"samples", "sps", "unstucks"} <= set(consoles[-1])
    assert {"samples", "sps", "unstucks", "km", "drops"} <= set(svc.info)
    assert svc.info["drops"] == 0


def test_a_running_collectors_sample_validates_against_the_json_schema(served_broker, collectors, bus_ports):
    """proto/schema.json is what a client in another language validates against: a sample as a running
    collector publishes it (with history, a frame stack and previous controls) passes it, its kind's own
    definition too, and decodes back; the same header with one range broken fails the schema."""
    import jsonschema
    import msgpack
    import zmq

    from charles.proto import decode
    from charles.proto.schema import PATH

    schema = json.loads(PATH.read_text())
    data = served_broker(model={"overrides": {"width": 96, "height": 54, "frames": 3}}, sim=SMALL_SIM)
    ctx = zmq.Context.instance()
    sub = ctx.socket(zmq.SUB)
    sub.linger = 0
    sub.connect(f"tcp://127.0.0.1:{bus_ports['subscribe']}")
    sub.subscribe(b"sample.")
    try:
        collectors(data, "collector-1", 1)
        assert sub.poll(10_000), "no sample arrived"
        frames = sub.recv_multipart()
    finally:
        sub.close(0)
    header = msgpack.unpackb(frames[1])
    assert header["kind"] == "sample" and {"history", "stack", "previous"} <= set(header["body"])
    jsonschema.validate(header, schema)
    jsonschema.validate(header, {"$defs": schema["$defs"], "$ref": "#/$defs/SampleMessage"})
    env = decode(frames)
    assert env.msg.collector == "collector-1" and env.msg.frame.decode().shape == (54, 96, 3)
    header["body"]["steering"] = 1.5
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(header, schema)


def test_two_collectors_have_their_own_ids_seeds_and_frames(served_broker, collectors, clients):
    data = served_broker(collector={"realtime": True}, sim=SMALL_SIM)
    sub = clients("trainer").subscriber(["sample."], late_join=False)
    collectors(data, "collector-1", 1)
    collectors(data, "collector-2", 2)
    firsts: dict = {}

    def both(got):
        for _, e in got:
            firsts.setdefault(e.msg.collector, e.msg)
        return len(firsts) == 2

    receive(sub, 8, until=both)
    assert set(firsts) == {"collector-1", "collector-2"}
    a, b = (firsts[k].frame.decode() for k in ("collector-1", "collector-2"))
    assert a.shape == b.shape == (90, 160, 3)  # the tiny preset's resolution
    assert np.abs(a.astype(int) - b.astype(int)).mean() > 5, "two seeds, two towns: different pictures"


def test_remote_game_frames_become_samples_labelled_with_their_controls(served_broker, collectors, clients):
    data = served_broker()
    sub = clients("trainer").subscriber(["sample.collector-g"], late_join=False)
    svc = collectors(data, "collector-g", None, "collector.source=game:agent-1")
    wait_for(lambda: svc.status == "ok", 5, "collector never ran")
    agent = clients("capture_agent").publisher("game")
    img = Frame.encode(np.random.default_rng(0).integers(0, 256, (108, 192, 3), dtype=np.uint8), "jpeg")
    sent = {}
    got = []
    k = 0
    deadline = time.monotonic() + 6
    while len(got) < 10 and time.monotonic() < deadline:
        controls = (round(np.sin(k / 7), 3), round(np.cos(k / 5), 3))
        sent[k] = controls
        agent.send(
            "game.agent-1",
            GameFrame("agent-1", k, 50 + k / 30, img, 8.0, purpose=(0.2, 40.0), controls=controls),
        )
        k += 1
        env = sub.recv(30)
        if env is not None:
            got.append(env.msg)
    assert len(got) >= 10, "GameFrames did not become samples"
    for s in got:
        assert s.frame.shape == (90, 160, 3), "resized to the model's resolution"
        assert s.speed == 8.0 and s.purpose == pytest.approx((0.2, 40.0))
    # each label is the controls of the frame it came with: the frames' own game clock lines them up
    ks = [next(k for k, c in sent.items() if c == (s.steering, s.throttle_brake)) for s in got]
    for s, k in zip(got, ks, strict=True):
        assert s.game_time == pytest.approx(got[0].game_time + (k - ks[0]) / 30, abs=1e-6)
    assert [x.seq for x in got] == list(range(got[0].seq, got[0].seq + len(got)))


def test_default_seeds_are_the_replicas_own_and_reported_on_the_console(served_broker, collectors, clients):
    # seed=None is what compose and k8s run: each replica derives its seed from its own id
    from charles.collector.sources import replica_seed

    data = served_broker(sim={**SMALL_SIM, "seed": 7})
    sub = clients("viewer").subscriber(["console.collector-", "sample.collector-"], late_join=False)
    collectors(data, "collector-a")
    collectors(data, "collector-b")
    seeds: dict = {}
    senders: set = set()

    def both(got):
        for _, e in got:
            if e.topic.startswith("console."):
                seeds[e.sender] = e.msg.state.get("seed")
            else:
                senders.add(e.msg.collector)
        return len(seeds) == 2 and None not in seeds.values() and len(senders) == 2

    receive(sub, 10, until=both)
    assert set(seeds) == senders == {"collector-a", "collector-b"}
    assert seeds["collector-a"] != seeds["collector-b"]
    assert seeds == {k: replica_seed(k, 7) for k in seeds}


def test_remote_game_recovery_is_no_sample_counts_an_unstuck_and_game_time_jitter_is_recorded(
    served_broker, collectors, clients
):
    data = served_broker(collector={"console_s": 0.2})
    sub = clients("trainer").subscriber(["sample.collector-r"], late_join=False)
    svc = collectors(data, "collector-r", None, "collector.source=game:agent-2")
    wait_for(lambda: svc.status == "ok", 5, "collector never ran")
    agent = clients("capture_agent").publisher("game")
    img = Frame.encode(np.zeros((108, 192, 3), np.uint8), "jpeg")
    t = 50.0
    k = 0

    def send(controls, recovering=False, dt=1 / 30):
        nonlocal t, k
        t += dt
        k += 1
        agent.send(
            "game.agent-2",
            GameFrame("agent-2", k, t, img, 8.0, controls=controls, recovering=recovering),
        )
        time.sleep(0.005)

    deadline = time.monotonic() + 6
    while sub.recv(0) is None and time.monotonic() < deadline:  # until the path is open end to end
        send((0.1, 0.5))
        time.sleep(0.03)
    reg = svc.metrics.registry
    jitter_before = counter_value(reg, "charles_collector_jitter_seconds_sum")
    for _ in range(5):
        send((0.1, 0.5))
    for _ in range(15):  # the agent's Unstuck fades, teleports and settles the car
        send((0.9, 0.9), recovering=True)
    send((0.2, 0.5), dt=0.05)  # a late frame: 1/60 s off the 30 Hz grid
    for _ in range(10):
        send((0.2, 0.5))
    got = [e.msg for _, e in receive(sub, 2.0, until=lambda g: len(g) >= 15)]
    assert len(got) >= 12, "driving frames after the recovery became samples"
    assert all(s.steering != 0.9 for s in got), "no frame of the recovery is a training sample"
    assert counter_value(reg, "charles_collector_unstucks_total") == 1
    assert counter_value(reg, "charles_collector_jitter_seconds_count") >= 30
    assert counter_value(reg, "charles_collector_jitter_seconds_sum") - jitter_before == pytest.approx(
        1 / 60, abs=1e-3
    )
    wait_for(lambda: svc.info.get("unstucks") == 1, 3, "the console does not show the unstuck")


def test_a_realtime_collector_follows_the_trainers_demand_and_counts_a_bad_one(
    served_broker, collectors, clients
):
    """Flow control on the real bus: a trainer's heartbeat asking for less slows the collector to its floor,
    one asking for more brings it back to collector.pace; nobody else's heartbeat moves it."""
    from charles.proto import Heartbeat

    data = served_broker(
        collector={"realtime": True, "pace": 1.0, "flow_min": 0.1, "flow_settle_s": 0.4, "console_s": 0.2},
        sim=SMALL_SIM,
    )
    trainer = clients("trainer")
    beats = trainer.publisher("heartbeat")
    sub = clients("trainer").subscriber(["sample.collector-f"], late_join=False)
    svc = collectors(data, "collector-f", 1)
    wait_for(lambda: svc.info.get("flow") == 1.0, 20, "the collector never started")
    asked: dict[str, object] = {}

    def beat() -> None:
        for instance, (service, demand) in list(asked.items()):
            beats.send(f"heartbeat.{instance}", Heartbeat(service, instance, "ok", 1.0, {"demand": demand}))

    def rate(seconds: float) -> float:
        while sub.drain():  # what queued while the pace was moving
            pass
        got = [t for t, e in receive(sub, seconds) if e.topic == "sample.collector-f"]
        return (len(got) - 1) / (got[-1] - got[0]) if len(got) > 2 else 0.0

    def settle(pred, what: str) -> None:
        def check() -> bool:
            beat()
            return pred(svc.info.get("flow"))

        wait_for(check, 20, what)

    # a collector's heartbeat (a look-alike topic) asking for less moves nothing
    asked["trainer-look-alike"] = ("collector", 0.125)
    for _ in range(10):
        beat()
        time.sleep(0.2)
    assert svc.info["flow"] == 1.0, "a heartbeat of another service moved the pace"

    asked = {"trainer-a": ("trainer", 0.125)}
    settle(lambda f: f == 0.1, "the collector never slowed to its floor")
    slow = rate(3.0)
    assert 1.5 <= slow <= 4.5, f"{slow:.1f} samples/s at 0.1 x pace 1 (3/s expected)"
    assert svc.info["pace"] == 0.1

    # two trainers: the hungriest wins
    asked["trainer-b"] = ("trainer", 8.0)
    settle(lambda f: f == 1.0, "the collector never came back to its pace")
    fast = rate(2.0)
    assert 22 <= fast <= 38, f"{fast:.1f} samples/s back at pace 1 (30/s expected)"

    # a demand that is not a positive number is refused and counted; it never moves the pace
    asked = {"trainer-c": ("trainer", float("nan")), "trainer-d": ("trainer", "lots")}
    rejects = svc.metrics.registry
    wait_for(
        lambda: (beat(), counter_value(rejects, "charles_rejects_total", {"reason": "bad_demand"}) >= 4)[1],
        10,
        "bad demands were not counted",
    )
    assert svc.info["flow"] == 1.0


class SlowPub:
    """A bus that takes 20 ms per message."""

    def __init__(self):
        self.sent = 0

    def send(self, topic, msg):
        time.sleep(0.02)
        self.sent += 1
        return True


def test_a_slow_bus_makes_drops_counted_never_a_slow_capture(bus_ports):
    from charles.runtime import Service

    data = {
        "bus": {"host": "127.0.0.1", "ports": bus_ports},
        "collector": {"send_queue": 2},
        "sim": SMALL_SIM,
    }
    cfg = config.load(data=data, environ={})
    svc = Service("collector", cfg, "collector-slow", http=False, signals=False)
    pub = SlowPub()
    service = CollectorService(svc, cfg, make_source(cfg, svc, 5), pub=pub)
    service.sender.start()
    t0 = time.perf_counter()
    for _ in range(120):
        service.step()
    capture_s = time.perf_counter() - t0
    service.shutdown()
    reg = svc.metrics.registry
    dropped = counter_value(reg, "charles_drops_total", {"cause": "send_queue"})
    assert dropped > 50 and svc.info["drops"] == dropped
    assert capture_s < 120 * 0.02 / 2, "capture never waited on the bus"
    assert counter_value(reg, "charles_collector_samples_total") == pub.sent == service.sender.sent
    assert counter_value(reg, "charles_collector_frame_seconds_count") == 120
    svc.close()


def test_run_config_keeps_local_bus_and_lets_the_command_line_win():
    local = config.load(data={"bus": {"host": "10.0.0.9"}}, environ={})
    served = {
        "bus": {"host": "broker"},
        "model": {"preset": "tiny", "overrides": {"width": 64}},
        "collector": {"quality": 70},
        "some_future_section": {"x": 1},
    }
    cfg = run_config(
        local, served, ["collector.quality=95"], environ={"CHARLES__COLLECTOR__REALTIME": "true"}
    )
    assert cfg.bus.host == "10.0.0.9" and cfg.model.resolve().width == 64
    assert cfg.collector.quality == 95 and cfg.collector.realtime is True


def test_gym_source_through_the_service(bus_ports):
    from charles.runtime import Service

    data = {
        "bus": {"host": "127.0.0.1", "ports": bus_ports},
        "collector": {"source": "gym:Charles/Drive-v0", "gym_kwargs": {"max_steps": 30}},
    }
    cfg = config.load(data=data, environ={})
    svc = Service("collector", cfg, "collector-gym", http=False, signals=False)
    pub = SlowPub()
    pub.send = lambda topic, msg: sent.append(msg) or True
    sent = []
    service = CollectorService(svc, cfg, make_source(cfg, svc, 0), pub=pub)
    service.sender.start()
    for _ in range(40):
        service.step()
    service.shutdown()
    assert len(sent) == 40 and all(s.frame.shape == (90, 160, 3) for s in sent)
    assert service.state()["episodes"] == 2
    svc.close()


def test_collector_process_is_healthy_emits_and_stops_promptly_on_sigterm(broker, client_factory):
    from conftest import free_ports

    _, data = broker
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__SIM__BLOCKS": "3",
    }
    cmd = [sys.executable, "-m", "charles.collector", "--id", "collector-smoke", "--seed", "3", "--realtime"]
    sub = client_factory("trainer").subscriber(["sample.collector-smoke"], late_join=False)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def get(path: str):
        with urllib.request.urlopen(url + path, timeout=1) as r:
            return json.load(r)

    def healthy():
        try:
            return get("/healthz")["status"] == "ok"
        except OSError:
            return False

    try:
        wait_for(healthy, 20, "collector never became healthy")
        got = receive(sub, 5, until=lambda g: len(g) >= 10)
        assert len(got) >= 10, "no samples from the process"
        assert all(e.msg.collector == "collector-smoke" and e.msg.frame.shape == (90, 160, 3) for _, e in got)
        wait_for(lambda: get("/state")["info"].get("samples", 0) > 0, 3, "heartbeat info not refreshed")
        assert {"samples", "sps", "unstucks", "km", "drops"} <= set(get("/state")["info"])
        out = stop_by_sigterm(proc)
        assert "sent" in out and "dropped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
