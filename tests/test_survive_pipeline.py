"""The running pipeline survives a stalled trainer, a hostile publisher, and kill -9 of each service.

One ``charles up`` (broker, 4 sim collectors, balancer, trainer, player, viewer; the tiny model at 64x36)
serves the tests in this order, each leaving it healthy for the next:

1. backpressure: the trainer is stopped (SIGSTOP) while the collectors keep going; every process's memory
   stays bounded, every set sent meanwhile is either received after SIGCONT or counted as dropped, and
   training resumes;
2. bad input: a hostile publisher floods every topic family with malformed messages; nothing crashes,
   every reject is counted by reason where it lands, and no hostile sample reaches the trainer;
3. fault injection: broker, balancer, trainer, player and a collector are each killed with SIGKILL; the
   launcher restarts it, the others carry on without a restart, and the trainer resumes at its last
   checkpoint with its buffers refilled from disk; then rounds of kills (``CHARLES_KILLS``, 3 by default,
   20 for the full loop) of broker, balancer, player and a collector at random moments, with everyone
   progressing again after each kill, training going on after each round, and the trainer's files whole.

The collectors send raw frames with 1024 history rows (~28 KB a sample) and the balancer flushes a set
every quarter second, so a stalled trainer is owed far more than the kernel's socket buffers and the
broker's queue can hold: the pause must cost drops, and the test can tell a bounded queue from one that
grows. The broker's queue per subscriber of sets is 2 messages and one on the wire (``broker.queue_bytes``:
the bulk lane's messages may be 1 GB).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sqlite3
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from charles.model.presets import get_config
from charles.proto import Console, Frame, Heartbeat, Sample, SampleSet, Weights, encode
from charles.proto.messages import ConfigReply
from charles.trainer.checkpoint import list_checkpoints, read_checkpoint

from survive_support import Pipeline, Probe, resting_rss_mb, rss_growth_within, rss_mb, running, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.system]

PAUSE_S = float(os.environ.get("CHARLES_SURVIVE_PAUSE_S", "60"))
"""How long the trainer stays stopped: the issue's minute (about 140 MiB of sets owed to the trainer, several
times what the socket buffers and the broker's queue hold). 30 s proves the same if CI's budget tightens."""
FLOOD_S = float(os.environ.get("CHARLES_SURVIVE_FLOOD_S", "10"))
"""How long the hostile publisher floods at most. The issue says a minute; what matters is that every
receiver is saturated with every kind of bad message, which takes seconds (FLOOD_MAX usually ends it)."""
FLOOD_MAX = int(os.environ.get("CHARLES_SURVIVE_FLOOD_MAX", "1000000"))
MARK = "hostile"
"""Every hostile sample's collector id contains this: it must never show up in a set or in storage."""
SLACK_MB = 48.0
"""Memory a process may gain beyond 1.5x its pre-pause size (allocator noise, a refilled buffer)."""

H, W = 36, 64
CONFIG = {
    "model": {"preset": "tiny", "overrides": {"width": W, "height": H}},
    "collector": {"realtime": True, "codec": "raw", "history_rows": 1024, "console_s": 1.0},
    "balancer": {"set_timeout_s": 0.25, "picture_s": 0},
    "trainer": {
        "batch_size": 4,
        "buffer": {"capacity": 64, "start_fraction": 0.25},
        "checkpoint_every": 3,
        "publish_every": 3,
        "keep_checkpoints": 3,
        "decode_threads": 1,
        "prefetch": 1,
        "torch_threads": 1,
        "console_hz": 2,
    },
    "player": {
        "threads": 1,
        "console_hz": 1,
        "camera_hz": 0,  # nobody watches: the console's pictures are enough here
        "console_width": 128,
        "terminal": False,
        "swap": "immediate",
        "convcam": False,
    },
    "service": {"shutdown_s": 5, "reject_log_period_s": 5},
}


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    p = Pipeline(tmp_path_factory.mktemp("pipeline"), CONFIG, collectors=4)
    try:
        wait_for(
            lambda: (
                p.try_scrape("trainer") and p.scrape("trainer").value("charles_trainer_batches_total") >= 3
            ),
            240,
            "the pipeline never trained",
        )
        # Warmed up means the player too: it imports torch, builds its predictors and its town (a minute
        # at a load of 10; the trainer has its first batches long before) and keeps growing for its first
        # frames driven (alone: +11 MiB from prediction 430 to 950, a few more by 1700, flat after). A
        # baseline taken before is no baseline: the hostile test saw "player 802 -> 902" with no hostile
        # cost behind it (hostile weights at full speed, 268k sent, cost a warm player +0.1 MiB), and a
        # player whose weights feed was not even subscribed during the barrage.
        wait_for(lambda: warm(p), 240, "the player never drove trained weights for a while", 0.5)
        p.probe = Probe(p.bus(), ["sample.", "set.", "weights.", "console.", "heartbeat."], MARK)
        yield p
    finally:
        if hasattr(p, "probe"):
            p.probe.close()
        rc = p.close()
    assert rc == 0, f"charles up exited with {rc}; see {p.root}"


