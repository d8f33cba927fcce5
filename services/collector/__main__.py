"""``python -m charles.collector`` (``charles collector``): drive a game instance with an NPC and stream samples.

Replicas run side by side, each with its own id and sim seed: the launcher passes ``--id collector-k
--seed k``; in compose and k8s the id is the container's host name and the seed is derived from it.
"""

from __future__ import annotations

import argparse
import sys

from charles import config as config_mod
from charles.cli import help_text
from charles.collector.service import serve
from charles.runtime import Service, default_instance, run_main, run_service


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles collector", description=help_text(__doc__.split("\n\n")[0]))
    config_mod.add_arguments(
        ap,
        "run configuration file (default: $CHARLES_CONFIG); the broker's wins",
        set_help="override a setting (wins over the broker's)",
    )
    ap.add_argument("--id", help="instance id (sample.<id>, heartbeat.<id>); default: collector-<hostname>")
    ap.add_argument(
        "--seed", type=int, help="sim seed of this replica; default: derived from the id and sim.seed"
    )
    ap.add_argument(
        "--source",
        help="sim | game:<source id> | gym:<env id> | dataset:<path> (shorthand for --set collector.source=...)",
    )
    ap.add_argument("--realtime", action="store_true", help="pace the sim to 30 samples/s of wall time")
    args = ap.parse_args(argv)
    overrides = list(args.set)
    if args.source:
        overrides.append(f"collector.source={args.source}")
    if args.realtime:
        overrides.append("collector.realtime=true")
    try:
        local = config_mod.load(args.config, overrides=overrides)
    except ValueError as e:
        print(f"charles collector: configuration error: {e}", file=sys.stderr)
        return 2
    instance = args.id or default_instance("collector")

    def body(svc: Service) -> None:
        svc.start_heartbeat()  # "waiting" shows on the consoles while the broker is not there yet
        serve(svc, local, overrides, args.seed)

    return run_service("collector", local, body, instance)


if __name__ == "__main__":
    run_main(main)
