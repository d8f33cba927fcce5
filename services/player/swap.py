"""New weights in without a stalled frame: check on arrival, load beside the running model, switch between frames.

Two :class:`~charles.model.predictor.Predictor` of the same model exist. The drive loop runs the
*active* one; :class:`WeightsFeed` (a thread that owns the ``weights.<line>`` socket, so even the
payload's sha256 and msgpack decode stay off the loop) checks each message and loads it into the other
one (on CUDA on a side stream). Once loaded it is *ready*; the loop calls :meth:`Swapper.maybe_swap`
before each frame and, when the policy allows, swaps the two references — the switch itself is a pointer
swap under a lock, so no frame waits for a load. Newer weights arriving while one is ready and not yet
swapped in (the ``unstuck`` policy waits for an Unstuck) are loaded into that same ready predictor: the
loop always gets the newest.

A weights message is refused, counted in ``charles_rejects_total{reason}`` and logged with what was
wrong, and the car keeps driving on what it has, when it is for another model line (``wrong_model``),
describes another network (``config_mismatch``, ``bad_config``), or its payload is not safetensors of
this model (``pickle``, ``not_safetensors``, ``corrupt``, ``non_finite``, ``tensor_mismatch``...: the
``WeightsError`` reasons of charles.model.weights). Two more refusals guard what the car drives: on CURVE,
weights from a sender no trainer key vouches for (``weights_sender_not_allowed``: the broker lets only
``trainer`` keys publish weights, and only under their own names), and weights of an older batch of the
run it already has (``older_batch``: a replay or a rollback), unless ``player.accept_older``, and a
message whose topic names another version than its run (``wrong_version``).

Which versions it loads at all is ``player.follow`` (charles.proto.versions.Follower): weights of versions
it does not follow are passed by unloaded and counted (``charles_drops_total{cause="not_followed"}``), so a
pinned player never loads another version's weights, and a ``newest`` one never flips between two trainers.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from charles.model.config import ModelConfig
from charles.model.predictor import Predictor
from charles.model.weights import WeightsError, read_weights
from charles.proto import Envelope, Weights
from charles.proto.registry import vouches
from charles.proto.versions import Follow, Follower, Offer, line_prefix, parse_run_name, version_of_topic
from charles.runtime import Service, Subscriber

RECV_MS = 100
"""Longest wait of the feed thread: it looks at the stop flag this often."""


@dataclass(frozen=True, slots=True)
class WeightsMeta:
    """Which weights a predictor holds (what the console and metrics show)."""

    model: str
    run: str
    batch: int
    created: float
    sha256: str
    received: float = 0.0
    """time.monotonic() when they arrived."""
    version: int = 0
    """The run's version (0: a run name without one)."""


def check_weights(w: Weights, cfg: ModelConfig) -> None:
    """The message's own claims against the model we run; raises WeightsError (cheap: no payload parsed)."""
    if w.model != cfg.name:
        raise WeightsError(
            "wrong_model",
            f"weights of run {w.run!r} are for model line {w.model!r}; this player runs {cfg.name!r}",
        )
    try:
        theirs = ModelConfig.from_dict(w.config)
    except ValueError as e:
        raise WeightsError(
            "bad_config", f"weights of run {w.run!r} carry a model config we cannot read: {e}"
        ) from None
    diff = cfg.differences(theirs)
    if diff:
        shown = ", ".join(f"{k}: ours {a!r}, theirs {b!r}" for k, (a, b) in list(diff.items())[:4])
        raise WeightsError(
            "config_mismatch",
            f"weights of run {w.run!r} batch {w.batch} are for a different network ({shown})",
        )


CHECKPOINT_WEIGHTS = "weights.safetensors"
"""The weights file in a trainer's checkpoint folder (runs/<line>/<run>/checkpoints/batch_<N>/)."""


def local_weights(path: str, cfg: ModelConfig) -> tuple[bytes, WeightsMeta]:
    """``player.follow: <folder or file>``: the bytes and meta of a checkpoint folder's weights or a
    safetensors file, checked as weights from the bus are (safetensors only, the model line, the network);
    raises WeightsError saying what was asked and what is there, before any predictor holds any of it."""
    p = Path(path)
    f = p / CHECKPOINT_WEIGHTS if p.is_dir() else p
    if p.is_dir() and not f.is_file():
        raise WeightsError(
            "missing",
            f"{p} is a folder without {CHECKPOINT_WEIGHTS}; a checkpoint folder is "
            "runs/<line>/<line>_v<N>/checkpoints/batch_<N>/",
        )
    if not f.is_file():
        raise WeightsError("missing", f"no checkpoint folder or weights file at {p}")
    data = f.read_bytes()
    w = read_weights(data)  # safetensors framing first: a pickle or anything else is refused unparsed
    if w.config is None:
        raise WeightsError("no_config", f"{f} does not say which model it belongs to")
    if w.config.name != cfg.name:
        raise WeightsError(
            "wrong_model",
            f"{f} holds weights of model line {w.config.name!r}; this player drives {cfg.name!r}",
        )
    run = w.metadata.get("charles.run") or next(
        (q.name for q in f.parents if parse_run_name(q.name) is not None), f.name
    )
    named = parse_run_name(run)
    try:
        batch = int(w.metadata.get("charles.batch", "0"))
    except ValueError:
        batch = 0
    digest = hashlib.sha256(data).hexdigest()
    version = named[1] if named is not None else 0
    return data, WeightsMeta(cfg.name, run, batch, f.stat().st_mtime, digest, time.monotonic(), version)