WARM_PREDICTIONS = 300
"""Frames the player has driven with trained weights before any test measures it (see the fixture)."""


def warm(p: Pipeline) -> bool:
    """The player drives trained weights, has swapped them at least once and made WARM_PREDICTIONS."""
    s = p.try_scrape("player")
    return bool(
        s
        and s.value("charles_player_weights_batch") >= 0
        and s.value("charles_player_swaps_total") >= 1
        and s.value("charles_player_predictions_total") >= WARM_PREDICTIONS
    )


def totals(p: Pipeline, trainer: bool = True) -> dict[str, float]:
    """The counters the backpressure test balances: sets out of the balancer, in or lost at the trainer
    (a stopped trainer does not answer HTTP: ``trainer=False`` then)."""
    b = p.scrape("balancer")
    out = {
        "sent": b.value("charles_messages_total", direction="out", topic="set"),
        "sent_bytes": b.value("charles_bytes_total", direction="out", topic="set"),
    }
    if trainer:
        t = p.scrape("trainer")
        out.update(
            received=t.value("charles_messages_total", direction="in", topic="set"),
            lost=t.value("charles_drops_total", cause="seq_gap"),
            evicted=t.value("charles_drops_total", cause="buffer_evicted"),
            batches=t.value("charles_trainer_batches_total"),
        )
    return out


# ---------------------------------------------------------------------------------------------- backpressure


def test_a_stalled_trainer_costs_bounded_memory_and_counted_drops(pipeline):
    p = pipeline
    pids = p.pids()
    pids["launcher"] = p.proc.pid
    before = {n: rss_mb(pid) for n, pid in pids.items()}
    peak = dict(before)
    t0 = totals(p)
    os.kill(pids["trainer"], signal.SIGSTOP)
    try:
        end = time.monotonic() + PAUSE_S
        while time.monotonic() < end:  # 1 Hz is plenty: a leak grows for the whole pause
            for n, pid in pids.items():
                peak[n] = max(peak[n], rss_mb(pid))
            time.sleep(1.0)
        t1 = totals(p, trainer=False)
    finally:
        os.kill(pids["trainer"], signal.SIGCONT)
    owed = t1["sent"] - t0["sent"]
    owed_mb = (t1["sent_bytes"] - t0["sent_bytes"]) / 2**20
    assert owed > 0, "the balancer sent nothing while the trainer was stopped"

    # every set sent during the pause arrives after it or is counted as lost (numbered sets, gaps counted)
    def accounted() -> dict | None:
        t = totals(p)
        return t if (t["received"] - t0["received"]) + (t["lost"] - t0["lost"]) >= owed else None

    t2 = wait_for(
        accounted, 90, "sets sent during the pause were neither received nor counted as lost", interval=0.5
    )
    wait_for(lambda: totals(p)["batches"] > t2["batches"] + 2, 90, "training did not resume after SIGCONT")
    after = {n: rss_mb(pid) for n, pid in pids.items()}

    lost = t2["lost"] - t0["lost"]
    evicted = t2["evicted"] - t0["evicted"]
    print(f"pause {PAUSE_S:.0f}s: {owed:.0f} sets ({owed_mb:.0f} MiB) owed to the trainer, {lost:.0f} lost, "
          f"{evicted:.0f} samples evicted on arrival; RSS MiB before/peak/after: "
          + ", ".join(f"{n} {before[n]:.0f}/{peak[n]:.0f}/{after[n]:.0f}" for n in pids))  # fmt: skip
    for n in pids:
        limit = 1.5 * before[n] + SLACK_MB
        assert peak[n] <= limit and after[n] <= limit, (
            f"{n} grew from {before[n]:.0f} MiB to {peak[n]:.0f} (during) / {after[n]:.0f} (after): unbounded?"
        )
    # The broker queues at most hwm messages per stalled peer, and one on the wire; the pause owed it far more.
    set_mb = owed_mb / owed
    hwm = p.scrape("broker").value("charles_broker_queue_hwm", queue="subscribe_bulk")
    assert peak["broker"] - before["broker"] <= (hwm + 1) * set_mb * 2 + 16, (
        "the broker queued beyond its hwm"
    )
    # What a stalled trainer costs is counted by cause: sets the full queue dropped, samples the backlog evicted.
    assert lost + evicted > 0, "a backlog this size must overflow something, and that must be counted"
    assert p.pids() == {n: pid for n, pid in pids.items() if n != "launcher"}, "a process restarted"
    assert all(p.healthy(n) for n in p.names)


