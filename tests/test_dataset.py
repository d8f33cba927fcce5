"""Datasets on real files and real processes: the shard format, bad data, record -> replay.

- the writer and readers on a temporary folder: exact round trip, rotation and bounds, the manifest, append;
- bad data made for real (a shard cut short, bytes flipped in a record and in a tar header): skipped and
  counted by the reader and by a replaying collector's source, never raised;
- ``charles record`` (a subprocess) on a live broker with a publisher of real Samples -> shards ->
  ``charles collector --source dataset:PATH`` (a subprocess) -> a subscriber gets the same samples;
- ``charles dataset info|plot`` on what was recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import threading
import time

import cv2
import numpy as np
import pytest

from charles.dataset import DatasetWriter, SkipCounter, envelopes, load_manifest, records, samples, shards
from charles.proto import Frame, Sample, decode, encode

from tests_support import counter_value, stop_by_sigterm, wait_for


def real_samples(n: int, collector: str = "c0", seed: int = 0) -> list[Sample]:
    """Samples as a collector sends them: a JPEG frame each, a history, labels that change."""
    rng = np.random.default_rng(seed)
    out = []
    for k in range(n):
        img = rng.integers(0, 255, (18, 32, 3), dtype=np.uint8)
        ok, jpg = cv2.imencode(".jpg", img)
        assert ok
        steer, tb = float(np.sin(k / 7)), float(np.cos(k / 11))
        out.append(
            Sample(
                collector=collector,
                seq=k,
                game_time=k / 30,
                frame=Frame(data=jpg.tobytes(), codec="jpeg", shape=(18, 32, 3)),
                steering=steer,
                throttle_brake=tb,
                speed=float(k % 13),
                purpose=(0.1 * (k % 5), 20.0 + k),
                history=rng.standard_normal((4, 5)).astype(np.float32),
                previous=(steer, tb) if k else None,
                source="npc" if k % 3 else "human",
            )
        )
    return out


def same(a: Sample, b: Sample) -> bool:
    """What a sample teaches: frame bytes and shape, labels, speed, purpose, history, previous, who drove."""
    return (
        bytes(a.frame.data) == bytes(b.frame.data)
        and tuple(a.frame.shape) == tuple(b.frame.shape)
        and a.frame.codec == b.frame.codec
        and (a.steering, a.throttle_brake, a.speed, a.game_time, a.source)
        == (b.steering, b.throttle_brake, b.speed, b.game_time, b.source)
        and tuple(a.purpose) == tuple(b.purpose)
        and (a.previous is None) == (b.previous is None)
        and (a.previous is None or tuple(a.previous) == tuple(b.previous))
        and np.array_equal(np.asarray(a.history), np.asarray(b.history))
    )


def write(root, items: list[Sample], **kw) -> DatasetWriter:
    with DatasetWriter(root, **kw) as w:
        for s in items:
            frames = encode(f"sample.{s.collector}", s, s.collector)
            assert w.write(frames, decode(frames))
    return w


# ---------------------------------------------------------------------------------------------- format


def test_records_round_trip_exactly_and_shards_rotate_by_count_and_size(tmp_path):
    items = real_samples(50)
    write(tmp_path / "a", items, shard_records=20)
    assert [p.name for p in shards(tmp_path / "a")] == [f"shard-{i:06d}.tar" for i in range(3)]
    got = list(samples(tmp_path / "a"))
    assert len(got) == 50 and all(same(a, b) for a, b in zip(items, got, strict=True))

    # by size: every shard stays under the bound (a record is ~4 KB here)
    write(tmp_path / "b", items, shard_bytes=16_384)
    sizes = [p.stat().st_size for p in shards(tmp_path / "b")]
    assert len(sizes) > 5 and max(sizes) <= 16_384 + 10_240  # + tar's end blocks, padded to its record size


def test_the_manifest_counts_and_appending_continues_the_numbering(tmp_path):
    write(tmp_path, real_samples(30, "c0"), shard_records=25)
    write(tmp_path, real_samples(10, "c1"), shard_records=25)  # a second recording appends
    m = load_manifest(tmp_path)
    assert m["records"] == m["samples"] == 40
    assert m["collectors"] == {"c0": 30, "c1": 10}
    assert m["topics"] == {"sample.c0": 30, "sample.c1": 10}
    assert m["sources"]["npc"] + m["sources"]["human"] == 40
    assert [s["name"] for s in m["shards"]] == [p.name for p in shards(tmp_path)]
    assert all(s["complete"] for s in m["shards"]) and len(m["shards"]) == 3
    assert m["wire_schema"] == 1 and m["first_wall"] <= m["last_wall"]
    keys = set()
    for p in shards(tmp_path):
        with tarfile.open(p) as t:
            keys |= {name.split(".")[0] for name in t.getnames()}
    assert len(keys) == 40  # a record's key is unique in the whole dataset


def test_the_dataset_is_bounded(tmp_path):
    items = real_samples(10)
    with DatasetWriter(tmp_path, max_records=6) as w:
        ok = [w.write(f, decode(f)) for f in (encode("sample.c0", s, "c0") for s in items)]
    assert ok == [True] * 6 + [False] * 4 and w.full
    assert len(list(records(tmp_path))) == 6


def test_frames_are_browsable_files_in_the_tar(tmp_path):
    write(tmp_path, real_samples(3))
    with tarfile.open(shards(tmp_path)[0]) as t:
        names = t.getnames()
        jpg = t.extractfile(names[2]).read()
    assert names[:3] == ["0000000000.meta.msgpack", "0000000000.header.msgpack", "0000000000.0.jpg"]
    assert cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR).shape == (18, 32, 3)
    if shutil.which("tar"):  # and the system's tar agrees, warnings included
        out = subprocess.run(["tar", "tvf", str(shards(tmp_path)[0])], capture_output=True, text=True)
        assert out.returncode == 0 and not out.stderr, out.stderr
        assert len(out.stdout.splitlines()) == 3 * 4  # meta, header, frame, history per record


def test_balanced_sets_are_recorded_and_replay_as_their_samples(tmp_path):
    from charles.proto import SampleSet

    items = real_samples(12)
    with DatasetWriter(tmp_path) as w:
        for k in range(3):
            frames = encode("set.steering", SampleSet(["steering"], 3, items[4 * k : 4 * k + 4], seq=k), "b")
            assert w.write(frames, decode(frames))
    assert load_manifest(tmp_path)["samples"] == 12 and load_manifest(tmp_path)["records"] == 3
    got = list(samples(tmp_path))
    assert len(got) == 12 and all(same(a, b) for a, b in zip(items, got, strict=True))


def test_a_crash_while_recording_leaves_one_short_shard_and_every_record_before_it(tmp_path):
    items = real_samples(25)
    w = DatasetWriter(tmp_path, shard_records=10)
    for s in items:
        frames = encode("sample.c0", s, "c0")
        w.write(frames, decode(frames))
    w._file.close()  # the process dies here: no end-of-archive blocks, no final manifest
    m = load_manifest(tmp_path)
    assert [s["complete"] for s in m["shards"]] == [True, True, False]
    skipped = SkipCounter()
    got = list(samples(tmp_path, skipped))
    assert skipped.counts == {"truncated_shard": 1}
    assert len(got) == 25 and all(same(a, b) for a, b in zip(items, got, strict=True))
    write(tmp_path, real_samples(5, "c1"))  # the next recording recounts the short shard, appends after it
    assert [p.name for p in shards(tmp_path)][-1] == "shard-000003.tar"
    assert len(list(samples(tmp_path))) == 30
    m = load_manifest(tmp_path)
    assert m["records"] == m["samples"] == 30 and m["collectors"] == {"c0": 25, "c1": 5}
    assert [(s["records"], s["complete"]) for s in m["shards"]] == [
        (10, True),
        (10, True),
        (5, False),
        (5, True),
    ]
    keys = set()
    for p in shards(tmp_path):
        with tarfile.open(p, ignore_zeros=True) as t:
            keys |= {name.split(".")[0] for name in t.getnames()}
    assert len(keys) == 30


# ---------------------------------------------------------------------------------------------- bad data


def damage(root) -> None:
    """Cut shard 1 in the middle of a record; flip bytes in a frame of shard 0 and in a member header of
    shard 2 (its name field: tar's header checksum no longer holds)."""
    first, second, third = shards(root)[:3]
    data = second.read_bytes()
    second.write_bytes(data[: len(data) // 2 + 700])
    with tarfile.open(first) as t:
        frame = [m for m in t.getmembers() if m.name.endswith(".0.jpg")][4]
    b = bytearray(first.read_bytes())
    b[frame.offset_data + 40] ^= 0xFF
    first.write_bytes(bytes(b))
    with tarfile.open(third) as t:
        header = [m for m in t.getmembers() if m.name.endswith(".header.msgpack")][6]
    b = bytearray(third.read_bytes())
    b[header.offset + 3] ^= 0x5A
    third.write_bytes(bytes(b))


def test_a_truncated_shard_and_corrupt_records_are_skipped_and_counted(tmp_path):
    items = real_samples(60)
    write(tmp_path, items, shard_records=20)
    damage(tmp_path)
    skipped = SkipCounter()
    got = list(samples(tmp_path, skipped))
    assert skipped.counts == {"truncated_shard": 1, "corrupt_record": 2}, skipped.first
    # whatever was read is exactly what was written (no damaged record slips through)
    by_seq = {s.seq: s for s in items}
    assert all(same(by_seq[s.seq], s) for s in got)
    # shard 0 and 2 lose one record each; shard 1 keeps its first half
    assert 19 + 19 + 5 <= len(got) < 19 + 19 + 20
    (tmp_path / "shard-000009.tar").write_bytes(b"not a tar at all" * 100)
    skipped = SkipCounter()
    assert len(list(envelopes(tmp_path, skipped))) == len(got)
    assert skipped.counts["unreadable_shard"] == 1


def test_a_replaying_source_survives_bad_data_and_counts_it(tmp_path):
    from charles.collector.sources import DatasetSource

    write(tmp_path, real_samples(60), shard_records=20)
    damage(tmp_path)
    rejected = []
    src = DatasetSource(str(tmp_path), loop=True, reject=lambda reason, detail: rejected.append(reason))
    got = [src.next() for _ in range(150)]  # past the end: a second pass
    assert all(isinstance(s, Sample) for s in got) and src.passes >= 2
    assert rejected.count("corrupt_record") >= 2 and rejected.count("truncated_shard") >= 1
    once = DatasetSource(str(tmp_path), loop=False)
    n = 0
    while once.next() is not None:
        n += 1
    assert once.finished and n < 60 and once.info()["skipped"] == 3


# ---------------------------------------------------------------------------------------------- processes


def _env(data: dict) -> dict:
    return {**os.environ, "CHARLES__BUS__PORTS": json.dumps(data["bus"]["ports"]), "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_record_from_the_bus_then_replay_through_a_collector_process(broker, client_factory, tmp_path):
    """charles record on a live bus -> shards -> charles collector --source dataset:PATH -> the same samples."""
    _, data = broker
    env = _env(data)
    root = tmp_path / "drive"
    log = open(tmp_path / "record.log", "w+b")  # noqa: SIM115 - closed below
    rec = subprocess.Popen(
        [sys.executable, "-m", "charles.record", "--out", str(root), "--shard-records", "40"],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    items = real_samples(120, "pub-0")
    pub = client_factory("collector").publisher("sample")
    try:
        wait_for(lambda: b"recording sample." in (tmp_path / "record.log").read_bytes(), 30, "no recorder")
        time.sleep(1.0)  # the slow-joiner rule: the recorder's subscription reaches the publisher
        for s in items:
            assert pub.send("sample.pub-0", s)
            time.sleep(0.003)
        # the last shard's records reach the manifest at close; its file has them already
        wait_for(lambda: len(list(records(root))) >= 120 or rec.poll() is not None, 10, "records not on disk")
        stop_by_sigterm(rec)
    finally:
        if rec.poll() is None:
            rec.kill()
        log.close()
    m = load_manifest(root)
    assert m["records"] == 120 and len(m["shards"]) == 3 and all(s["complete"] for s in m["shards"])
    recorded = list(samples(root))
    assert all(same(a, b) for a, b in zip(items, recorded, strict=True))

    # replay into a real balancer: the collector stops by itself at the end (dataset_loop false), paced
    # at 4x real time
    from test_balancer_service import connect

    from charles.balancer.service import BalancerService

    third = [[-1.0, -0.3], [-0.3, 0.3], [0.3, 1.0]]
    bsvc = client_factory(
        "balancer",
        balancer={"version": 3, "bins": {"steering": third, "throttle_brake": third}, "picture_s": 0},
    )
    balancer = BalancerService(bsvc, bsvc.cfg.balancer)
    bt = threading.Thread(target=balancer.run, daemon=True)
    bt.start()
    sets = client_factory("trainer").subscriber(["set."], late_join=False)
    reg = bsvc.metrics.registry
    heard = lambda: counter_value(reg, "charles_rejects_total", {"reason": "truncated"}) > 0  # noqa: E731
    connect(heard, client_factory("probe").publisher("sample"), sets)
    sub = client_factory("viewer").subscriber(["sample.replay-0"], late_join=False)
    time.sleep(0.3)
    cmd = [
        *[sys.executable, "-m", "charles.collector", "--id", "replay-0", "--realtime"],
        *[
            "--source",
            f"dataset:{root}",
            "--set",
            "collector.dataset_loop=false",
            "--set",
            "collector.pace=4",
        ],
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    got = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (proc.poll() is None or len(got) < 120):
        e = sub.recv(100)
        if e is not None:
            got.append(e.msg)
        elif proc.poll() is not None:
            break
    out = proc.communicate(timeout=20)[0].decode()
    assert proc.returncode == 0, out
    assert "the end of the dataset" in out
    # its own id and a seq without gaps; the rest exactly as recorded (the first few may meet the
    # slow-joiner rule: the subscription reaching a brand-new publisher)
    assert len(got) >= 110, out
    assert [s.seq for s in got] == list(range(got[0].seq, got[0].seq + len(got)))
    assert all(s.collector == "replay-0" and same(items[s.seq], s) for s in got)
    # and in the balancer's sets, each sample as recorded (stop flushes what it holds)
    bsvc.stop()
    bt.join(5)
    balanced = [x for env in sets.drain() if env.topic != "set.probe" for x in env.msg.samples]
    assert len(balanced) >= 30, len(balanced)
    assert all(x.collector == "replay-0" and same(items[x.seq], x) for x in balanced)


@pytest.mark.slow
def test_dataset_info_and_plot_commands(tmp_path):
    write(tmp_path / "d", real_samples(200, "c0") + real_samples(100, "c1", seed=1), shard_records=100)
    run = [sys.executable, "-m", "charles.cli", "dataset"]
    info = json.loads(subprocess.check_output([*run, "info", str(tmp_path / "d")], env=_env_plain()))
    assert info["samples"] == info["records"] == 300 and info["shards"] == 3
    assert info["collectors"] == {"c0": 200, "c1": 100} and info["skipped"] == {}
    assert -1 <= info["labels"]["steering"]["min"] < info["labels"]["steering"]["max"] <= 1
    out = subprocess.check_output([*run, "plot", str(tmp_path / "d"), "--out", str(tmp_path / "p.png")])
    summary = json.loads(out.splitlines()[-1])
    assert summary["samples"] == 300
    png = cv2.imread(str(tmp_path / "p.png"))
    assert png is not None and png.shape[0] > 100


def _env_plain() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
@pytest.mark.system
def test_record_then_train_offline_on_the_replay_with_the_same_pipeline(tmp_path):
    """charles up (sim) + charles record -> a dataset; then charles up with collector.source dataset:PATH
    (no sim anywhere): the same balancer and trainer train on the replay and publish weights."""
    from test_survive_pipeline import CONFIG

    from survive_support import Pipeline, Probe

    base = {k: v for k, v in CONFIG.items() if k != "player"}
    root = tmp_path / "drive"
    for name in ("live", "offline"):
        (tmp_path / name).mkdir()
    # the live drive at full pace whatever the trainer asks (flow control would slow it to the trainer's need)
    drive = {**base, "collector": {**base["collector"], "flow": False}}
    live = Pipeline(tmp_path / "live", drive, collectors=1, extra=["--no-player", "--no-viewer"])
    try:
        bus = live.bus()
        wait_for(lambda: live.healthy("collector-1"), 120, "the sim collector never came up")
        env = {**_env({"bus": {"ports": bus}}), "CHARLES_HTTP_EPHEMERAL": "1"}
        rec = subprocess.Popen(
            [sys.executable, "-m", "charles.record", "--out", str(root), "--max-records", "300"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        out = rec.communicate(timeout=240)[0].decode()  # it stops by itself at its bound
        assert rec.returncode == 0 and "at its bound" in out, out
    finally:
        assert live.close() == 0
    recorded = load_manifest(root)
    assert recorded["samples"] == recorded["records"] == 300, recorded

    offline = {**base, "collector": {**base["collector"], "source": f"dataset:{root}"}}
    replay = Pipeline(tmp_path / "offline", offline, collectors=1, extra=["--no-player", "--no-viewer"])
    probe = None
    try:
        probe = Probe(replay.bus(), ["weights.", "sample."])
        wait_for(
            lambda: (s := replay.try_scrape("trainer")) and s.value("charles_trainer_batches_total") >= 3,
            300,
            "the trainer never trained on the replay",
        )
        weights = lambda: any(t.startswith("weights.") for t in list(probe.count))  # noqa: E731 - any version
        wait_for(weights, 120, "no weights from training on the replay")
        assert "collecting from dataset:drive" in replay.log("collector-1")
        assert "rejected" not in replay.log("collector-1")
    finally:
        if probe is not None:
            probe.close()
        rc = replay.close()
    assert rc == 0
