"""The judge on real loopback sockets: weights from the broker in, scores on the bus, in /metrics, in
TensorBoard and on its console; bad weights refused and counted; the real entry point as a process.

In-process tests run :class:`JudgeService` in a thread (``svc.stop`` is what SIGTERM calls) on 3-block
towns for a few game seconds; the subprocess test runs ``python -m charles.judge``.
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

import pytest
import torch

from charles.judge.judge import Curve, Judge
from charles.judge.service import JudgeService
from charles.model.presets import get_config
from charles.model.weights import WeightsError
from charles.proto import Score
from charles.sections.judge import JudgeConfig

from tests_support import counter_value, driving_weights, stop_by_sigterm, wait_for, weights_message

torch.set_num_threads(1)

TINY = get_config("tiny")
# a town of 3 blocks builds in ~2.5 s instead of ~8; 0.1 game minutes (180 ticks) per town
SMALL = {"sim": {"blocks": 3}, "judge": {"seeds": [9001], "minutes": 0.1, "nice": 0}}


def blob(seed: int, throttle: float, cfg_json: str = TINY.to_json()) -> bytes:
    """Weights of a tiny model that asks for ``throttle`` (so the car moves), by seed: real safetensors."""
    return driving_weights(seed, throttle, cfg_json)


def publisher(client_factory, broker):
    """publish(topic, weights): sent until the broker holds it as the topic's last value."""
    b, _ = broker
    pub = client_factory("trainer").publisher("weights")

    def publish(topic: str, w, until=None, timeout: float = 10.0) -> None:
        before = b.lvc.items.get(topic)

        def sent() -> bool:
            pub.send(topic, w)
            return until() if until is not None else b.lvc.items.get(topic) is not before

        wait_for(sent, timeout, f"weights batch {w.batch} on {topic} never arrived", interval=0.2)

    return publish


@pytest.fixture
def judge(broker, client_factory, tmp_path, monkeypatch):
    """start(judge=...) -> JudgeService running in a thread, its TensorBoard under tmp_path; stopped after."""
    monkeypatch.setenv("CHARLES_RUN_DIR", str(tmp_path / "runs"))
    running = []

    def start(**judge_overrides):
        svc = client_factory("judge", sim=SMALL["sim"], judge={**SMALL["judge"], **judge_overrides})
        service = JudgeService(svc, svc.cfg, TINY)
        t = threading.Thread(target=service.run, daemon=True)
        t.start()
        running.append((svc, t))
        wait_for(service.subscribed.is_set, 10, "the weights feed never subscribed")
        return service

    yield start
    for svc, t in running:
        svc.stop()
        t.join(10)


def score_listener(client_factory):
    """Scores off the bus, as the viewer, the trainer's console and the e2e bench get them."""
    sub = client_factory("listener").subscriber(["score."], late_join=False)
    got: list = []

    def poll(seconds: float = 0.2) -> list:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            env = sub.recv(50)
            if env is not None:
                got.append(env)
        return got

    return poll


# ---------------------------------------------------------------------------------------------- logic


def test_curve_stays_bounded_and_ends_at_the_newest_point():
    c = Curve(max_points=8)
    for b in range(100):
        c.add(b, 1000.0 + b, b / 10, 0.5)
    pts = c.snapshot()
    assert len(pts) <= 9 and pts[0][0] == 0 and pts[-1][0] == 99
    assert [p[0] for p in pts] == sorted(p[0] for p in pts)


def test_due_judges_first_weights_at_once_then_every_n_batches_or_m_minutes():
    now = [0.0]
    j = Judge(JudgeConfig(every_batches=100, every_minutes=2.0, seeds=[9001]), TINY, clock=lambda: now[0])
    assert j.due() is None
    assert j.offer("weights.tiny", weights_message(blob(1, 0.6), 10, TINY))
    cand = j.due()
    assert cand is not None and (cand.run, cand.batch, cand.version) == ("tiny_v1", 10, "")
    pooled = {"km": 1.0, "km_between_unstucks": 0.5, "on_road_fraction": 0.9, "collisions_per_km": 0.0,
              "mean_speed_kmh": 30.0, "unstucks": 2}  # fmt: skip
    score = j.record(cand, pooled, None, 3.0)
    assert score.curve[-1][0] == 10 and score.figures.unstucks == 2
    assert j.due() is None  # judged: nothing new
    j.offer("weights.tiny", weights_message(blob(2, 0.6), 50, TINY))
    assert j.due() is None  # 40 batches and no time later: not yet
    now[0] = 121.0
    assert j.due().batch == 50  # two minutes passed with newer weights
    j.record(j.due(), pooled, None, 1.0)
    j.offer("weights.tiny", weights_message(blob(3, 0.6), 150, TINY))
    assert j.due().batch == 150  # 100 batches on


