"""``python -m charles.viewer``: the stream layout of the seed as a web page (OBS browser source)."""

from __future__ import annotations

import argparse

from charles import config as config_mod
from charles.cli import help_text
from charles.runtime import Service, run_main, setup_logging
from charles.viewer.app import serve
from charles.viewer.board import Board
from charles.viewer.web import Viewer


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="charles viewer", description=help_text(__doc__))
    config_mod.add_arguments(ap)
    ap.add_argument("--id", help="instance id (default: viewer-<host>-<pid>-<random>)")
    ap.add_argument(
        "--port",
        type=int,
        default=None,
        help="page port (default: service.http_port, else the registry's 9105)",
    )
    ap.add_argument(
        "--stale-s", type=float, default=120.0, help="forget an instance silent this long (seconds)"
    )
    ap.add_argument(
        "--max-instances", type=int, default=64, help="keep at most this many instances' consoles"
    )
    args = ap.parse_args(argv)
    cfg = config_mod.load(args.config, overrides=args.set)
    setup_logging(cfg.service.log_level, cfg.service.log_format)
    # the viewer's own server carries /metrics and /healthz beside the page (one port for both)
    svc = Service("viewer", cfg, args.id, http=False)
    board = Board(stale_s=args.stale_s, max_instances=args.max_instances)
    viewer = Viewer(svc, board)
    try:
        svc.http_port = viewer.start(port=args.port)
        svc.start_heartbeat()
        serve(svc, board, viewer)
    except KeyboardInterrupt:
        pass
    finally:
        viewer.close()
        svc.close()
    return 0


if __name__ == "__main__":
    run_main(main)
