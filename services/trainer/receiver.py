"""The trainer's receive loop: balanced ``set.*`` into the buffers on a thread of its own, so training
never blocks receiving, ``heartbeat.*`` for who is connected and what each balancer balances, and the
judge's ``score.*`` for the console (how the run drives on held-out towns).

Multi-GPU: every rank receives every set and keeps the ones it owns (``Receiver.mine``; see
charles.trainer.service).
"""

from __future__ import annotations

import threading
import time
import zlib

from charles.proto import Heartbeat, SampleSet, Score
from charles.runtime import SeqGaps, Service, Subscriber
from charles.trainer.buffers import Buffers

SEEN_TTL_S = 30.0
"""A collector or player not heard from for this long leaves the console's lists."""
MAX_SEEN = 4096
MAX_SCORES = 64
"""Runs whose newest score is kept (the console shows this run's; several versions may be judged)."""


class Receiver:
    """Feeds the buffers from the bus on its own thread, so training never blocks receiving.

    ``# irregular <- set.*`` (each set goes to the buffer of the output it balances),
    ``# 1 Hz x services <- heartbeat.*`` (which collectors and players are connected) and
    ``# minutes apart <- score.*`` (the judge's newest score per run, for the console).
    """

    def __init__(
        self,
        svc: Service,
        buffers: Buffers,
        sub: Subscriber,
        rank: int = 0,
        world: int = 1,
        outputs: str | None = None,
    ):
        self.svc = svc
        self.buffers = buffers
        self.sub = sub
        self.rank, self.world = rank, world
        self.outputs = outputs
        """The balanced outputs this trainer's line needs (charles.outputs.outputs_signature); None: any."""
        self.refused_balancers: dict[str, str] = {}
        """Balancer instance -> the outputs its heartbeat says it balances, where they are not ours."""
        self.sets = 0
        self.samples = 0
        self.other_rank = 0
        self.gaps = SeqGaps(drops=svc.metrics.drops if svc is not None else None)
        """Sets that never arrived (gaps in their senders' numbering: a full broker queue while we stalled)."""
        self.scores: dict[str, Score] = {}
        """Run -> the judge's newest score of it (bounded: MAX_SCORES, the oldest run forgotten first)."""
        self._seen: dict[str, tuple[str, float]] = {}  # id -> (service, monotonic time)
        self._seen_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="receive", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                env = self.sub.recv(100)
                if env is None:
                    continue
                if isinstance(env.msg, SampleSet):
                    self._count_gap(f"{env.sender}/{env.topic}", env.msg.seq)
                    if env.sender in self.refused_balancers:
                        self._refuse(env.sender)
                    else:
                        self.on_set(env.msg)
                elif isinstance(env.msg, Score):
                    self.on_score(env.msg)
                elif isinstance(env.msg, Heartbeat):
                    self._saw(env.msg.instance, env.msg.service)
                    if env.msg.service == "balancer":
                        self.check_balancer(env.msg.instance, env.msg.info.get("outputs"))
            except Exception:  # noqa: BLE001 - one bad message must never stop the receiving
                self.svc.log.exception("receive loop: a message could not be handled")

    def _count_gap(self, key: str, seq: int | None) -> None:
        """Count the sets of one sender's topic that went missing before this one (a restart starts over)."""
        if seq is not None and (lost := self.gaps.see(key, seq)):
            self.svc.metrics.drops.labels(cause="seq_gap").inc(lost)

    def check_balancer(self, instance: str, outputs: object) -> bool:
        """Whether a balancer's sets mean what this line learns (its heartbeat says what it balances).

        A balancer of other kinds or classes would train this line on wrongly binned sets without any error
        downstream, so its sets are refused, counted and said so once, until its heartbeat agrees again.
        """
        if self.outputs is None or not isinstance(outputs, str) or outputs == self.outputs:
            if self.refused_balancers.pop(instance, None) is not None:
                self.svc.log.info(f"balancer {instance} now balances {outputs}: its sets are taken again")
            return True
        if instance not in self.refused_balancers:
            if len(self.refused_balancers) >= MAX_SEEN:
                del self.refused_balancers[next(iter(self.refused_balancers))]
            self.svc.log.error(
                f"balancer {instance} balances {outputs}, but this trainer's line learns {self.outputs}: "
                "its sets are refused. Run the balancer with this run's model line (balancer.kinds and "
                "balancer.bins follow model.outputs unless set)"
            )
        self.refused_balancers[instance] = outputs
        return False

    def _refuse(self, sender: str) -> None:
        self.svc.reject(
            "outputs_mismatch",
            f"a set from balancer {sender}, which balances {self.refused_balancers.get(sender)}; "
            f"this trainer's line learns {self.outputs}",
        )

    def mine(self, s: SampleSet) -> bool:
        """Whether this rank trains this set (see the module docstring); always true on one process."""
        if self.world == 1 or not s.samples:
            return self.world == 1 or self.rank == 0
        first = s.samples[0]
        return zlib.crc32(f"{first.collector}:{first.seq}".encode()) % self.world == self.rank

    def on_set(self, s: SampleSet) -> int:
        if not self.mine(s):
            self.other_rank += 1
            return 0
        before = dict(self.buffers.rejected)
        added = self.buffers.add_set(s)
        if not added:
            for reason, n in self.buffers.rejected.items():
                if n != before.get(reason, 0):
                    self.svc.reject(
                        reason,
                        f"a v{s.version} set for a buffer {'+'.join(sorted(s.outputs))!r}; this trainer's buffers "
                        f"are {self.buffers.names} (do balancer.version and balancer.outputs match the balancer's?)",
                    )
            return 0
        self.sets += 1
        self.samples += added
        for c in {x.collector for x in s.samples}:
            self._saw(c, "collector")
        return added

    def on_score(self, s: Score) -> None:
        old = self.scores.pop(s.run, None)
        if old is not None and old.batch > s.batch:
            s = old  # a replayed older score (the broker's snapshot after a live one) does not go back
        elif old is None and len(self.scores) >= MAX_SCORES:
            del self.scores[next(iter(self.scores))]
        self.scores[s.run] = s

    def _saw(self, ident: str, service: str) -> None:
        with self._seen_lock:
            if ident not in self._seen and len(self._seen) >= MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            self._seen[ident] = (service, time.monotonic())

    def seen(self, service: str, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._seen_lock:
            return sorted(i for i, (s, t) in self._seen.items() if s == service and now - t < SEEN_TTL_S)
