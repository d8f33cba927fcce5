"""``python -m charles.agents.gamepad``: the game PC's hands — the player's actions onto a virtual pad.

Subscribes to ``action.<id>`` (and, with ``broadcast``, to actions with an empty target on any action
topic) and applies each to a virtual Xbox 360 pad (``charles.agents.devices``: vgamepad on Windows): left
stick x = steering, right trigger = throttle, left trigger = brake.

Who may drive, in layers:

1. the bus: with ``bus.secure`` every socket is a CURVE client of the broker's secure endpoints, and the
   broker lets in only keys in its ``allowed/`` folder (a player or agent without one never reaches us);
2. the sender: the envelope's ``sender`` must be vouched for by an entry of ``allowed_senders`` (the
   player's CURVE key name, e.g. ``player``, which covers its instances ``player-<host>``), else the action
   is rejected (``charles_rejects_total{reason="sender_not_allowed"}``). The broker vouches for it: on its
   secure side a key may send only as its own name (``spoofed_sender``) and only a ``player`` key may send
   actions (``forbidden_topic``). With the broker's plain ports closed (``broker.plain: false``) or
   unreachable, every sender is such a key, so the allow-list names keys, not what a peer writes;
3. the order: per sender, a ``seq`` not above the last applied one is stale and dropped
   (``charles_drops_total{cause="stale_seq"}``); a sender silent for ``resync_s`` may start again from
   any seq (a restarted player counts from 0).

Every value is clamped (NaN -> 0) before it reaches the pad. A dead-man switch releases all inputs when no
action has been applied for ``deadman_s`` (the player died, the network went away) and on shutdown.
"""

from __future__ import annotations

import argparse
import logging
import sys

from charles import config as config_mod
from charles.agents.common import check_bus, load_agent_config, setup
from charles.agents.devices import make_pad
from charles.cli import help_text
from charles.pad import GamepadAgent, GamepadSettings, Pad
from charles.runtime import agent_service, run_main

log = logging.getLogger("charles.gamepad_agent")

SERVICE = "gamepad_agent"
HTTP_PORT = 9111
"""/metrics and /healthz on the game PC (not in the registry: the agents run outside compose and k8s)."""


def main(argv: list[str] | None = None, *, pad: Pad | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="charles gamepad-agent", description=help_text(__doc__.split("\n\n")[0])
    )
    config_mod.add_arguments(
        ap,
        "YAML with bus/service sections and a gamepad section (default: $CHARLES_CONFIG)",
        "override a setting (gamepad.deadman_s=0.3, bus.host=...)",
    )
    ap.add_argument("--id", help="agent id (gamepad.id)")
    ap.add_argument(
        "--allow",
        action="append",
        default=[],
        metavar="PLAYER_ID",
        help="add a player id to gamepad.allowed_senders",
    )
    ap.add_argument("--broker", help="broker host (bus.host)")
    args = ap.parse_args(argv)
    sets = list(args.set)
    if args.id:
        sets.append(f"gamepad.id={args.id}")
    if args.broker:
        sets.append(f"bus.host={args.broker}")
    try:
        cfg, s = load_agent_config("gamepad", GamepadSettings, args.config, sets)
        s.allowed_senders = [*s.allowed_senders, *args.allow]
        GamepadSettings.__post_init__(s)
        if not s.allowed_senders:
            raise ValueError(
                "gamepad.allowed_senders is empty: name the player instance(s) allowed to drive (--allow player-1)"
            )
        check_bus(cfg, s.require_secure, s.id)
    except (ValueError, OSError) as e:
        print(f"charles-gamepad-agent: configuration error: {e}", file=sys.stderr)
        return 2
    setup(cfg)
    svc = agent_service(SERVICE, cfg, s.id, HTTP_PORT)
    agent = None
    try:
        agent = GamepadAgent(svc, s, pad if pad is not None else make_pad(s.pad))
        svc.start_heartbeat()
        agent.run()
    except KeyboardInterrupt:
        pass
    except (OSError, ImportError) as e:  # no vgamepad / ViGEmBus driver
        log.error(
            f"cannot plug in a virtual pad: {e} (install vgamepad and its ViGEmBus driver, or gamepad.pad=none)"
        )
        return 1
    finally:
        if agent is not None:
            agent.close()
        svc.close()
    return 0


def entry() -> None:
    """The ``charles-gamepad-agent`` console script."""
    run_main(main)


if __name__ == "__main__":
    entry()