def test_versions_on_their_own_topics_take_turns():
    j = Judge(JudgeConfig(seeds=[9001]), TINY)
    a = weights_message(blob(1, 0.6), 10, TINY)
    b = weights_message(blob(2, 0.6), 20, TINY)
    b.run = "tiny_v2"
    assert j.offer("weights.tiny.tiny_v1", a) and j.offer("weights.tiny.tiny_v2", b)
    first = j.due()
    assert first.version in ("tiny_v1", "tiny_v2")
    j.record(first, {"km": 0, "km_between_unstucks": 0, "on_road_fraction": 1, "collisions_per_km": 0,
                     "mean_speed_kmh": 0, "unstucks": 0}, None, 1.0)  # fmt: skip
    second = j.due()
    assert second is not None and second.run != first.run


def test_refusals_name_their_reason_and_keep_the_weights_held():
    j = Judge(JudgeConfig(seeds=[9001]), TINY)
    j.offer("weights.tiny", weights_message(blob(1, 0.6), 10, TINY))
    other = get_config("tiny_memory")
    cases = [
        (weights_message(blob(1, 0.6, other.to_json()), 11, other, model="tiny_memory"), "wrong_model"),
        (weights_message(blob(1, 0.6, TINY.replace(width=128).to_json()), 12, TINY), "config_mismatch"),
        (weights_message(b"\x00" * 64, 13, TINY), "not_safetensors"),
        (weights_message(blob(1, 0.6), 5, TINY), "older_batch"),
    ]
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    cases.append((weights_message(buf.getvalue(), 14, TINY), "pickle"))
    for w, reason in cases:
        with pytest.raises(WeightsError) as e:
            j.offer("weights.tiny", w)
        assert e.value.reason == reason, (reason, str(e.value))
    assert j.held() == {"tiny_v1": 10}
    assert not j.ours("weights.tiny_memory") and j.ours("weights.tiny") and j.ours("weights.tiny.v3")


# ---------------------------------------------------------------------------------------------- service


@pytest.mark.slow
def test_real_weights_are_judged_and_the_score_reaches_bus_metrics_tensorboard_and_console(
    judge, broker, client_factory, tmp_path
):
    (tmp_path / "runs" / "tiny" / "tiny_v1").mkdir(parents=True)  # the trainer's run folder
    listen = score_listener(client_factory)
    publish = publisher(client_factory, broker)
    service = judge()
    publish("weights.tiny", weights_message(blob(1, 0.6), 40, TINY))
    wait_for(lambda: service.judge.judgings >= 1, 120, "no judging finished")
    wait_for(lambda: any(e.topic == "score.tiny_v1" for e in listen()), 10, "no score on the bus")
    env = next(e for e in listen(0) if e.topic == "score.tiny_v1")
    s: Score = env.msg
    assert isinstance(s, Score) and (s.model, s.run, s.batch, s.seeds) == ("tiny", "tiny_v1", 40, [9001])
    assert s.figures.km > 0.01 and 0 <= s.figures.on_road_fraction <= 1  # throttle 0.6: the car moves
    assert s.reference is not None and s.reference.km > 0.01  # the NPC on the same town
    assert s.curve[-1][0] == 40 and s.curve[-1][2] == pytest.approx(s.figures.km_between_unstucks)

    reg = service.svc.metrics.registry
    # the loop sends the score, then sets the gauges, then writes TensorBoard (its first import: seconds)
    wait_for(lambda: counter_value(reg, "charles_judge_judgings_total") == 1, 10, "no judging in /metrics")
    assert counter_value(reg, "charles_judge_batch", {"run": "tiny_v1"}) == 40
    kmbu = counter_value(reg, "charles_judge_km_between_unstucks", {"run": "tiny_v1", "driver": "model"})
    assert kmbu == pytest.approx(s.figures.km_between_unstucks)
    assert counter_value(reg, "charles_judge_on_road_fraction", {"run": "tiny_v1", "driver": "npc"}) > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    def scalars() -> list:
        acc = EventAccumulator(str(tmp_path / "runs" / "tiny" / "tiny_v1" / "tb" / "judge"))
        acc.Reload()
        return (
            acc.Scalars("judge/km_between_unstucks")
            if "judge/km_between_unstucks" in acc.Tags()["scalars"]
            else []
        )

    wait_for(scalars, 60, "no judge scalars in the run's TensorBoard folder (tb/judge)", interval=0.5)
    (ev,) = scalars()
    assert ev.step == 40 and ev.value == pytest.approx(s.figures.km_between_unstucks, rel=1e-5)

    wait_for(lambda: service.state()["curves"].get("tiny_v1"), 5, "no curve on the console")
    assert service.state()["curves"]["tiny_v1"][-1][0] == 40

    # the same weights again (the broker's snapshot, a duplicate): not judged twice
    publish("weights.tiny", weights_message(blob(1, 0.6), 40, TINY), until=lambda: True)
    time.sleep(1.0)
    assert service.judge.due() is None and service.judge.judgings == 1


