"""``charles record``: write what crosses the bus to a dataset (charles.dataset: tar shards + manifest).

    charles record --out data/drive1                 # every sample.* until Ctrl-C / SIGTERM
    charles record --out data/sets --sets            # the balancer's set.* instead (balanced data)
    charles record --out d --seconds 600 --max-mb 2048 --shard-mb 128

Each message is validated by the wire codec as any receiver does (a bad one is counted and not written)
and stored byte for byte, so replaying it (``collector.source: dataset:PATH``) gives back exactly what was
sent. Recording into an existing dataset appends new shards. The whole is bounded (``--max-mb``,
``--max-records``): recording stops at the bound.
"""

from __future__ import annotations

import argparse
import sys
import time

import zmq

from charles import config as config_mod
from charles.cli import help_text
from charles.dataset import DatasetWriter
from charles.proto import Sample, SampleSet, registry
from charles.proto.registry import subscribe_port
from charles.runtime import SeqGaps, Service, run_main, run_service

POLL_MS = 100
"""SIGTERM only sets a flag: the loop looks at it this often when nothing arrives."""


def record(svc: Service, writer: DatasetWriter, prefixes: list[str], seconds: float = 0.0) -> int:
    """Subscribe to ``prefixes`` and write every valid message until stopped, the time is up, or the
    dataset is full; returns the records written."""
    reg = registry()
    families = [t for p in prefixes if (t := reg.topic(p)) is not None]
    hwm = max((t.hwm for t in families), default=1000)
    limit = max((t.max_bytes for t in families), default=None)
    sock = svc.socket(zmq.SUB, hwm=hwm, max_bytes=2 * limit if limit else None)
    for p in prefixes:
        sock.setsockopt(zmq.SUBSCRIBE, p.encode())
    for lane in reg.lanes_of(prefixes):
        sock.connect(svc.endpoints[subscribe_port(lane)])
    svc.ready()
    svc.log.info(f"recording {', '.join(p + '*' for p in prefixes)} to {writer.root}")
    end = time.monotonic() + seconds if seconds > 0 else float("inf")
    written = 0
    last_log = time.monotonic()
    # what never reached us (a full queue on the way): samples and sets are numbered per sender
    gaps = SeqGaps(drops=svc.metrics.drops)
    lost = svc.metrics.drops.labels(cause="record_lost")
    while svc.running and time.monotonic() < end:
        if not sock.poll(POLL_MS):
            continue
        frames = sock.recv_multipart(copy=False)
        env = svc.decode(frames)  # counted by reason and skipped when invalid
        if env is None:
            continue
        if not writer.write(frames, env):
            svc.metrics.drops.labels(cause="dataset_full").inc()
            svc.log.info(f"{writer.root} is at its bound ({writer.manifest['records']} records): stopping")
            break
        written += 1
        svc.metrics.messages.labels("in", reg.family(env.topic)).inc()
        msg = env.msg
        if isinstance(msg, Sample) or (isinstance(msg, SampleSet) and msg.seq is not None):
            sender = msg.collector if isinstance(msg, Sample) else env.topic
            if missing := gaps.see(sender, msg.seq):
                lost.inc(missing)
        if time.monotonic() - last_log > 10:
            last_log = time.monotonic()
            m = writer.manifest
            svc.log.info(
                f"{m['records']} records, {m['bytes'] / 2**20:.1f} MB in {len(m['shards'])} shard(s)"
            )
    return written


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles record", description=help_text(__doc__.split("\n\n")[0]))
    config_mod.add_arguments(ap, "run configuration file (default: $CHARLES_CONFIG): the broker's address")
    ap.add_argument("--out", required=True, help="dataset folder (created; an existing one is appended to)")
    ap.add_argument("--sets", action="store_true", help="record the balanced set.* instead of sample.*")
    ap.add_argument("--topic", action="append", default=[], help="topic prefix to record (repeatable)")
    ap.add_argument("--seconds", type=float, default=0.0, help="stop after this long (0: until SIGTERM)")
    ap.add_argument("--shard-mb", type=float, default=256.0, help="a shard rotates past this size")
    ap.add_argument(
        "--shard-records", type=int, default=10_000, help="a shard rotates past this many records"
    )
    ap.add_argument("--max-mb", type=float, default=50 * 1024.0, help="the whole dataset's bound")
    ap.add_argument("--max-records", type=int, default=10_000_000, help="the whole dataset's bound")
    ap.add_argument("--id", default="record", help="instance id (logs, metrics)")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, overrides=list(args.set))
        writer = DatasetWriter(
            args.out,
            shard_bytes=int(args.shard_mb * 2**20),
            shard_records=args.shard_records,
            max_bytes=int(args.max_mb * 2**20),
            max_records=args.max_records,
        )
    except ValueError as e:
        print(f"charles record: {e}", file=sys.stderr)
        return 2
    prefixes = args.topic or (["set."] if args.sets else ["sample."])

    def body(svc: Service) -> None:
        try:
            n = record(svc, writer, prefixes, args.seconds)
        finally:
            writer.close()
        m = writer.manifest
        svc.log.info(
            f"recorded {n} records; {writer.root} holds {m['records']} in {len(m['shards'])} shard(s)"
        )

    return run_service("record", cfg, body, args.id)


if __name__ == "__main__":
    run_main(main)
