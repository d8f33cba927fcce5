"""``python -m charles.player`` (``charles player``): drive with the newest weights; Convcam and console."""

from __future__ import annotations

import argparse
import socket
import sys

from charles import config as config_mod
from charles.cli import help_text
from charles.runtime import Service, run_main, run_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles player", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    ap.add_argument(
        "--id", help="instance id (heartbeat.<id>, console.<id>, sample.<id>); default: player-<hostname>"
    )
    ap.add_argument(
        "--preset", help="model line to drive (overrides model.preset; the trainer must run the same)"
    )
    ap.add_argument("--seed", type=int, help="sim seed (overrides player.seed)")
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if args.preset:
        overrides.append(f"model.preset={args.preset}")
    if args.seed is not None:
        overrides.append(f"player.seed={args.seed}")
    try:
        cfg = config_mod.load(args.config, overrides=overrides)
        cfg.model.resolve()
    except ValueError as e:  # ConfigError and the player section's own checks
        print(f"charles player: configuration error: {e}", file=sys.stderr)
        return 2
    instance = args.id or f"player-{socket.gethostname()}"

    def body(svc: Service) -> None:
        # the run's configuration from the broker, as collectors take it: the model line the trainer
        # trains is the one this player drives; --preset, --seed, --set and CHARLES__* still win
        run = svc.acquire_run_config(cfg, overrides, role="player")
        if run is None:
            return  # stopped while waiting
        model_cfg = run.model.resolve()
        svc.cfg = run
        svc.log.info(f"run configuration from the broker: model {run.model.preset}")

        from charles.player.service import PlayerService  # torch and timm: after the config is known good
        from charles.sim.town import BuildCancelled

        try:
            service = PlayerService(svc, model_cfg)
        except BuildCancelled:
            svc.log.info("stopped while building the town")
            return
        except ValueError as e:  # player.follow: another line's version, a missing or refused weights file
            svc.log.error(f"player.follow {run.player.follow!r}: {e}")
            raise SystemExit(2) from None
        svc.start_heartbeat()
        service.run()

    return run_service("player", cfg, body, instance)


if __name__ == "__main__":
    run_main(main)