@pytest.mark.slow
def test_bad_weights_are_counted_as_rejects_and_never_stop_the_judge(judge, broker, client_factory):
    publish = publisher(client_factory, broker)
    service = judge(reference=False)
    reg = service.svc.metrics.registry

    def refused(reason: str):
        return lambda: counter_value(reg, "charles_rejects_total", {"reason": reason}) >= 1

    other = get_config("tiny_memory")
    # another line's weights on our topic, garbage, a pickle: each a named reject
    publish("weights.tiny", weights_message(blob(1, 0.6, other.to_json()), 5, other, model="tiny_memory"),
            until=refused("wrong_model"))  # fmt: skip
    publish("weights.tiny", weights_message(b"garbage" * 40, 6, TINY), until=refused("not_safetensors"))
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(3)}, buf)
    publish("weights.tiny", weights_message(buf.getvalue(), 7, TINY), until=refused("pickle"))
    # another line's own topic shares our prefix: not ours, not a reject
    publish(
        "weights.tiny_memory", weights_message(blob(1, 0.6, other.to_json()), 8, other, model="tiny_memory")
    )
    assert service.judge.held() == {} and service.judge.judgings == 0
    assert counter_value(reg, "charles_rejects_total", {"reason": "wrong_model"}) >= 1
    # and good weights after all that are judged
    publish("weights.tiny", weights_message(blob(2, 0.6), 9, TINY))
    wait_for(lambda: service.judge.judgings >= 1, 120, "the judge stopped judging after bad input")
    assert service.svc.health()["healthy"]


@pytest.mark.slow
def test_judge_process_publishes_scores_serves_metrics_and_stops_on_sigterm(broker, client_factory, tmp_path):
    """The real entry point: the run's configuration from the broker, the trainer's weights, a score on
    the bus and in /metrics, SIGTERM."""
    from conftest import free_ports

    _, data = broker
    listen = score_listener(client_factory)
    publish = publisher(client_factory, broker)
    publish("weights.tiny", weights_message(blob(1, 0.6), 42, TINY))
    (http_port,) = free_ports(1)
    env = {
        **os.environ,
        "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]),
        "CHARLES__SERVICE__HTTP_PORT": str(http_port),
        "CHARLES_RUN_DIR": str(tmp_path / "runs"),
        "CHARLES__SIM__BLOCKS": "3",
        "CHARLES__JUDGE__SEEDS": "[9001]",
        "CHARLES__JUDGE__MINUTES": "0.05",
        "CHARLES__JUDGE__REFERENCE": "false",
    }
    cmd = [sys.executable, "-m", "charles.judge", "--id", "judge-smoke"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{http_port}"

    def metrics() -> str:
        if proc.poll() is not None:
            raise AssertionError(f"the judge exited with {proc.returncode}: {proc.stdout.read().decode()}")
        try:
            with urllib.request.urlopen(url + "/metrics", timeout=1) as r:
                return r.read().decode()
        except OSError:
            return ""

    try:
        wait_for(
            lambda: "charles_judge_judgings_total 1.0" in metrics(), 120, "the judge process never judged"
        )
        text = metrics()
        assert 'charles_judge_batch{run="tiny_v1"} 42.0' in text
        wait_for(lambda: any(e.topic == "score.tiny_v1" for e in listen()), 10, "no score on the bus")
        with urllib.request.urlopen(url + "/healthz", timeout=1) as r:
            assert json.load(r)["healthy"]
        assert os.getpriority(os.PRIO_PROCESS, proc.pid) >= 10  # niced: training keeps its cores
        stop_by_sigterm(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_listed_judge_metrics_are_what_the_judge_exposes():
    from prometheus_client import CollectorRegistry
    from test_topology import _assert_listed_as_exposed, _exposed

    from charles import topology as t
    from charles.judge.service import JudgeMetrics
    from charles.proto import ScoreFigures

    reg = CollectorRegistry()
    m = JudgeMetrics(reg)
    f = ScoreFigures(km=1.0, km_between_unstucks=1.0, on_road_fraction=0.9, collisions_per_km=0.0,
                     mean_speed_kmh=30.0, unstucks=0)  # fmt: skip
    m.show(Score(model="tiny", run="tiny_v1", batch=5, created=0.0, seeds=[9001], minutes=1.0, figures=f,
                 reference=f, wall_s=2.0))  # fmt: skip
    m.weights.inc()
    exposed = _exposed(reg)
    _assert_listed_as_exposed("judge", exposed)
    listed = {n for x in t.METRICS.values() if x.owner == "judge" for n in t.exposed_names(x)}
    assert set(exposed) == listed
    m.forget("tiny_v1")  # a version forgotten past judge.max_versions leaves no series behind
    assert not any(s.labels.get("run") == "tiny_v1" for fam in reg.collect() for s in fam.samples)
