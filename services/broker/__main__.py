"""``python -m charles.broker``: the central server."""

from __future__ import annotations

import argparse

from charles import config as config_mod
from charles.broker.broker import Broker
from charles.cli import help_text
from charles.runtime import Service, run_main, run_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles broker", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config, overrides=args.set)

    def body(svc: Service) -> None:
        broker = Broker(svc, cfg.to_dict())
        broker.start()
        svc.start_heartbeat()
        try:
            broker.serve()
        finally:
            broker.close()

    return run_service("broker", cfg, body)


if __name__ == "__main__":
    run_main(main)