# ---------------------------------------------------------------------------------------------- bad input


def _frames(topic: str, msg, kind: str | None = None) -> list[bytes]:
    return [bytes(f) if not isinstance(f, bytes) else f for f in encode(topic, msg, f"{MARK}-sender", kind)]


def _with(
    frames: list[bytes], header: dict | None = None, body: dict | None = None, drop: tuple = ()
) -> list[bytes]:
    """frames with header or body fields replaced (or dropped): what a buggy or hostile client sends."""
    h = msgpack.unpackb(frames[1], raw=False)
    h.update(header or {})
    h["body"].update(body or {})
    for k in drop:
        h["body"].pop(k, None)
    return [frames[0], msgpack.packb(h, use_bin_type=True), *frames[2:]]


def hostile_catalog() -> dict[str, list[list[bytes]]]:
    """Bad messages by the family they aim at. Every sample in them carries MARK in its collector id."""
    img = Frame.encode(np.full((H, W, 3), 77, np.uint8), "raw")
    hist = np.zeros((8, 5), np.float32)

    def sample(i: int = 0, **kw) -> Sample:
        return Sample(
            f"{MARK}-{i}", i, 1.0, kw.pop("frame", img), 0.1, 0.5, 5.0, (0.1, 20.0), kw.pop("history", hist)
        )

    s = _frames("sample.hostile-1", sample())
    nan_hist = _frames("sample.hostile-1", sample(history=np.full((8, 5), np.nan, np.float32)))
    samples = [
        [b"sample.hostile-1"],  # truncated
        [s[0], b"\xc1\xc1 not msgpack", *s[2:]],  # bad_header
        [s[0], msgpack.packb([1, 2, 3]), *s[2:]],  # bad_header: not a map
        _with(s, header={"v": 2}),  # bad_version
        _with(s, header={"kind": "teleport"}),  # unknown_kind
        _with(s, header={"kind": "weights"}),  # kind_mismatch
        _with(s, drop=("seq",)),  # missing_field
        _with(s, body={"steering": "hard left"}),  # bad_field
        _with(s, body={"steering": float("nan")}),  # nan
        nan_hist,  # nan (history)
        _with(s, body={"throttle_brake": 7.5}),  # out_of_range
        _with(s, body={"frame": {"codec": "raw", "shape": [H, W, 3], "blob": 9}}),  # bad_blob
        _with(s, body={"frame": {"codec": "raw", "shape": [0, W, 3], "blob": 0}}),  # bad_shape
        _with(s, body={"frame": {"codec": "raw", "shape": [H, W, 2], "blob": 0}}),  # bad_shape
        _with(s, body={"history": {"shape": [8, 6], "dtype": "float32", "blob": 1}}),  # bad_shape
        _with(s, body={"frame": {"codec": "gif", "shape": [H, W, 3], "blob": 0}}),  # bad_codec
        [s[0], s[1], b"\x00" * 100, s[3]],  # size_mismatch: raw frame of the wrong size
        [b"sample.\xff\xfe", *s[1:]],  # unknown_topic: not ASCII
    ]
    st = _frames(
        "set.steering", SampleSet(["steering"], 3, [sample(1), sample(2)], ["steering", "throttle_brake"])
    )
    bad_sample = _frames(
        "set.steering", SampleSet(["steering"], 3, [sample(3, frame=Frame("raw", (H, W, 3), b"\x01" * 10))])
    )
    nan_sample = msgpack.unpackb(st[1], raw=False)
    nan_sample["body"]["samples"][1]["speed"] = float("inf")
    sets = [
        [b"set.steering"],  # truncated
        [st[0], b"\xff" * 40, *st[2:]],  # bad_header
        _with(st, header={"v": 0}),  # bad_version
        _with(st, header={"kind": "sample"}),  # kind_mismatch
        _with(st, body={"version": 9}),  # out_of_range
        _with(st, drop=("samples",)),  # missing_field
        bad_sample,  # size_mismatch inside a set
        [st[0], msgpack.packb(nan_sample, use_bin_type=True), *st[2:]],  # nan inside a set
        [b"set.\xffsteering", *st[1:]],  # unknown_topic
    ]
    w = _frames(
        "weights.tiny", Weights("tiny", "tiny_v666", 666, {"name": "tiny"}, b"\x00" * 256, created=1.0)
    )
    weights = [
        [w[0], w[1], b"\x01" * 256],  # bad_checksum (payload swapped)
        _with(w, body={"created": float("nan")}),  # nan
        _with(w, body={"config": "pickle me"}),  # bad_field
        _with(w, header={"kind": "console"}),  # kind_mismatch
        [b"weights.tiny\xff", *w[1:]],  # unknown_topic (still matches the player's prefix)
        *(_with(w, body={"batch": 1000 + i, "model": "tiny_memory"}) for i in range(3)),  # wrong_model
        *(_with(w, body={"batch": 2000 + i}) for i in range(3)),  # config_mismatch / not safetensors
    ]
    c = _frames("console.hostile", Console("player", {"fps": 1}, {"hood": img}))
    consoles = [
        _with(c, header={"v": 3}),  # bad_version
        _with(c, body={"state": [1, 2]}),  # bad_field
        [c[0], c[1], b"\x00"],  # size_mismatch: the hood image is 1 byte
        [b"consolez", *c[1:]],  # unknown_topic (matches the viewer's "console" prefix)
        _with(c, header={"kind": "heartbeat"}),  # kind_mismatch
    ]
    hb = _frames("heartbeat.hostile", Heartbeat("trainer", "hostile"))
    heartbeats = [
        _with(hb, drop=("service",)),  # missing_field
        _with(hb, body={"uptime": float("inf")}),  # nan
        _with(hb, body={"uptime": "forever"}),  # bad_field
        [hb[0], b"", *hb[2:]],  # bad_header
        [*hb, b"\x00" * 70_000],  # oversize: heartbeats are at most 64 KiB
    ]
    cfg = _frames("config", ConfigReply({"run": "forged", "model": {"preset": "tiny_memory"}}), "config")
    other = [
        [b"config", b"\x93garbage"],  # bad_header on the broker's last-value family
        cfg,  # a valid-looking configuration from someone who is not the broker
        [b"game.x", *s[1:]],  # kind_mismatch (nobody subscribes: dropped at the sender)
        [b"action.x", b"\x00"],
        [b"nosuchfamily.x", *s[1:]],  # unknown_topic (nobody subscribes)
    ]
    # valid consoles on ever new topics: the broker's last-value cache must stay bounded and keep serving
    topics = [_frames(f"console.{MARK}-{i}", Console("player", {"i": i})) for i in range(100)]
    return {"sample": samples, "set": sets, "weights": weights, "console": consoles, "heartbeat": heartbeats,
            "other": other, "topics": topics}  # fmt: skip


