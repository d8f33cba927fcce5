"""Which actions reach a pad: the gamepad agent's rules, shared with the sim agent.

A player's :class:`~charles.proto.Action` passes, in order: the target (this pad's id, or an empty target
when broadcast), the sender (``allowed_senders``, the player instance ids), the order (per sender, a seq
not above the last applied one is stale unless the sender was silent for ``resync_s``); then every value
is clamped (NaN -> 0) and applied. A dead-man switch releases all inputs when no action was applied for
``deadman_s``.

It lives in core because three processes apply actions: the gamepad agent on the game PC
(charles.agents.gamepad, a virtual Xbox pad), the capture agent with ``capture.dagger`` (the mod's override
commands, over its running autopilot) and the sim agent (charles.sim.agent, the sim's own pad), and
charles.sim and charles.agents do not import each other (tests/test_architecture.py).

Imports: charles.config, charles.drive (the clamp), charles.proto, charles.runtime.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Literal, Protocol

import prometheus_client as prom

from charles.config import knob
from charles.drive.controls import clamp
from charles.proto import Action
from charles.proto.codec import Envelope
from charles.proto.registry import vouches
from charles.runtime import Service

log = logging.getLogger("charles.gamepad_agent")


class Pad(Protocol):
    """A virtual Xbox 360 pad: left stick x = steering, right trigger = throttle, left trigger = brake."""

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        """Set all three (already clamped) and send the report."""
        ...

    def release(self) -> None:
        """Centre the stick and let go of both triggers, now."""
        ...

    def close(self) -> None: ...


MAX_SENDERS = 64
"""Senders whose seq we follow; the allow-list is short, this only bounds a misconfigured '*'."""


@dataclass
class GamepadSettings:
    """The gamepad agent (game PC): whose actions it applies and when it lets go."""

    id: str = knob(
        "gamepad-agent", "Agent id: subscribes to action.<id>; heartbeat.<id>; default CURVE key name"
    )
    allowed_senders: list = knob(
        [],
        "Who may drive: player CURVE key names (a key vouches for its name and <name>-<instance>; the broker "
        "refuses a sender its key does not vouch for) or instance ids; ['*'] = any authenticated player",
    )
    broadcast: bool = knob(False, "Also apply actions with an empty target sent on any action topic")
    deadman_s: float = knob(
        0.5, "Release every input when no action was applied for this long (s)", min=0.05, max=10.0
    )
    resync_s: float = knob(1.0, "A sender silent this long may restart its seq (a restarted player)", min=0.0)
    pad: Literal["auto", "vgamepad", "none"] = knob(
        "auto", "Virtual pad: vgamepad, none (count only), auto (vgamepad on Windows)"
    )
    require_secure: bool = knob(True, "Refuse to start unless bus.secure (CURVE) is on")

    def __post_init__(self) -> None:
        if not all(isinstance(v, str) and v for v in self.allowed_senders):
            raise ValueError("allowed_senders must be a list of player instance ids")


class GamepadAgent:
    """Decides which actions reach the pad; socket-free (``run`` takes the subscriber it is given)."""

    def __init__(
        self, svc: Service, s: GamepadSettings, pad: Pad, clock=time.monotonic, *, owns_status: bool = True
    ):
        self.svc = svc
        self.owns_status = owns_status
        """Whether who drives is the service's status (the gamepad agent); a capture agent relaying actions
        beside its own work keeps its status to itself."""
        self.s = s
        self.pad = pad
        self.clock = clock
        self.topic = f"action.{s.id}"
        self.allow_any = "*" in s.allowed_senders
        self.allowed = set(s.allowed_senders)
        self.last_seq: dict[str, tuple[int, float]] = {}
        self.last_applied: float | None = None
        self.released = True
        self.applied = 0
        self.driver: str | None = None
        r = svc.metrics.registry
        self.m_applied = prom.Counter(
            "charles_agent_actions_applied_total", "Actions applied to the pad", registry=r
        )
        self.m_releases = prom.Counter(
            "charles_agent_releases_total", "All inputs released, by reason", ["reason"], registry=r
        )
        self.m_value = prom.Gauge(
            "charles_agent_pad_value", "Current pad value by input", ["input"], registry=r
        )
        if self.allow_any:
            log.warning("allowed_senders is '*': any client that holds a broker key may drive")
        self.pad.release()

    @property
    def prefixes(self) -> list[str]:
        return ["action"] if self.s.broadcast else [self.topic]

    def for_me(self, env: Envelope) -> bool:
        a: Action = env.msg
        if a.target == self.s.id:
            return True
        return a.target == "" and (env.topic == self.topic or self.s.broadcast)

    def handle(self, env: Envelope, now: float | None = None) -> bool:
        """Apply one received action if it passes every check; True if applied."""
        now = self.clock() if now is None else now
        if env.kind != "action":
            return False
        if not self.for_me(env):
            self.svc.metrics.drops.labels(cause="other_target").inc()
            return False
        if not self.allow_any and not any(vouches(a, env.sender) for a in self.allowed):
            self.svc.reject(
                "sender_not_allowed", f"action from {env.sender[:64]!r}, not in gamepad.allowed_senders"
            )
            return False
        a: Action = env.msg
        last = self.last_seq.get(env.sender)
        if last is not None and a.seq <= last[0]:
            if now - last[1] < self.s.resync_s:
                self.svc.metrics.drops.labels(cause="stale_seq").inc()
                return False
            log.info(f"{env.sender} restarted its sequence ({last[0]} -> {a.seq})")
        if last is None and len(self.last_seq) >= MAX_SENDERS:
            del self.last_seq[next(iter(self.last_seq))]
        self.last_seq[env.sender] = (a.seq, now)
        self.apply(a, now, env.sender)
        return True

    def apply(self, a: Action, now: float, sender: str = "") -> None:
        st, th, br = clamp(a.steering, -1.0, 1.0), clamp(a.throttle, 0.0, 1.0), clamp(a.brake, 0.0, 1.0)
        self.pad.apply(st, th, br)
        self.last_applied = now
        self.applied += 1
        self.m_applied.inc()
        self.m_value.labels("steering").set(st)
        self.m_value.labels("throttle").set(th)
        self.m_value.labels("brake").set(br)
        if self.released or sender != self.driver:
            log.info(f"driving: applying actions from {sender or 'local'}")
            self.released = False
            self.driver = sender
            if self.owns_status:
                self.svc.status = "ok"

    def release(self, reason: str) -> None:
        self.pad.release()
        for k in ("steering", "throttle", "brake"):
            self.m_value.labels(k).set(0.0)
        self.m_releases.labels(reason).inc()
        if not self.released:
            (log.info if reason == "shutdown" else log.warning)(f"released every input ({reason})")
        self.released = True
        self.driver = None

    def check_deadman(self, now: float | None = None) -> bool:
        """Release if the actions stopped; True if it released now."""
        now = self.clock() if now is None else now
        if not self.released and self.last_applied is not None and now - self.last_applied > self.s.deadman_s:
            self.release("deadman")
            if self.owns_status:
                self.svc.status = "waiting"
            return True
        return False

    def run(self) -> None:
        # 30Hz <- action.<id> (player) -> virtual pad; the dead-man check runs at least every deadman_s / 5
        sub = self.svc.subscriber(self.prefixes, late_join=False)
        poll_ms = max(5, int(min(0.1, self.s.deadman_s / 5) * 1000))
        senders = "any authenticated sender" if self.allow_any else ", ".join(sorted(self.allowed))
        log.info(f"applying {' + '.join(self.prefixes)} from {senders}; dead-man after {self.s.deadman_s}s")
        if self.owns_status:
            self.svc.ready()
            self.svc.status = "waiting"
        try:
            while self.svc.running:
                env = sub.recv(poll_ms)
                if env is not None:
                    self.handle(env)
                    for more in sub.drain(64):  # a backlog: apply in order, the pad ends on the newest
                        self.handle(more)
                self.check_deadman()
                if self.owns_status:
                    self.svc.info.update(applied=self.applied, released=self.released)
        finally:
            self.release("shutdown")

    def close(self) -> None:
        self.pad.close()
