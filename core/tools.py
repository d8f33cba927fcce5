"""Small commands: ``charles config show`` and ``charles keys``."""

from __future__ import annotations

import argparse
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


DEFAULT_CLIENTS = [
    "collector",
    "balancer",
    "trainer",
    "player",
    "viewer",
    "judge",
    "capture-agent",
    "gamepad-agent",
]
"""``make keys``: one key per service role, so that every service can run on the CURVE endpoints."""


def key_role(client: str) -> tuple[str, str]:
    """``NAME[:ROLE]`` -> (name, role); without a role the name must be one (``capture-agent``)."""
    from charles.proto import registry

    name, _, role = client.partition(":")
    role = role or name.replace("-", "_")
    roles = registry().roles
    if role not in roles:
        raise ValueError(f"key {name!r}: role {role!r} is not one of {', '.join(roles)} (write NAME:ROLE)")
    if not name or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"key name {name!r}: letters, digits, '-', '_' and '.' only")
    return name, role


def _write_public(path: Path, name: str, role: str, public: bytes) -> None:
    # a ZPL certificate like pyzmq's, with the role in its metadata: the broker reads it from allowed/
    path.write_text(
        f"#   Charles CURVE public key of {name!r}, role {role}: the broker allows it (allowed/).\n"
        "metadata\n"
        f'    name = "{name}"\n'
        f'    role = "{role}"\n'
        "curve\n"
        f'    public-key = "{public.decode("ascii")}"\n'
    )


def make_keys(keys_dir: Path, clients: list[str], force: bool = False) -> list[Path]:
    """CURVE key pairs: broker.key(_secret) and one pair per client (``NAME[:ROLE]``); each client's
    public key, with its role, in allowed/."""
    import zmq.auth

    wanted = [key_role(c) for c in clients]
    keys_dir.mkdir(parents=True, exist_ok=True)
    allowed = keys_dir / "allowed"
    allowed.mkdir(exist_ok=True)
    made = []
    for name, role in [("broker", ""), *wanted]:
        public = keys_dir / f"{name}.key"
        if public.exists() and not force:
            continue
        pub, sec = zmq.auth.create_certificates(
            str(keys_dir), name, metadata={"role": role} if role else None
        )
        Path(sec).chmod(0o600)
        made.append(Path(pub))
        if role:
            key, _ = zmq.auth.load_certificate(pub)
            _write_public(Path(pub), name, role, key)
            _write_public(allowed / f"{name}.key", name, role, key)
    return made


def keys_cmd(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(
        prog="charles keys",
        description="Make CURVE key pairs: the broker's, and one per client with its role (what it may "
        "publish and subscribe: proto/registry.yaml). Copy <client>.key_secret and broker.key to the client; "
        "the broker allows every key in allowed/ (kill -HUP the broker to reload it).",
    )
    ap.add_argument("--dir", default="keys", help="where to write them (default: keys)")
    ap.add_argument(
        "--client",
        action="append",
        default=[],
        help="NAME[:ROLE] (repeatable; the role defaults to the name: capture-agent -> capture_agent); "
        f"default: one per role ({', '.join(DEFAULT_CLIENTS)})",
    )
    ap.add_argument("--force", action="store_true", help="replace existing keys")
    args = ap.parse_args(argv)
    try:
        made = make_keys(Path(args.dir), args.client or DEFAULT_CLIENTS, args.force)
    except ValueError as e:
        print(f"charles keys: {e}", file=sys.stderr)
        return 2
    for p in made:
        print(f"made {p} and {p.with_suffix('.key_secret').name}")
    if not made:
        print(f"keys already in {args.dir}/ (use --force to replace)")
    return 0


def main(argv: list[str]) -> int:
    cmd, rest = argv[0], argv[1:]
    return {"config": config_cmd, "keys": keys_cmd}[cmd](rest)
