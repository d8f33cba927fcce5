"""``python -m charles.sim.agent``: the built-in sim as a game process, speaking what a game PC speaks.

The Windows game PC runs two agents around GTA V: the capture agent in play mode publishes a
:class:`~charles.proto.GameFrame` per tick on ``game.<id>`` (the hood picture fitted to the model line's
input and through its codec, speed, position, heading, purpose, the controls the car got), and runs
Unstuck itself (teleporting through the mod); the gamepad agent applies the player's
:class:`~charles.proto.Action` from ``action.<id>`` to a virtual pad. This process is both, around a
:class:`~charles.sim.world.SimWorld`: the player in remote mode (``player.source: remote``) drives it on
Linux exactly as it drives GTA V, and a benchmark can put the game's work in a process of its own.

Per frame::

    # 30 Hz of wall clock (--fps), or --lockstep: the next frame once the action for the last one is in
    #   -> game.<id>   <- action.<id> (the player; applied as the gamepad agent applies it)
    obs = session.observe()     # Unstuck (fade, teleport, settle) and the hood camera at the model's size
    publish GameFrame           # codec and quality: the run's collector section (the pixels it trained on)
    wait                        # paced: until the next tick; lockstep: until the action (or the timeout)
    session.step(pad)           # the world moves 1/30 s with what the pad holds: throttle - brake, steering

The model's input size and the ``sim``, ``unstuck`` and ``collector`` sections come from the run
configuration the broker serves (as for collectors; ``--set`` wins). Actions pass the gamepad agent's own
checks (:class:`~charles.pad.GamepadAgent`: target, sender, order, clamping, dead-man release).

``--lockstep`` takes one frame per answered action, so the loop is frame -> player -> action -> next
frame, as fast as the player answers (what a benchmark of the player's loop needs). The world's step and
the next frame's drawing are then on that loop too; ``--ahead`` takes them off it, as a game on its own
machine does: the world moves on and the next frame is drawn while the player thinks about this one, and
goes out the moment the action is in (the action lands one step later). A frame not answered within
``--timeout`` is given up (``charles_drops_total{cause="lockstep_timeout"}``) and the game goes on.
``--inflight N`` lets N frames be out unanswered (default 1): the next frame is already waiting when the
player finishes one, so the round trip through the broker is off its loop too (a game does not wait for
the pad either). The player takes the newest frame it has, so it may skip one.

Frame-to-action latency (frame published -> its action received here) is
``charles_agent_action_latency_seconds`` and ``latency_p50_ms``/``latency_p99_ms`` in the heartbeat. An
action that says which frame it answers (``Action.frame_seq``, as the player's does) is paired with that
frame, and frames before it that it skipped count as answered; one that does not answers the newest frame
not yet answered (in lockstep the only one; paced, the player always takes the newest frame it has).
"""

from __future__ import annotations

import argparse
import collections
import logging
import math
import sys
import time
from dataclasses import replace

import numpy as np
import prometheus_client as prom

from charles import config as config_mod
from charles.cli import help_text
from charles.drive.controls import clean_purpose, clean_speed, combine, wrap_angle
from charles.pad import GamepadAgent, GamepadSettings
from charles.proto import Frame, GameFrame
from charles.proto.codec import Envelope
from charles.runtime import Publisher, Service, Subscriber, run_main
from charles.sim.session import DriveSession
from charles.sim.town import BuildCancelled
from charles.sim.world import SimWorld

log = logging.getLogger("charles.sim_agent")

SERVICE = "sim_agent"
HTTP_PORT = 9112
"""/metrics and /healthz (beside the Windows agents' 9110 and 9111; not in the registry: no container runs it)."""
DEFAULT_ID = "sim-agent"
WAIT_S = 0.1
"""Longest blocking wait: SIGTERM only sets a flag, so the loop looks at it this often."""
REFRESH_S = 1.0
"""Rates and heartbeat info."""
RECENT = 512
"""Latencies remembered for the heartbeat's percentiles."""
LATENCY_BUCKETS = (0.001, 0.002, 0.003, 0.004, 0.005, 0.006, 0.008, 0.01, 0.015, 0.02, 0.033, 0.05, 0.1, 1.0)