class Flood:
    """A hostile PUB on the plain bus, sending the catalog round robin at full speed on its own thread."""

    def __init__(self, bus_ports: dict[str, int]):
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.PUB)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 1000)
        self.sock.connect(f"tcp://127.0.0.1:{bus_ports['publish']}")
        catalog = hostile_catalog()
        self.topics = catalog.pop("topics")
        self.messages = [m for ms in catalog.values() for m in ms]
        self.bulk = catalog["set"] + catalog["weights"]
        # oversize: a sample past the registry's max_bytes
        s = catalog["sample"][3]
        self.oversize = [b"sample.hostile-1", *_with(s, header={"v": 1})[1:], b"\x00" * 8_100_000]
        self.sent = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        end = time.monotonic() + FLOOD_S
        i = 0
        while time.monotonic() < end and self.sent < FLOOD_MAX:
            # 8 MB each: twenty are enough to be counted (some get past full queues), more only fill memory
            if i % 1000 == 999 and i < 20_000:
                msg = self.oversize
            elif i % 100 == 99:
                msg = self.topics[(i // 100) % len(self.topics)]
            else:
                msg = self.messages[i % len(self.messages)]
            i += 1
            try:
                self.sock.send_multipart(msg, flags=zmq.NOBLOCK)
                self.sent += 1
            except zmq.Again:
                time.sleep(0.001)  # at the high-water mark: everyone downstream is saturated already

    def run(self) -> None:
        self.thread.start()
        self.thread.join(FLOOD_S + 30)
        # The bulk lane's queues hold 3 messages (they are sized for 1 GB weights, broker.queue_bytes), so
        # at full speed a receiver of sets or weights takes what arrives when it has room, the broker counts
        # the rest as overflows, and which kinds got through is chance (a periodic catalog can even
        # line up with the receiver's pace). So each of them is also sent once more at a pace those
        # queues take: every kind must then be refused and counted by its receiver.
        for msg in self.bulk:
            self.sock.send_multipart(msg)
            self.sent += 1
            time.sleep(0.05)
        self.sock.close(linger=2000)
        self.ctx.term()


EXPECTED = {
    # service -> reject reasons that must have been counted there (what the catalog aims at it)
    "balancer": {"truncated", "bad_header", "bad_version", "unknown_kind", "kind_mismatch", "missing_field", "bad_field",
                 "nan", "out_of_range", "bad_blob", "bad_shape", "bad_codec", "size_mismatch", "unknown_topic"},
    "trainer": {"truncated", "bad_header", "bad_version", "kind_mismatch", "out_of_range", "missing_field",
                "size_mismatch", "nan", "unknown_topic", "bad_field"},
    "player": {"bad_checksum", "nan", "bad_field", "kind_mismatch", "unknown_topic", "wrong_model"},
    "viewer": {"bad_version", "bad_field", "size_mismatch", "unknown_topic", "kind_mismatch"},
    # the broker refuses what is over its family's max_bytes before anyone's queue holds it: no receiver sees it
    "broker": {"bad_checksum", "nan", "bad_field", "kind_mismatch", "unknown_topic", "bad_version", "size_mismatch",
               "oversize"},
}  # fmt: skip


def test_a_hostile_publisher_is_counted_and_never_reaches_training(pipeline):
    p = pipeline
    pids = p.pids()
    rss0 = resting_rss_mb(pids)  # warmed up: the pipeline has trained, the player has driven (the fixture)
    rejects0 = {n: p.scrape(n).by("charles_rejects_total", "reason") for n in EXPECTED}
    # the balancer's counts are a snapshot taken about once a second: wait for a fresh one, then count
    # what the collectors sent (so nothing it counts later was sent before sent0)
    stale = p.scrape("balancer").value("charles_balancer_samples_arrived_total")
    arrived0 = wait_for(
        lambda: (v := p.scrape("balancer").value("charles_balancer_samples_arrived_total")) != stale and v,
        30,
        "balancer counts never refresh",
        0.02,
    )
    sent0 = sum(p.scrape(c).value("charles_collector_samples_total") for c in p.collectors)

    flood = Flood(p.bus())
    flood.run()
    # what was queued drains; then every counter is read after the good samples it could include
    wait_for(lambda: all(p.healthy(n) for n in p.names), 60, "a service is unhealthy after the flood")
    time.sleep(2.0)
    arrived = p.scrape("balancer").value("charles_balancer_samples_arrived_total") - arrived0
    sent = sum(p.scrape(c).value("charles_collector_samples_total") for c in p.collectors) - sent0
    assert flood.sent > 1000, f"the flood sent only {flood.sent} messages"
    print(
        f"flood: {flood.sent} hostile messages in {FLOOD_S:.0f}s; balancer took {arrived:.0f} samples of {sent:.0f} sent"
    )

    assert p.pids() == pids, "a service restarted (crashed) under the flood"
    assert p.proc.poll() is None and running(p.proc.pid), "the launcher died"
    for n, reasons in EXPECTED.items():
        now = p.scrape(n).by("charles_rejects_total", "reason")
        rose = {r for r in now if now[r] > rejects0[n].get(r, 0)}
        assert reasons <= rose, f"{n} did not count rejects {sorted(reasons - rose)} (counted {sorted(rose)})"
    # The balancer only ever counts good samples: no more than the collectors sent (plus a few that were
    # on their way when the first counts were taken).
    assert arrived <= sent + 200, f"balancer took {arrived} samples, collectors sent {sent}"
    # No hostile sample in any set on the bus, in the trainer's view, or in its storage.
    assert p.probe.marked == 0, f"{p.probe.marked} hostile samples travelled in sets"
    assert not [c for c in p.state("trainer")["info"].get("collectors", []) if MARK in c]
    db = p.run_dir / "tiny" / "tiny_v1" / "storage" / "buffers.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        rows = conn.execute("SELECT COUNT(*) FROM samples").fetchone()[0]
        marked = conn.execute(
            "SELECT COUNT(*) FROM samples WHERE instr(record, ?) > 0", (MARK.encode(),)
        ).fetchone()[0]
    assert rows > 0 and marked == 0, f"{marked} of {rows} stored samples are hostile"
    # The broker still serves its own configuration (never the forged one) after 100 new console topics.
    from charles import config
    from charles.runtime import Service

    svc = Service(
        "checker",
        config.load(data={"bus": {"host": "127.0.0.1", "ports": p.bus()}}, environ={}),
        http=False,
        signals=False,
    )
    try:
        served = svc.fetch_config("collector", timeout_s=10)
    finally:
        svc.close()
    assert served["run"] == "charles" and served["model"]["overrides"] == {"width": W, "height": H}
    # and training goes on
    b = p.scrape("trainer").value("charles_trainer_batches_total")
    wait_for(
        lambda: p.scrape("trainer").value("charles_trainer_batches_total") > b + 2,
        90,
        "training stopped after the flood",
    )
    # and the barrage cost no service its memory (the broker's queues may hold up to broker.queue_bytes by
    # design: tests/test_broker_queues.py holds it to that)
    assert p.pids() == pids, "a service restarted (crashed) after the flood"
    rss_growth_within(rss0, pids, "after the hostile barrage", exempt=("broker",))


# ---------------------------------------------------------------------------------------------- kill -9


def progress(p: Pipeline, name: str) -> float:
    """A counter that rises only while ``name`` is connected and working (messages it received)."""
    s = p.scrape(name)
    if name == "broker":
        return s.value("charles_messages_total", direction="through")
    if name.startswith("collector"):
        return s.value("charles_collector_samples_total")
    topic = {"balancer": "sample", "trainer": "set", "player": "weights", "viewer": "console"}[name]
    return s.value("charles_messages_total", direction="in", topic=topic)


def kill_and_recover(p: Pipeline, victim: str) -> float:
    """SIGKILL ``victim``; the launcher restarts it, nobody else restarts, everyone makes progress again,
    samples, sets and weights cross the bus again. Returns the seconds from the kill to all of that."""
    t0 = time.monotonic()
    pids = p.pids()
    ckpt_dir = p.run_dir / "tiny" / "tiny_v1" / "checkpoints"
    log_mark = len(p.log("trainer"))
    os.kill(pids[victim], signal.SIGKILL)
    wait_for(lambda: not running(pids[victim]), 10, f"{victim} survived SIGKILL")
    newest = max((b for b, _ in list_checkpoints(ckpt_dir)), default=0)  # what the dead trainer left on disk
    new_pid = p.restarted(victim, pids[victim])

    if victim == "trainer":
        # resumed at the last checkpoint, with its buffers refilled from storage before any data arrived
        started = re.compile(r"tiny_v1: tiny on \w+, batch (\d+),")  # the last line of the trainer's start
        text = wait_for(
            lambda: (t := p.log("trainer")[log_mark:]) and started.search(t) and t, 60, "no start line"
        )
        assert f"resumed tiny_v1 from batch_{newest:09d} (batch {newest})" in text, text[-3000:]
        refilled = [int(x) for x in re.findall(r"refilled (\d+) samples", text)]
        assert refilled and refilled[0] > 0, "the restarted trainer refilled nothing from its storage"
        assert p.scrape("trainer").value("charles_trainer_batch") >= newest

    others = {n: pid for n, pid in pids.items() if n != victim}
    assert {n: pid for n, pid in p.pids().items() if n != victim} == others, "a bystander restarted"
    # everyone (the new process too) keeps receiving: counters rise after the restart
    mark = time.monotonic()
    base = {n: progress(p, n) for n in p.names}
    for n in p.names:
        wait_for(
            lambda n=n: progress(p, n) > base[n], 90, f"{n} made no progress after {victim} was restarted"
        )
    # every collector's samples cross the broker again, and sets and weights flow
    for c in p.collectors:
        wait_for(lambda c=c: p.probe.since(f"sample.{c}", mark), 60, f"no samples from {c} after the restart")
    wait_for(lambda: p.probe.topics_since("set.", mark), 60, "no sets after the restart")
    wait_for(lambda: p.probe.topics_since("weights.tiny", mark), 90, "no weights after the restart")
    assert all(p.healthy(n) for n in p.names)
    assert p.pid(victim) == new_pid
    return time.monotonic() - t0


@pytest.mark.parametrize("victim", ["broker", "balancer", "trainer", "player", "collector-2"])
def test_kill9_a_service_and_the_rest_carry_on(pipeline, victim):
    kill_and_recover(pipeline, victim)


KILLS = int(os.environ.get("CHARLES_KILLS", "3"))
"""Rounds of the kill loop: each round kills broker, balancer, player and a collector once, in a random order
at a random moment. `make test-system` runs 3; CHARLES_KILLS=20 is the issue's twenty kills of each."""
LOOP_VICTIMS = ["broker", "balancer", "player", "collector-3"]
"""The trainer has its own twenty kills, mid-training and mid-write (tests/test_survive_crashes.py)."""


@pytest.mark.timeout(max(300, KILLS * 240))  # four kills a round, each back within a minute
def test_kill9_each_service_again_and_again_and_training_goes_on(pipeline):
    p = pipeline
    seed = int(os.environ.get("CHARLES_SURVIVE_SEED", str(time.time_ns() % 2**31)))
    rng = np.random.default_rng(seed)
    print(f"kill loop seed {seed} (CHARLES_SURVIVE_SEED to replay)")
    took: dict[str, list[float]] = {v: [] for v in LOOP_VICTIMS}
    batches = [p.scrape("trainer").value("charles_trainer_batches_total")]
    for _ in range(KILLS):
        for victim in rng.permutation(LOOP_VICTIMS):
            time.sleep(float(rng.uniform(0.0, 2.0)))  # a random moment of its work, not right after a restart
            took[str(victim)].append(kill_and_recover(p, str(victim)))
        # the pipeline still trains after every round: batches rise
        b = batches[-1]
        wait_for(
            lambda b=b: p.scrape("trainer").value("charles_trainer_batches_total") > b,
            90,
            f"training stopped in round {len(batches)}",
        )
        batches.append(p.scrape("trainer").value("charles_trainer_batches_total"))
    for v, t in took.items():
        print(
            f"{v}: {len(t)} kills, back with everyone progressing in median {sorted(t)[len(t) // 2]:.1f}s, max {max(t):.1f}s"
        )
    print(f"trainer batches after each round: {[int(b) for b in batches]}")
    # no corrupt file: the trainer's storage and its newest checkpoint read back whole
    db = p.run_dir / "tiny" / "tiny_v1" / "storage" / "buffers.sqlite3"
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    ckpts = list_checkpoints(p.run_dir / "tiny" / "tiny_v1" / "checkpoints")
    assert ckpts, "no checkpoint after the kill loop"
    read_checkpoint(
        ckpts[-1][1], get_config("tiny", width=W, height=H)
    )  # raises CheckpointError if not whole
