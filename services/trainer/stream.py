"""``charles stream``: put a saved checkpoint on the bus for players, with no trainer running.

    charles stream tiny_v3@1200                  tiny_v3's checkpoint of batch 1200
    charles stream v3 --preset tiny              tiny_v3's newest checkpoint
    charles stream 3@1200                        the configured line's (model.preset) v3 at batch 1200

The seed's "Started streaming model_0003_xception_v1 from batch 24500 (pre-trained off-stream)" in one
command. The checkpoint is checked whole first (state.json's sizes and SHA-256s, safetensors only, the
version's own model), then its weights go out on ``weights.<line>.v<N>`` as a new *stream* of that version
(``since`` = now): the broker keeps them as that topic's last value, so players that join later get them
too; players following ``newest`` of the line or that version take them, ``<version>@<batch>`` players
when the batch is theirs. It waits until the broker holds them (its snapshot answers with these very
weights), records the stream in the run's ``streams.jsonl`` (``charles models`` shows it) and exits 0.

Exit status 2, with what was asked and what exists, and nothing published: a version or batch that does
not exist, a checkpoint that fails its checks or belongs to another line. 1: no broker took the weights
within ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from charles import config as config_mod
from charles.cli import help_text
from charles.runtime import setup_logging

RESEND_S = 0.5
"""How often the weights are sent again until the broker holds them (the slow-joiner rule: the broker's
subscription to this new publisher may not have arrived when the first copy left)."""


def prepare(ref: str, line: str, root: str | None, half: bool):
    """The run, the checkpoint's batch and path, and the payload to send; ValueError (RunError,
    CheckpointError, WeightsError) saying what was asked and what exists."""
    import safetensors.torch

    from charles.model.config import ModelConfig
    from charles.model.weights import read_weights
    from charles.proto.versions import parse_ref
    from charles.trainer.checkpoint import WEIGHTS, list_checkpoints, read_checkpoint
    from charles.trainer.runs import locate

    version, batch = parse_ref(ref, line)
    run = locate(line, version, root)
    have = list_checkpoints(run.checkpoints)
    if not have:
        raise ValueError(f"{run.name} has no checkpoint to stream (it was never checkpointed)")
    path = have[-1][1] if batch is None else run.checkpoint_path(batch)
    model = run.manifest.model if run.manifest is not None else {}
    try:
        mcfg = ModelConfig.from_dict(model) if model else None
    except ValueError as e:
        raise ValueError(f"{run.name}'s manifest names a model that cannot be read: {e}") from None
    if mcfg is None or mcfg.name != line:
        raise ValueError(
            f"{run.name}'s manifest says it trains {mcfg.name if mcfg else 'nothing'!r}, not {line!r}"
        )
    loaded = read_checkpoint(path, mcfg)  # sizes, SHA-256s, safetensors, this version's model, finite
    data = (path / WEIGHTS).read_bytes()
    w = read_weights(data, mcfg)
    meta = {**w.metadata, "charles.run": run.name, "charles.batch": str(loaded.batch)}
    tensors = {k: (v.half() if half and v.is_floating_point() else v) for k, v in w.state_dict.items()}
    payload = safetensors.torch.save(tensors, metadata=meta)
    return run, mcfg, loaded, path, payload


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles stream",
        description=help_text(__doc__),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    config_mod.add_arguments(ap)
    ap.add_argument(
        "ref", metavar="VERSION[@BATCH]", help="v3, 3 or <line>_v3; @BATCH: that checkpoint (default: newest)"
    )
    ap.add_argument("--preset", help="the model line (default: the run name's, else model.preset)")
    ap.add_argument("--run-dir", help="where runs live (default: $CHARLES_RUN_DIR or runs/)")
    ap.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for the broker to hold the weights"
    )
    ap.add_argument("--id", help="sender id (default: stream-<hostname>; on CURVE: trainer-<hostname>)")
    args = ap.parse_args(argv)

    from charles.proto.versions import parse_run_name

    try:
        cfg = config_mod.load(args.config, overrides=args.set)  # the bus, publish_half, the default line
        named = parse_run_name(args.ref.split("@", 1)[0])
        line = args.preset or (named[0] if named else cfg.model.resolve().name)
    except ValueError as e:
        print(f"charles stream: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(cfg.service.log_level, cfg.service.log_format)
    try:
        run, mcfg, loaded, path, payload = prepare(args.ref, line, args.run_dir, cfg.trainer.publish_half)
    except ValueError as e:
        print(f"charles stream: {e}", file=sys.stderr)
        return 2
    return publish(cfg, args, run, mcfg, loaded, path, payload)


def publish(cfg, args, run, mcfg, loaded, path: Path, payload: bytes) -> int:
    """Send until the broker holds these weights as the version's last value; then record the stream."""
    from charles.proto import Weights
    from charles.proto.versions import weights_topic
    from charles.runtime import Service

    topic = weights_topic(run.line, run.version)
    batch = loaded.batch
    since = time.time()
    created = loaded.state.get("created")  # when the checkpoint was written: the viewer's badge shows its age
    w = Weights(
        model=mcfg.name,
        run=run.name,
        batch=batch,
        config=mcfg.to_dict(),
        payload=payload,
        created=float(created) if isinstance(created, int | float) else since,
        since=since,
    )
    svc = Service("stream", cfg, args.id, http=False, signals=False)
    try:
        pub = svc.publisher("weights")
        deadline = time.monotonic() + args.timeout
        held = False
        while not held and time.monotonic() < deadline:
            pub.send(topic, w)
            time.sleep(RESEND_S)
            held = any(
                e.topic == topic and e.msg.since == since and e.msg.batch == batch
                for e in svc.snapshot([topic], timeout_s=min(2.0, max(0.1, deadline - time.monotonic())))
            )
        if not held:
            print(
                f"charles stream: no broker at {svc.endpoints['control']} took {run.name} batch {batch} "
                f"within {args.timeout:g}s",
                file=sys.stderr,
            )
            return 1
    finally:
        svc.close()
    run.record_stream(batch, since, path)
    print(
        f"streaming {run.name} from batch {batch} on {topic} ({len(payload):,} bytes, kept by the broker): "
        f"players following newest of {run.line}, v{run.version} or v{run.version}@{batch} drive it"
    )
    return 0


if __name__ == "__main__":
    from charles.runtime import run_main

    run_main(main)