class SimPad:
    """The virtual pad of the sim: holds what the gamepad agent applied; the car reads it every step."""

    def __init__(self) -> None:
        self.steering = self.throttle = self.brake = 0.0

    def apply(self, steering: float, throttle: float, brake: float) -> None:
        self.steering, self.throttle, self.brake = steering, throttle, brake

    def release(self) -> None:
        self.steering = self.throttle = self.brake = 0.0

    def close(self) -> None:
        self.release()

    @property
    def action(self) -> tuple[float, float]:
        """(steering, throttle_brake): GTA's combined pedal is the right trigger minus the left."""
        return self.steering, combine(self.throttle, self.brake)


class SimAgent:
    """The loop's logic around injected sockets (``sub``/``pub``; made from ``svc`` when not given).

    ``cfg`` is the run configuration (``model``, ``sim``, ``unstuck``, ``collector`` sections).
    """

    def __init__(
        self,
        svc: Service,
        cfg: config_mod.Config,
        *,
        agent_id: str = DEFAULT_ID,
        seed: int | None = None,
        fps: float = 30.0,
        lockstep: bool = False,
        timeout_s: float = 0.5,
        ahead: bool = False,
        inflight: int = 1,
        allowed_senders: list[str] | None = None,
        deadman_s: float = 0.5,
        sub: Subscriber | None = None,
        pub: Publisher | None = None,
    ):
        if fps <= 0 or timeout_s <= 0:
            raise ValueError("fps and timeout_s must be > 0")
        if inflight < 1:
            raise ValueError("inflight must be >= 1")
        self.svc = svc
        self.id = agent_id
        self.topic = f"game.{agent_id}"
        model = cfg.model.resolve()
        self.width, self.height = model.width, model.height
        sim = cfg.sim
        sim = replace(
            sim, seed=sim.seed if seed is None else seed, hood_width=model.width, hood_height=model.height
        )
        self.world = SimWorld(sim, should_stop=svc.stop_event.is_set)  # the town: seconds, cancellable
        # Unstuck runs here, as the capture agent runs it; the player keeps its own history rows
        self.session = DriveSession(self.world, cfg.unstuck, history_len=0)
        collector = cfg.sections.get("collector")
        self.codec: str = getattr(collector, "codec", "jpeg")
        self.quality: int = getattr(collector, "quality", 90)
        self.period = 1.0 / fps
        self.lockstep = lockstep
        self.timeout_s = timeout_s
        self.ahead = ahead and lockstep
        self.inflight = inflight if lockstep else 1

        self.pad = SimPad()
        # What the gamepad agent does with an action (target, sender, order, clamps, dead-man), on our pad.
        # The sim is a local stand-in: any player may drive it unless --allow names some.
        self.gamepad = GamepadAgent(
            svc,
            GamepadSettings(
                id=agent_id,
                allowed_senders=list(allowed_senders or []),
                deadman_s=deadman_s,
                pad="none",
                require_secure=False,
            ),
            self.pad,
        )
        if not allowed_senders:
            self.gamepad.allow_any = True
        self.pub = pub or svc.publisher("game")
        self.sub = sub or svc.subscriber([f"action.{agent_id}"], late_join=False)

        r = svc.metrics.registry  # the capture agent's names where it is the same thing
        self.m_frames = prom.Counter("charles_agent_frames_total", "Frames taken from the game", registry=r)
        self.m_sent = prom.Counter(
            "charles_agent_sent_total", "Samples or game frames published", ["kind"], registry=r
        )
        self.m_unstucks = prom.Counter("charles_agent_unstucks_total", "Unstuck teleports", registry=r)
        self.m_missed = prom.Counter(
            "charles_agent_missed_ticks_total", "Ticks skipped because the loop ran late", registry=r
        )
        self.m_latency = prom.Histogram(
            "charles_agent_action_latency_seconds",
            "From a game frame's publication to the action for it coming back",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self._loop_time = svc.metrics.loop.labels("sim_agent")
        self._timeouts = svc.metrics.drops.labels(cause="lockstep_timeout")

        self.seq = 0
        self.actions = 0
        """Actions applied to the pad."""
        self.timeouts = 0
        self.latencies: collections.deque[float] = collections.deque(maxlen=RECENT)
        self.unanswered: collections.OrderedDict[int, float] = collections.OrderedDict()
        """seq -> send time (monotonic) of the frames no action has answered yet, oldest first."""
        self.executed: tuple[float, float] | None = None
        """What the car got on the step into the current frame (GameFrame.controls)."""
        self._held: GameFrame | None = None
        """ahead: the next frame, drawn, waiting for the action for this one."""
        self._unstucks_seen = 0
        self._next_due: float | None = None
        self._next_refresh = 0.0
        self._marks = (time.monotonic(), 0, 0)

    @property
    def unstucks(self) -> int:
        return self.session.unstuck.unstucks

    # -- one frame ---------------------------------------------------------------------------------------

    def tick(self) -> None:
        """One frame: publish it, wait (paced or lockstep) applying actions, move the world one step.

        With ``ahead`` the world moves and the next frame is drawn while the player thinks about this one;
        that frame goes out the moment the action is in (and the action lands on the step after it).
        """
        t0 = time.perf_counter()
        gf = self._held if self._held is not None else self.render()
        self.send(gf)
        if self.ahead:
            self.step()
            self._held = self.render()
        busy = time.perf_counter() - t0
        if self.lockstep:
            self.wait_lockstep()
        else:
            self.wait_paced()
        if not self.ahead:
            t0 = time.perf_counter()
            self.step()
            busy += time.perf_counter() - t0
        self._loop_time.observe(busy)  # the game's own work, not the waits
        now = time.monotonic()
        if now >= self._next_refresh:
            self.refresh(now)

    def render(self) -> GameFrame:
        """The current frame as the capture agent sends it (Unstuck first: it may teleport and fade it)."""
        obs = self.session.observe()
        if self.unstucks != self._unstucks_seen:
            self.m_unstucks.inc(self.unstucks - self._unstucks_seen)
            self._unstucks_seen = self.unstucks
            log.info(f"unstuck #{self.unstucks}: the car made no progress; teleported")
        p = self.world.player
        self.m_frames.inc()
        return GameFrame(
            source=self.id,
            seq=self.seq,
            game_time=float(obs.game_time),
            frame=Frame.encode(obs.frame, self.codec, self.quality),
            speed=clean_speed(obs.speed),  # the wire's range (the sim's car can roll back)
            position=(float(p.x), float(p.y), 0.0),
            heading=wrap_angle(p.heading),
            purpose=clean_purpose(obs.purpose),
            controls=self.executed,
            recovering=not obs.driving,  # Unstuck runs here: collectors and the player take its word
        )

    @property
    def waiting(self) -> float | None:
        """Send time of the newest frame not answered yet (None: all are)."""
        return next(reversed(self.unanswered.values())) if self.unanswered else None

    def send(self, gf: GameFrame) -> None:
        self._held = None
        self.unanswered[gf.seq] = time.monotonic()
        while len(self.unanswered) > self.inflight + 1:  # paced: a slow player never grows it
            self.unanswered.popitem(last=False)
        if self.pub.send(self.topic, gf):
            self.m_sent.labels("game").inc()
        self.seq += 1

    def step(self) -> None:
        """1/30 s of game time with what the pad holds (the brake while Unstuck recovers)."""
        self.executed = self.session.step(self.pad.action).action

    def wait_paced(self) -> None:
        """Until the next tick of the wall clock; a loop more than a tick late skips ticks (counted)."""
        now = time.monotonic()
        if self._next_due is None:
            self._next_due = now
        self._next_due += self.period
        if now - self._next_due > self.period:
            missed = int((now - self._next_due) / self.period)
            self.m_missed.inc(missed)
            self._next_due += missed * self.period
        while self.svc.running:
            remaining = self._next_due - time.monotonic()
            if remaining <= 0:
                break
            self.receive(min(remaining, WAIT_S))
            self.gamepad.check_deadman()

    def wait_lockstep(self) -> None:
        """Until fewer than ``inflight`` frames are unanswered; after ``timeout_s`` the oldest is given up."""
        while self.svc.running and len(self.unanswered) >= self.inflight:
            oldest = next(iter(self.unanswered.values()))
            remaining = oldest + self.timeout_s - time.monotonic()
            # look at what has arrived before giving up: this process may have been descheduled (or
            # stopped) past the deadline while the answer sat in the socket
            self.receive(min(max(0.0, remaining), WAIT_S))
            self.gamepad.check_deadman()
            if len(self.unanswered) >= self.inflight and remaining <= 0:
                # An answer without frame_seq that still comes will be taken for the next frame's: the loop
                # then runs one frame ahead of the player. Keep the timeout well above its slowest frame.
                self.unanswered.popitem(last=False)
                self.timeouts += 1
                self._timeouts.inc()

    def receive(self, timeout_s: float) -> int:
        """Apply the actions that come within timeout_s (all waiting ones, in order); returns how many."""
        env = self.sub.recv(max(1, math.ceil(timeout_s * 1000)))
        if env is None:
            return 0
        n = self.on_action(env)
        for more in self.sub.drain(64):
            n += self.on_action(more)
        return n

    def on_action(self, env: Envelope) -> int:
        if not self.gamepad.handle(env):
            return 0
        now = time.monotonic()
        self.actions += 1
        frame_seq = env.msg.frame_seq
        sent = None
        if frame_seq is None:
            if self.unanswered:  # the newest frame (and, unsaid, every one before it)
                sent = self.waiting
                self.unanswered.clear()
        elif frame_seq in self.unanswered:
            while self.unanswered:  # the frames before it were skipped: answered by this one
                seq, t = self.unanswered.popitem(last=False)
                if seq == frame_seq:
                    sent = t
                    break
        if sent is not None:
            lat = now - sent
            self.m_latency.observe(lat)
            self.latencies.append(lat)
        return 1

    # -- what people see ---------------------------------------------------------------------------------

    def refresh(self, now: float) -> None:
        self._next_refresh = now + REFRESH_S
        t, frames, actions = self._marks
        dt = max(1e-9, now - t)
        self._marks = (now, self.seq, self.actions)
        info: dict = {
            "frames": self.seq,
            "actions": self.actions,
            "fps": round((self.seq - frames) / dt, 1),
            "aps": round((self.actions - actions) / dt, 1),
            "unstucks": self.unstucks,
            "timeouts": self.timeouts,
            "mode": self.mode,
            "driver": self.gamepad.driver or "",
        }
        if self.latencies:
            lat = np.fromiter(self.latencies, float) * 1000.0
            info["latency_p50_ms"] = round(float(np.percentile(lat, 50)), 2)
            info["latency_p99_ms"] = round(float(np.percentile(lat, 99)), 2)
        self.svc.info = info  # a new dict, never mutated: the heartbeat thread reads it

    @property
    def mode(self) -> str:
        if not self.lockstep:
            return f"{1 / self.period:g} Hz"
        inflight = f", {self.inflight} in flight" if self.inflight > 1 else ""
        return f"lockstep{', ahead' if self.ahead else ''}{inflight}, {self.timeout_s:g} s timeout"

    def run(self) -> None:
        log.info(
            f"sim seed {self.world.cfg.seed}: {self.width}x{self.height} {self.codec} -> {self.topic}, "
            f"actions <- action.{self.id}; {self.mode}"
        )
        self.svc.ready()
        self.svc.status = "waiting"  # until a player drives (the gamepad agent's "ok")
        # 30 Hz (or lockstep) -> game.<id>  <- action.<id>
        while self.svc.running:
            self.tick()
        self.refresh(time.monotonic())

    def close(self) -> None:
        self.gamepad.release("shutdown")
        log.info(f"stopped after {self.seq} frames, {self.actions} actions, {self.unstucks} unstucks")


def main(argv: list[str] | None = None) -> int:
    from charles.runtime import agent_service, setup_logging

    ap = argparse.ArgumentParser(prog="charles sim-agent", description=help_text(__doc__.split("\n\n")[0]))
    config_mod.add_arguments(
        ap,
        "run configuration file (default: $CHARLES_CONFIG); the broker's sections win",
        "override a setting (wins over the broker's)",
    )
    ap.add_argument(
        "--id", default=DEFAULT_ID, help=f"game id: game.<id> out, action.<id> in (default {DEFAULT_ID})"
    )
    ap.add_argument("--seed", type=int, help="town and traffic seed (default: sim.seed)")
    ap.add_argument("--fps", type=float, default=30.0, help="frames per second of wall clock (default 30)")
    ap.add_argument(
        "--lockstep", action="store_true", help="next frame once the action for the last one is in"
    )
    ap.add_argument(
        "--ahead",
        action="store_true",
        help="lockstep: draw the next frame while the player thinks (off its loop)",
    )
    ap.add_argument(
        "--inflight",
        type=int,
        default=1,
        help="lockstep: frames out unanswered at once (2: the next one waits while the player thinks)",
    )
    ap.add_argument(
        "--timeout", type=float, default=0.5, help="lockstep: give a frame up after this many seconds"
    )
    ap.add_argument(
        "--allow", action="append", default=[], metavar="PLAYER_ID", help="only these players may drive"
    )
    ap.add_argument(
        "--deadman", type=float, default=0.5, help="release the pad when no action came for this long (s)"
    )
    args = ap.parse_args(argv)
    if args.ahead and not args.lockstep:
        print("python -m charles.sim.agent: --ahead goes with --lockstep", file=sys.stderr)
        return 2
    if args.inflight != 1 and not args.lockstep:
        print("python -m charles.sim.agent: --inflight goes with --lockstep", file=sys.stderr)
        return 2
    if args.fps <= 0 or args.timeout <= 0 or args.deadman <= 0 or args.inflight < 1:
        print(
            "python -m charles.sim.agent: --fps, --timeout, --deadman and --inflight must be > 0",
            file=sys.stderr,
        )
        return 2
    try:
        local = config_mod.load(args.config, overrides=args.set)
    except ValueError as e:
        print(f"python -m charles.sim.agent: configuration error: {e}", file=sys.stderr)
        return 2
    setup_logging(local.service.log_level, local.service.log_format)
    svc = agent_service(SERVICE, local, args.id, HTTP_PORT)
    agent = None
    try:
        svc.start_heartbeat()  # "waiting" on the consoles while the broker is not there yet
        cfg = svc.acquire_run_config(local, args.set, role=SERVICE)
        if cfg is None:
            return 0  # stopped while waiting
        agent = SimAgent(
            svc,
            cfg,
            agent_id=args.id,
            seed=args.seed,
            fps=args.fps,
            lockstep=args.lockstep,
            timeout_s=args.timeout,
            ahead=args.ahead,
            inflight=args.inflight,
            allowed_senders=args.allow,
            deadman_s=args.deadman,
        )
        agent.run()
    except BuildCancelled:
        log.info("stopped while building the town")
    except KeyboardInterrupt:
        pass
    finally:
        if agent is not None:
            agent.close()
        svc.close()
    return 0


if __name__ == "__main__":
    run_main(main)