class Swapper:
    """The active predictor, the spare(s), the ready one, and the swap policy.

    Threads: ``load`` runs on the feed thread, ``maybe_swap`` on the drive loop; they share ``_lock``.
    """

    def __init__(
        self,
        make: Callable[[], Predictor],
        policy: str = "unstuck",
        every_s: float = 30.0,
        max_wait_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.policy = policy
        self.every_s = every_s
        self.max_wait_s = max_wait_s
        self.clock = clock
        self.active: Predictor | None = None
        """What the loop predicts with; None until the first weights (the loop then brakes or lets the NPC drive)."""
        self.meta: WeightsMeta | None = None
        self.swaps = 0
        """Swaps after the first weights took over (the first one is not a swap of anything)."""
        self.newest: WeightsMeta | None = None
        """The newest weights loaded (swapped in or ready): policy lag = newest.batch - meta.batch."""
        self._free: list[Predictor] = [make(), make()]
        self._ready: tuple[Predictor, WeightsMeta, float] | None = None
        self._lock = threading.Lock()
        self._last_swap = -float("inf")
        dev = self._free[0].device
        self._stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None

    @property
    def predictors(self) -> list[Predictor]:
        with self._lock:
            out = list(self._free)
            if self._ready is not None:
                out.append(self._ready[0])
        return out + ([self.active] if self.active is not None else [])

    @property
    def pending(self) -> WeightsMeta | None:
        """Weights loaded and waiting for the policy to swap them in."""
        r = self._ready
        return r[1] if r is not None else None

    @property
    def lag(self) -> int:
        """Batches the driven weights trail the newest loaded ones (0 before the first)."""
        if self.meta is None or self.newest is None or self.newest.run != self.meta.run:
            return 0  # batches of two versions do not compare
        return max(0, self.newest.batch - self.meta.batch)

    # -- the feed thread ------------------------------------------------------------------------------

    def load(self, payload: bytes | memoryview, meta: WeightsMeta) -> None:
        """Load into a predictor the loop is not using; raises WeightsError (nothing changes then)."""
        with self._lock:
            since = None
            if self._ready is not None:
                # newer weights replace the not-yet-swapped ones, and inherit their wait (swap_max_wait_s
                # bounds how long the car drives stale weights, however often new ones arrive)
                target, since, self._ready = self._ready[0], self._ready[2], None
            else:
                target = self._free.pop()
        try:
            ctx = torch.cuda.stream(self._stream) if self._stream is not None else contextlib.nullcontext()
            with ctx:
                target.swap_weights(
                    payload
                )  # checks the safetensors header, the config inside and every shape
            if self._stream is not None:
                self._stream.synchronize()  # the copies are done before the loop may use them
        except BaseException:
            with self._lock:
                self._free.append(target)
            raise
        with self._lock:
            self._ready = (target, meta, self.clock() if since is None else since)
            self.newest = meta

    # -- the drive loop -------------------------------------------------------------------------------

    def maybe_swap(self, driving: bool) -> bool:
        """Between two frames: swap in ready weights if the policy says now. True when it swapped."""
        r = self._ready
        if r is None:
            return False
        now = self.clock()
        if self.active is not None and not self._due(driving, now, r[2]):
            return False
        with self._lock:
            if self._ready is None:
                return False
            target, meta, _ = self._ready
            self._ready = None
            old, self.active, self.meta = self.active, target, meta
            if old is not None:
                self._free.append(old)
                self.swaps += 1
        self._last_swap = now
        return True

    def _due(self, driving: bool, now: float, ready_since: float) -> bool:
        if self.policy == "immediate":
            return True
        if self.policy == "every_s":
            return now - self._last_swap >= self.every_s
        # unstuck: while Unstuck has the car (fade, teleport, settle) nobody watches the model drive
        if not driving:
            return True
        return self.max_wait_s > 0 and now - ready_since >= self.max_wait_s


class WeightsFeed:
    """``# irregular <- weights.<line>.*`` (the broker's newest of each version at start): choose by
    ``follow``, check, load, hand to the Swapper."""

    def __init__(
        self,
        svc: Service,
        swapper: Swapper,
        cfg: ModelConfig,
        sub: Subscriber | None = None,
        *,
        trusted: list[str] | None = None,
        accept_older: bool = False,
        follow: Follow | None = None,
    ):
        self.svc = svc
        self.trusted = trusted
        """Key names that vouch for a weights sender (None: any sender, the plain in-cluster bus)."""
        self.swapper = swapper
        self.cfg = cfg
        self.follow = follow or Follow("newest")
        self.follower = Follower(self.follow, accept_older)
        self.prefix = line_prefix(cfg.name)  # every version of the line
        self.not_followed = 0
        self.sub = sub
        self.received = 0
        self.loaded = 0
        self.refused = 0
        self.last_error = ""
        self.subscribed = threading.Event()
        self._seen: tuple[str, int, str] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def accept_older(self) -> bool:
        """Load older batches of the stream it drives (``player.accept_older``)."""
        return self.follower.accept_older

    @accept_older.setter
    def accept_older(self, value: bool) -> None:
        self.follower.accept_older = value

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="weights", daemon=True)
        self._thread.start()

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        if self.sub is None:
            # subscribes, then fetches the broker's last value of the topic (the late-join rule)
            self.sub = self.svc.subscriber([self.prefix])
        self.subscribed.set()
        while not self._stop.is_set() and self.svc.running:
            env = self.sub.recv(RECV_MS)
            if env is None:
                continue
            # weights.tiny also matches weights.tiny_memory.v1: another line's, not ours
            mine = [
                e for e in (env, *self.sub.drain(16)) if version_of_topic(e.topic, self.cfg.name) is not False
            ]
            if not mine:
                continue
            try:
                self.handle_many(mine)
            except Exception:  # a bad file is a reject; anything else must not end the feed either
                self.svc.log.exception("weights feed: unexpected error")

    def handle_many(self, envs: list[Envelope]) -> None:
        """Messages that arrived together: only the one the follower would end up with is loaded; the others
        it would have taken on the way are superseded (counted, duplicates not), the rest judged as usual."""
        offers = [self.offer(e) for e in envs]
        saved, chosen = self.follower.current, None
        try:  # walk them in order as the follower would, without loading anything
            for i, o in enumerate(offers):
                if o is not None and self.follower.verdict(o) == "take":
                    self.follower.current, chosen = o, i
        finally:
            self.follower.current = saved
        superseded = set()
        for i, e in enumerate(envs):
            if i == chosen:
                continue
            o = offers[i]
            if o is not None and self.follower.verdict(o) == "take":
                superseded.add((e.msg.run, e.msg.batch, e.msg.sha256))
            else:
                self.handle(e)
        if chosen is not None:
            superseded.discard((envs[chosen].msg.run, envs[chosen].msg.batch, envs[chosen].msg.sha256))
        if superseded:
            self.svc.metrics.drops.labels(cause="weights_superseded").inc(len(superseded))
        if chosen is not None:
            self.handle(envs[chosen])

    def offer(self, env: Envelope) -> Offer | None:
        """Version, stream and batch of a message of our line; None when its topic and run disagree."""
        w: Weights = env.msg
        named = parse_run_name(w.run)
        version = named[1] if named is not None and named[0] == w.model else 0
        on_topic = version_of_topic(env.topic, self.cfg.name)
        if on_topic is not None and on_topic != version:
            return None
        return Offer(version, float(w.since), int(w.batch))

    def handle(self, env: Envelope) -> bool:
        """One weights message; True when it was loaded (ready for the swap)."""
        if version_of_topic(env.topic, self.cfg.name) is False:
            return False  # weights.tiny also matches weights.tiny_memory: another line's, not ours
        w: Weights = env.msg
        key = (w.run, w.batch, w.sha256)
        if key == self._seen:
            return False  # the broker's snapshot and the live message can both arrive: judge each once
        offer = self.offer(env)
        if offer is not None and offer == self.follower.current:
            return False  # what it loaded last, again (a snapshot's copy after another message came between)
        self._seen = key
        self.received += 1
        version = offer.version if offer is not None else 0
        meta = WeightsMeta(
            w.model, w.run, int(w.batch), float(w.created), w.sha256, time.monotonic(), version
        )
        try:
            if self.trusted is not None and not any(vouches(t, env.sender) for t in self.trusted):
                raise WeightsError(
                    "weights_sender_not_allowed",
                    f"from {env.sender[:64]!r}, which no key in player.weights_from vouches for",
                )
            if offer is None:
                raise WeightsError("wrong_version", f"run {w.run!r} sent on {env.topic!r}")
            # the message's own claims first (cheap, no payload parsed): weights of another line or network
            # on our topic are bad input, refused and counted as such, whichever version we follow
            check_weights(w, self.cfg)
            verdict = self.follower.verdict(offer)
            if verdict == "not_followed":
                self.not_followed += 1
                self.svc.metrics.drops.labels(cause="not_followed").inc()
                return False
            if verdict == "older_batch":
                current = self.follower.current
                raise WeightsError(
                    "older_batch", f"we already have batch {current.batch if current else '?'} of {w.run}"
                )
            self.swapper.load(w.payload, meta)
        except WeightsError as e:
            self.refused += 1
            self.last_error = str(e)
            self.svc.reject(
                e.reason, f"weights {w.run} batch {w.batch} refused, still driving on what we have: {e}"
            )
            return False
        self.follower.took(offer)
        self.loaded += 1
        self.svc.log.info(f"weights {w.run} batch {w.batch} loaded; swap policy: {self.swapper.policy}")
        return True
