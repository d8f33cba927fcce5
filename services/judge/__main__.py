"""``python -m charles.judge`` (``charles judge``): drive the newest weights of each version on held-out towns
now and then, and publish the driving score beside the loss (bus, /metrics, TensorBoard, the viewer)."""

from __future__ import annotations

import argparse
import os
import socket
import sys

from charles import config as config_mod
from charles.cli import help_text
from charles.runtime import Service, run_main, run_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles judge", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    ap.add_argument("--id", help="instance id (heartbeat.<id>, console.<id>); default: judge-<hostname>")
    ap.add_argument("--preset", help="model line to judge (overrides model.preset; the trainer's line)")
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    try:
        cfg = config_mod.load(args.config, overrides=overrides)
        cfg.model.resolve()
    except ValueError as e:  # ConfigError and the judge section's own checks
        print(f"charles judge: configuration error: {e}", file=sys.stderr)
        return 2
    instance = args.id or f"judge-{socket.gethostname()}"

    def body(svc: Service) -> None:
        # the run's configuration from the broker: the line the trainer trains, the sim, NPC and Unstuck
        # the collectors drive with, their codec; --preset, --set and CHARLES__* still win
        run = svc.acquire_run_config(cfg, overrides, role="judge")
        if run is None:
            return  # stopped while waiting
        svc.cfg = run
        judge = run.judge
        if judge.nice:
            # below the trainer: on a shared CPU box a judging takes what training leaves, never the reverse
            os.nice(judge.nice)
        import torch  # after the config is known good

        torch.set_num_threads(judge.threads)
        from charles.judge.service import JudgeService

        service = JudgeService(svc, run, run.model.resolve())
        svc.log.info(
            f"judging {service.judge.line} on towns {list(judge.seeds)}, {judge.minutes:g} game min each, "
            f"every {judge.every_batches} batches or {judge.every_minutes:g} min (nice +{judge.nice})"
        )
        svc.start_heartbeat()
        service.run()

    return run_service("judge", cfg, body, instance)


if __name__ == "__main__":
    run_main(main)
