"""The balancer service on real loopback sockets: collector -> broker -> balancer -> a trainer-like subscriber.

Each test runs :class:`BalancerService` in a thread of this process (``svc.stop`` is exactly what SIGTERM
calls); the subprocess test runs the real entry point. Most tests feed it from a plain publisher, so the
stream is exact; one runs a real collector service (sim source) in front of it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable

import msgpack
import numpy as np
import pytest

from charles.balancer.balancer import Balancer
from charles.balancer.plot import histogram_png
from charles.balancer.plot import main as balance_plot
from charles.balancer.service import BalancerService, set_topic
from charles.outputs import BinIndex, OutputKind, OutputSpec, outputs_signature, parse_bins
from charles.proto import Frame, Sample, SampleSet, encode
from charles.runtime import SeqGaps
from charles.sections.balancer import BalancerConfig

from tests_support import counter_value, wait_for

FRAME = Frame.encode(np.full((4, 6, 3), 80, np.uint8), "raw")
WIDE = Frame.encode(np.full((4, 8, 3), 80, np.uint8), "raw")

# Three bins per output, so a set completes after a handful of samples.
STEER = (-0.6, 0.0, 0.6)
TB = (-0.5, 0.0, 0.7)
BINS = {"steering": [[-1.0, -0.2], [-0.2, 0.2], [0.2, 1.0]], "throttle_brake": [[-1.0, 0.0], 0.0, [0.0, 1.0]]}
V3 = {"version": 3, "bins": BINS, "cap_per_bin": 8, "set_timeout_s": 60.0, "picture_s": 0}
# Bins an NPC in the small town fills within a second or two of driving: it mostly steers a little left,
# and its pedal is never exactly 0.
SIM_BINS = {
    "steering": [[-1.0, -0.02], [-0.02, 0.02], [0.02, 1.0]],
    "throttle_brake": [[-1.0, 0.0], [0.0, 0.5], [0.5, 1.0]],
}


def sample(collector: str, seq: int, steering: float, tb: float, frame: Frame = FRAME) -> Sample:
    return Sample(collector, seq, seq / 30, frame, steering, tb, 5.0, (0.0, 10.0))


def grid_stream(n: int, seed: int, collectors=("c1", "c2")) -> list[Sample]:
    rng = np.random.default_rng(seed)
    out, seqs = [], dict.fromkeys(collectors, 0)
    for k in range(n):
        c = collectors[k % len(collectors)]
        out.append(sample(c, seqs[c], float(rng.choice(STEER)), float(rng.choice(TB))))
        seqs[c] += 1
    return out


@pytest.fixture
def bus(client_factory):
    """start(**balancer_config) -> (service, collector publisher, set subscriber), all connected."""
    running = []

    def start(**cfg):
        svc = client_factory("balancer", balancer={**V3, **cfg})
        service = BalancerService(svc, svc.cfg.balancer)
        t = threading.Thread(target=service.run, daemon=True)
        t.start()
        running.append((svc, t))
        pub = client_factory("collector").publisher("sample")
        sets = client_factory("trainer").subscriber(["set."], late_join=False)
        reg = svc.metrics.registry
        connect(lambda: counter_value(reg, "charles_rejects_total", {"reason": "truncated"}) > 0, pub, sets)
        return service, pub, sets

    yield start
    for svc, t in running:
        svc.stop()
        t.join(5)


def connect(heard: Callable[[], bool], pub, sets) -> None:
    """Wait out the slow-joiner rule on both sides without feeding the balancer anything it would keep.

    The probe is a truncated message: the balancer's subscriber counts it as a reject (``heard`` looks
    for that) and the balancer never sees it.
    """

    def sample_path():
        pub.send_frames("sample.probe", [b"sample.probe"])
        return heard()

    def set_path():
        pub.send("set.probe", SampleSet(["steering"], 3, [sample("probe", 0, 0.0, 0.0)]))
        return sets.recv(50) is not None

    wait_for(sample_path, 5, "the balancer never received from the bus")
    wait_for(set_path, 5, "set.* subscription never propagated")
    sets.drain()


def receive_sets(sets, n: int, timeout: float = 5.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < n and time.monotonic() < deadline:
        env = sets.recv(100)
        if env is not None and env.topic != "set.probe":
            got.append(env)
    return got


def key(s: SampleSet) -> tuple:
    return (
        set_topic(s),
        tuple(s.outputs),
        tuple(s.labels_kept),
        tuple((x.collector, x.seq) for x in s.samples),
    )


def test_v3_sets_arrive_with_exactly_the_promised_composition(bus):
    service, pub, sets = bus()
    stream = grid_stream(120, seed=1)
    reference = Balancer(BalancerConfig(**V3))
    expected = [s for k, x in enumerate(stream) for s in reference.add(x, float(k))]
    assert len(expected) >= 20
    for x in stream:
        assert pub.send(f"sample.{x.collector}", x)
    got = receive_sets(sets, len(expected))
    assert [key(e.msg) for e in got] == [key(s) for s in expected], "the service does what the logic does"
    for env in got:
        s = env.msg
        assert env.topic == f"set.{s.outputs[0]}" and s.version == 3
        assert s.labels_kept == ["steering", "throttle_brake"], "v3 keeps every label"
        values = sorted(x.steering if s.outputs == ["steering"] else x.throttle_brake for x in s.samples)
        assert values == sorted(STEER if s.outputs == ["steering"] else TB), "one sample per bin"
    assert sets.recv(300) is None, "nothing more than the logic emitted"
    assert service.sets_sent == len(expected)


def test_a_real_collectors_samples_leave_in_sets_of_one_per_bin_with_every_label(bus, broker):
    from charles import config
    from charles.collector.service import serve
    from charles.runtime import Service

    service, _, sets = bus(bins=SIM_BINS)
    _, data = broker
    local = config.load(data=data, environ={})
    collector = Service("collector", local, "collector-e2e", http=False, signals=False)
    small_town = ["sim.blocks=3", "sim.traffic=1"]  # builds in a fraction of a second
    t = threading.Thread(target=serve, args=(collector, local, small_town, 7, {}), daemon=True)
    t.start()
    got: dict[str, list[SampleSet]] = {"set.steering": [], "set.throttle_brake": []}
    deadline = time.monotonic() + 15
    try:
        while any(len(v) < 3 for v in got.values()) and time.monotonic() < deadline:
            env = sets.recv(100)
            if env is not None and env.topic in got:
                got[env.topic].append(env.msg)
    finally:
        collector.stop()
        t.join(5)
        collector.close()
    assert all(len(v) >= 3 for v in got.values()), {k: len(v) for k, v in got.items()}
    for topic, received in got.items():
        output = topic.removeprefix("set.")
        bins = BinIndex(parse_bins(SIM_BINS[output]))
        for s in received:
            assert s.version == 3 and s.outputs == [output]
            assert s.labels_kept == ["steering", "throttle_brake"], "v3 keeps every label"
            assert sorted(bins.index(getattr(x, output)) for x in s.samples) == [0, 1, 2], "one per bin"
            assert all(x.collector == "collector-e2e" for x in s.samples), "straight from the collector"
            assert all(-1.0 <= x.steering <= 1.0 and -1.0 <= x.throttle_brake <= 1.0 for x in s.samples)
            assert all(x.frame.shape == (90, 160, 3) for x in s.samples), "the served model's frames"
    assert service.balancer.rejected["no_bin"] == 0


def test_balance_plot_draws_a_running_balancers_live_counts(bus, tmp_path, capsys):
    from conftest import free_ports

    service, pub, _ = bus()
    url = f"http://127.0.0.1:{service.svc.start_http()}"
    stream = grid_stream(60, seed=3)
    for x in stream:
        pub.send(f"sample.{x.collector}", x)
    wait_for(lambda: service.latest.arrived == len(stream), 5, "no refresh counted the samples")
    out = tmp_path / "live.png"
    assert balance_plot(["--from", url, "--out", str(out)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["from"] == url and summary["version"] == 3 and summary["samples"] == len(stream)
    assert summary["sets"] == service.latest.sets and summary["sets"]["complete"] > 0
    assert out.read_bytes() == histogram_png(service.latest), "the picture the balancer would draw"

    (dead,) = free_ports(1)
    nowhere = tmp_path / "nowhere.png"
    assert balance_plot(["--from", f"127.0.0.1:{dead}", "--out", str(nowhere)]) == 2
    assert f"cannot reach a balancer at http://127.0.0.1:{dead}/histogram.json" in capsys.readouterr().err
    assert balance_plot(["--from", url + "/elsewhere", "--out", str(nowhere)]) == 2
    assert "answered HTTP 404" in capsys.readouterr().err
    assert not nowhere.exists()


def test_sequence_gaps_are_counted_and_odd_frames_still_accepted(bus):
    service, pub, _ = bus()
    c1 = [sample("c1", seq, 0.0, 0.0) for seq in range(20) if seq not in (5, 6, 7, 15)]  # 4 missing
    c2 = [sample("c2", seq, 0.6, 0.7) for seq in [*range(10), *range(5)]]  # restarted: not a gap
    odd = sample("c3", 0, -0.6, -0.5, frame=WIDE)
    for x in [*c1, *c2, odd]:
        pub.send(f"sample.{x.collector}", x)
    n = len(c1) + len(c2) + 1
    wait_for(lambda: service.balancer.arrived == n, 5, "samples did not all arrive")
    reg = service.svc.metrics.registry
    assert counter_value(reg, "charles_drops_total", {"cause": "seq_gap"}) == 4, "restart of c2 is not a gap"
    assert service.gaps.restarts == 1
    assert service.balancer.accepted == n, "a frame of another shape is accepted: the trainer resizes"
    assert counter_value(reg, "charles_balancer_odd_frames_total") == 1


def test_bad_samples_are_rejected_by_reason_and_the_service_keeps_going(bus):
    # a hole in the steering bins: 0.1 has no bin, which only the balancer logic can tell
    bins = {**BINS, "steering": [[-1.0, -0.2], 0.0, [0.2, 1.0]]}
    service, pub, sets = bus(bins=bins)
    reg = service.svc.metrics.registry

    good = encode("sample.c1", sample("c1", 0, 0.0, 0.0), "c1")

    def tampered(header=None, **body):
        h = msgpack.unpackb(good[1])
        h.update(header or {})
        h["body"].update(body)
        return [good[0], msgpack.packb(h), *good[2:]]

    bad = {
        "nan": tampered(steering=float("nan")),
        "out_of_range": tampered(throttle_brake=1.5),
        "bad_header": [good[0], b"\xc1 not msgpack"],
        "bad_version": tampered({"v": 99}),
        "size_mismatch": [*good[:2], b"\x00\x01"],
    }
    for frames in bad.values():
        pub.send_frames("sample.c1", frames)
    pub.send("sample.c1", sample("c1", 1, 0.1, 0.0))  # decodes, but no bin
    stream = [sample("c2", k, s, tb) for k, (s, tb) in enumerate(zip(STEER, TB, strict=True))]
    for x in stream:
        pub.send("sample.c2", x)

    got = receive_sets(sets, 2)
    assert sorted(e.topic for e in got) == ["set.steering", "set.throttle_brake"], "still balancing"
    for reason in [*bad, "no_bin"]:
        assert counter_value(reg, "charles_rejects_total", {"reason": reason}) == 1, reason
    assert service.balancer.arrived == 1 + len(stream), "only decodable samples reach the logic"
    assert service.balancer.rejected["no_bin"] == 1


def test_stop_flushes_held_samples_as_sets(bus):
    service, pub, sets = bus()
    # steering never reaches its third bin, throttle_brake never its first: no set completes
    labels = [(-0.6, 0.0), (0.0, 0.7), (0.0, 0.0), (-0.6, 0.7)]
    stream = [sample("c1", k, s, tb) for k, (s, tb) in enumerate(labels)]
    for x in stream:
        pub.send("sample.c1", x)
    wait_for(lambda: service.balancer.arrived == len(stream), 5, "samples did not arrive")
    assert sets.recv(200) is None
    service.svc.stop()  # what SIGTERM calls
    got = {e.topic: e.msg for e in receive_sets(sets, 2)}
    assert set(got) == {"set.steering", "set.throttle_brake"}
    # the oldest sample of each filled bin: one per bin, as a timeout would have sent
    assert [x.seq for x in got["set.steering"].samples] == [0, 1]
    assert [x.seq for x in got["set.throttle_brake"].samples] == [0, 1]
    reg = service.svc.metrics.registry
    shutdown_drops = lambda: counter_value(reg, "charles_drops_total", {"cause": "shutdown"})  # noqa: E731
    wait_for(lambda: shutdown_drops() > 0, 2, "what the flush left was not counted")
    assert shutdown_drops() == 4, "the rest is counted"


def test_pictures_console_heartbeat_info_and_metrics(bus, client_factory):
    service, pub, sets = bus(picture_s=0.2)
    consoles = client_factory("viewer").subscriber(["console."], late_join=False)
    stream = grid_stream(30, seed=2)
    for x in stream:
        pub.send(f"sample.{x.collector}", x)
    wait_for(lambda: service.balancer.arrived == len(stream), 5, "samples did not arrive")
    env = None
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # the first picture may predate the samples: wait for one after
        env = consoles.recv(200)
        if env is not None and env.msg.state["arrived"] == len(stream):
            break
    assert env is not None and env.topic == f"console.{service.svc.instance}"
    assert env.msg.service == "balancer"
    assert {"accepted", "sets", "acceptance", "held", "sets_per_s"} <= set(env.msg.state)
    img = env.msg.images["histogram"].decode()
    assert img.ndim == 3 and img.shape[2] == 3 and img.shape[0] > 100
    body, ctype = service.svc.http_routes["/histogram.png"]()
    assert ctype == "image/png" and body.startswith(b"\x89PNG")
    info = service.svc.info_for_heartbeat()
    assert info["accepted"] == len(stream) and info["acceptance"] == 1.0
    assert info["sets"] == service.sets_sent > 0
    reg = service.svc.metrics.registry
    assert counter_value(reg, "charles_balancer_samples_arrived_total") == len(stream)


def test_seq_gaps_are_bounded():
    g = SeqGaps(max_senders=3)
    for c in ("a", "b", "c", "d"):
        g.see(c, 0)
    assert list(g.last) == ["b", "c", "d"]
    assert g.see("b", 3) == 2 and g.missing == 2


def test_balancer_process_serves_health_flushes_and_stops_promptly_on_sigterm(broker, client_factory):
    from conftest import free_ports

    _, data = broker
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES__BALANCER__SET_TIMEOUT_S": "60",
    }
    cmd = [sys.executable, "-m", "charles.balancer", "--id", "balancer-smoke"]
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
        wait_for(healthy, 20, "balancer never became healthy")
        pub = client_factory("collector").publisher("sample")
        sets = client_factory("trainer").subscriber(["set."], late_join=False)

        def heard():
            with urllib.request.urlopen(url + "/metrics", timeout=1) as r:
                return b'charles_rejects_total{reason="truncated"}' in r.read()

        connect(heard, pub, sets)
        # the seed's 0.1-wide bins (21 x 21): five samples in five bins of each complete nothing
        stream = [sample("c1", k, v, v) for k, v in enumerate((-1.0, -0.5, 0.0, 0.5, 1.0))]
        for x in stream:
            pub.send("sample.c1", x)
        wait_for(lambda: get("/healthz")["topics"]["sample"]["count"] == 5, 5, "samples did not arrive")
        state = get("/state")
        assert state["instance"] == "balancer-smoke"
        wait_for(lambda: get("/state")["info"].get("arrived") == 5, 3, "heartbeat info not refreshed")
        assert {"accepted", "sets", "acceptance", "held"} <= set(get("/state")["info"])
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        got = {e.topic: e.msg for e in receive_sets(sets, 2)}
        rc = proc.wait(timeout=10)
        assert rc == 0, proc.stdout.read().decode()
        # rc 0 already says it stopped by itself inside service.shutdown_s (the watchdog would exit 1);
        # the wall clock adds interpreter teardown, slow on a loaded 2-core box
        assert time.monotonic() - t0 < 10
        assert set(got) == {"set.steering", "set.throttle_brake"}, proc.stdout.read().decode()
        assert all(len(s.samples) == 5 for s in got.values()), "SIGTERM flushed every held sample"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_the_balancer_bins_by_the_model_lines_classes_and_says_so_in_its_heartbeat(client_factory):
    svc = client_factory("balancer", balancer={"version": 3, "picture_s": 0})
    classes = OutputSpec("steering", OutputKind.CLASSIFICATION, tuple(parse_bins([-1.0, [-1.0, 1.0], 1.0])))
    line = [classes, *svc.cfg.model.resolve().outputs[1:]]
    service = BalancerService(svc, svc.cfg.balancer, model_outputs=line)
    assert service.balancer.specs[0] == classes and len(service.balancer.groups[0].cells) == 3
    service.refresh(time.monotonic())
    info = svc.info
    assert info["outputs"] == outputs_signature(line) == service.outputs
    assert info["outputs"].startswith("steering:classification:")
