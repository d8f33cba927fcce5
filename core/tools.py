"""Small commands: ``charles config show`` and ``charles keys``."""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from charles import config as config_mod


def config_cmd(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="charles config", description="Show or check the resolved configuration."
    )
    ap.add_argument(
        "action",
        choices=["show", "check"],
        help="show: print it with every field's help; check: validate only",
    )
    config_mod.add_arguments(ap, "configuration file (default: $CHARLES_CONFIG)")
    ap.add_argument("--plain", action="store_true", help="YAML without the help comments")
    args = ap.parse_args(argv)
    try:
        cfg = config_mod.load(args.config, overrides=args.set)
    except config_mod.ConfigError as e:
        print(f"configuration error: {e}", file=sys.stderr)
        return 2
    if args.action == "show":
        print(config_mod.render(cfg, comments=not args.plain), end="")
    else:
        print("configuration OK")
    return 0


def make_keys(keys_dir: Path, clients: list[str], force: bool = False) -> list[Path]:
    """CURVE key pairs: broker.key(_secret) and one pair per client; clients' public keys in allowed/."""
    import zmq.auth

    keys_dir.mkdir(parents=True, exist_ok=True)
    allowed = keys_dir / "allowed"
    allowed.mkdir(exist_ok=True)
    made = []
    for name in ["broker", *clients]:
        public = keys_dir / f"{name}.key"
        if public.exists() and not force:
            continue
        pub, sec = zmq.auth.create_certificates(str(keys_dir), name)
        Path(sec).chmod(0o600)
        made.append(Path(pub))
        if name != "broker":
            shutil.copy(pub, allowed / f"{name}.key")
    return made


def keys_cmd(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="charles keys",
        description="Make CURVE key pairs: the broker's, and one per remote client (agents, players). "
        "Copy <client>.key_secret and broker.key to the game PC; the broker allows every key in allowed/.",
    )
    ap.add_argument("--dir", default="keys", help="where to write them (default: keys)")
    ap.add_argument(
        "--client",
        action="append",
        default=[],
        help="client name (repeatable); default: capture-agent, gamepad-agent, player",
    )
    ap.add_argument("--force", action="store_true", help="replace existing keys")
    args = ap.parse_args(argv)
    clients = args.client or ["capture-agent", "gamepad-agent", "player"]
    made = make_keys(Path(args.dir), clients, args.force)
    for p in made:
        print(f"made {p} and {p.with_suffix('.key_secret').name}")
    if not made:
        print(f"keys already in {args.dir}/ (use --force to replace)")
    return 0


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    return {"config": config_cmd, "keys": keys_cmd}[cmd](rest)
