"""``python -m charles.balancer`` (``charles balancer``): keep a balanced mix of samples for the trainer."""

from __future__ import annotations

import argparse
import socket
import sys

from charles import config as config_mod
from charles.balancer.service import BalancerService
from charles.cli import help_text
from charles.runtime import Service, run_main, run_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles balancer", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    ap.add_argument("--id", help="instance id (heartbeat.<id>, console.<id>); default: balancer-<hostname>")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, overrides=args.set)
        model_outputs = cfg.model.resolve().outputs
        cfg.balancer.output_specs(model_outputs)  # the model line's classes and the configured bins agree
    except ValueError as e:  # ConfigError, and the balancer section's own checks (plain ValueError)
        print(f"charles balancer: configuration error: {e}", file=sys.stderr)
        return 2
    # The pod name in k8s, the host locally: stable across restarts, so the broker's last-value cache
    # keeps one console per balancer rather than one per process that ever ran.
    instance = args.id or f"balancer-{socket.gethostname()}"

    def body(svc: Service) -> None:
        service = BalancerService(svc, cfg.balancer, model_outputs=model_outputs)
        svc.start_heartbeat()
        service.run()

    return run_service("balancer", cfg, body, instance)


if __name__ == "__main__":
    run_main(main)
