"""The trainer process around ``Trainer``: balanced ``set.*`` in, ``weights.<line>`` and checkpoints out.

Threads, and what each one owns::

    receive   # irregular (a set per balancer completion) <- set.*, 1 Hz x services <- heartbeat.*
              the SUB socket; inserts sets into the buffers (never waits for training)
    prefetch  draws from the buffers once every buffer is >= start_fraction full, decodes, collates
    train     (the caller of run) the model, the optimizer, checkpoints, the weights publisher, TensorBoard
    console   # console_hz -> console.<instance>; heartbeat info, gauges, the --console terminal view
    heartbeat charles.runtime's, 1 Hz -> heartbeat.<instance>

Start order: resume the newest good checkpoint, refill the buffers from disk (before any socket is read),
then subscribe. Status is "waiting for buffers" until every buffer is full enough, "training" after.
SIGTERM stops at a batch boundary; ``shutdown`` then writes a final checkpoint, publishes the final
weights (closing that publisher with a linger so they leave), flushes the storage and closes the period.

Multi-GPU (torchrun, WORLD_SIZE > 1): every rank runs this whole service with its own buffers and
storage file (``buffers.rank<r>.sqlite3``). Every rank subscribes to ``set.*``; a set belongs to rank
``crc32(first sample's collector:seq) % world`` and the others drop it, so the ranks train on disjoint data
(the split holds even when one rank misses a message). A batch has ``batch_size`` samples per rank, so one
optimizer step sees ``world x batch_size``; the ranks agree every step whether all have a batch and whether
one is stopping, so they step and stop together. Only rank 0 checkpoints, publishes, writes TensorBoard and
the console and owns the run's manifest; every rank sends heartbeats (instance ``<id>-rank<r>``).
"""

from __future__ import annotations

import collections
import dataclasses
import threading
import time
import zlib
from pathlib import Path
from typing import Any

import prometheus_client as prom

from charles.config import Config
from charles.proto import Console, Heartbeat, SampleSet, Weights
from charles.runtime import Publisher, SeqGaps, Service, Subscriber
from charles.trainer.batches import BatchAssembler, BatchConfig, Prefetcher
from charles.trainer.buffers import Buffers, buffer_names
from charles.trainer.checkpoint import CheckpointError, clean_temp, code_version, load_latest, prune
from charles.trainer.console import LossHistory, TerminalConsole, heartbeat_info
from charles.trainer.initial import fresh_start
from charles.trainer.runs import RunDir
from charles.trainer.storage import open_buffers
from charles.trainer.training import Distributed, StepResult, Trainer, resolve_device

WAIT_S = 0.1
"""Longest wait for a batch: SIGTERM only sets a flag, so the loop looks at it this often."""
SEEN_TTL_S = 30.0
"""A collector or player not heard from for this long leaves the console's lists."""
MAX_SEEN = 4096
RATE_WINDOW = 20
"""Console refreshes the batches/s and samples/s figures average over (10 s at 2 Hz)."""


# ---- the receive loop -------------------------------------------------------------------------------------


class Receiver:
    """Feeds the buffers from the bus on its own thread, so training never blocks receiving.

    ``# irregular <- set.*`` (each set goes to the buffer of the output it balances) and
    ``# 1 Hz x services <- heartbeat.*`` (which collectors and players are connected).
    """

    def __init__(self, svc: Service, buffers: Buffers, sub: Subscriber, rank: int = 0, world: int = 1):
        self.svc = svc
        self.buffers = buffers
        self.sub = sub
        self.rank, self.world = rank, world
        self.sets = 0
        self.samples = 0
        self.other_rank = 0
        self.gaps = SeqGaps(drops=svc.metrics.drops)
        """Sets that never arrived (gaps in their senders' numbering: a full broker queue while we stalled)."""
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
                    self.on_set(env.msg)
                elif isinstance(env.msg, Heartbeat):
                    self._saw(env.msg.instance, env.msg.service)
            except Exception:  # noqa: BLE001 - one bad message must never stop the receiving
                self.svc.log.exception("receive loop: a message could not be handled")

    def _count_gap(self, key: str, seq: int | None) -> None:
        """Count the sets of one sender's topic that went missing before this one (a restart starts over)."""
        if seq is not None and (lost := self.gaps.see(key, seq)):
            self.svc.metrics.drops.labels(cause="seq_gap").inc(lost)

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

    def _saw(self, ident: str, service: str) -> None:
        with self._seen_lock:
            if ident not in self._seen and len(self._seen) >= MAX_SEEN:
                del self._seen[next(iter(self._seen))]
            self._seen[ident] = (service, time.monotonic())

    def seen(self, service: str, now: float | None = None) -> list[str]:
        now = time.monotonic() if now is None else now
        with self._seen_lock:
            return sorted(i for i, (s, t) in self._seen.items() if s == service and now - t < SEEN_TTL_S)


# ---- metrics ----------------------------------------------------------------------------------------------


class TrainerMetrics:
    """The trainer's Prometheus families (names fixed: the Grafana dashboard and charles.topology use them)."""

    def __init__(self, registry: prom.CollectorRegistry):
        r = registry
        self.batches = prom.Counter(
            "charles_trainer_batches_total", "Batches trained by this process", registry=r
        )
        self.samples = prom.Counter(
            "charles_trainer_samples_trained_total", "Samples trained by this process (all ranks)", registry=r
        )
        self.fill = prom.Gauge(
            "charles_trainer_buffer_fill_ratio",
            "Buffer size / capacity, per balanced output",
            ["output"],
            registry=r,
        )
        self.loss = prom.Gauge(
            "charles_trainer_loss", "Loss of the last batch per output (and total)", ["output"], registry=r
        )
        self.reused = prom.Counter(
            "charles_trainer_samples_reused_total",
            "Draws of a sample already trained on (buffer.samples_per_insert > 1), per balanced output",
            ["output"],
            registry=r,
        )
        self.wait = prom.Gauge(
            "charles_trainer_data_wait_fraction",
            "Share of recent wall time the step waited for a batch",
            registry=r,
        )
        self.published = prom.Counter(
            "charles_trainer_weights_published_total", "Weights sent to players", registry=r
        )
        self.publish_s = prom.Histogram(
            "charles_trainer_publish_seconds",
            "Time to serialise and send the weights",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.batches_per_s = prom.Gauge(
            "charles_trainer_batches_per_second", "Recent training rate", registry=r
        )
        self.samples_per_s = prom.Gauge(
            "charles_trainer_samples_per_second", "Recent samples trained per second", registry=r
        )
        self.batch = prom.Gauge(
            "charles_trainer_batch", "The run's batch counter (continues across restarts)", registry=r
        )


# ---- the service ------------------------------------------------------------------------------------------


class TrainerService:
    """Wires a ``Trainer`` to the buffers, the bus, the run directory and the consoles.

    ``sub`` and ``pub`` may be injected (tests); by default they are the service's own sockets.
    """

    def __init__(
        self,
        svc: Service,
        cfg: Config,
        run: RunDir,
        *,
        dist: Distributed | None = None,
        sub: Subscriber | None = None,
        pub: Publisher | None = None,
        terminal: TerminalConsole | None = None,
    ):
        self.svc = svc
        self.cfg = cfg
        self.tcfg = cfg.trainer
        self.mcfg = cfg.model.resolve()
        self.run_dir = run
        self.dist = dist
        self.rank = dist.rank if dist else 0
        self.world = dist.world if dist else 1
        self.main = self.rank == 0
        self.log = svc.log
        names = buffer_names(list(cfg.balancer.outputs), int(cfg.balancer.version))
        self.batch_size, self.per_buffer = self.tcfg.batch_for(len(names))
        if self.per_buffer > self.tcfg.buffer.capacity:
            raise ValueError(
                f"{self.per_buffer} samples per buffer per batch exceed trainer.buffer.capacity {self.tcfg.buffer.capacity}"
            )
        self.device = resolve_device(self.tcfg.device, dist.local_rank if dist else 0)

        # 1. the model, resumed from the newest good checkpoint (rank 0 first: it moves refused ones aside)
        self.trainer = Trainer(self.mcfg, self.tcfg, self.device, dist)
        self.resumed_from: Path | None = None
        self.refused: list = []
        if self.main:
            clean_temp(run.checkpoints)
            self._resume()
        if dist is not None:
            dist.barrier()
            if not self.main:
                self._resume()
        self.checkpoint_batch: int | None = self.trainer.batch if self.resumed_from else None

        # 2. the buffers, refilled from disk before any socket is read
        storage_cfg = dataclasses.replace(self.tcfg.storage, path=str(self._storage_path()))
        self.buffers, self.storage, self.refill = open_buffers(names, self.tcfg.buffer, storage_cfg)
        self.batch_config = BatchConfig(
            batch_size=self.batch_size,
            outputs=tuple(self.mcfg.output_names),
            image_size=(self.mcfg.height, self.mcfg.width),
            channels=3,
            stack_len=self.mcfg.frames - 1,
            history_len=self.mcfg.history_length if self.mcfg.history != "none" else 0,
            decode_threads=self.tcfg.threads_for_decode,
            gpu_decode=self.tcfg.gpu_decode,
            prefetch=self.tcfg.prefetch,
        )

        # 3. the bus
        self.sub = sub or svc.subscriber(["set.", "heartbeat."], late_join=False)
        self.receiver = Receiver(svc, self.buffers, self.sub, self.rank, self.world)
        self.pub = (pub or svc.publisher("weights")) if self.main else None
        self.console_pub = svc.publisher("console") if self.main else None
        self.terminal = terminal if self.main else None

        # 4. what is shown and logged
        self.metrics = TrainerMetrics(svc.metrics.registry)
        self.metrics.batch.set(self.trainer.batch)
        self._loop_time = svc.metrics.loop.labels("train_step")
        self._dropped_nonfinite = svc.metrics.drops.labels(cause="nonfinite_batch")
        self.history = LossHistory(self.tcfg.loss_history)
        self.losses: dict[str, float] = {}
        self.loss_total: float | None = None
        self.published = 0
        self.last_publish_batch: int | None = None
        self.last_publish_time: float | None = None
        self.status = "starting"
        self.last_step_t = 0.0
        self.batches_per_s = 0.0
        self.samples_per_s = 0.0
        self.data_wait = 0.0
        self._rates: collections.deque[tuple[float, int, int, float]] = collections.deque(maxlen=RATE_WINDOW)
        self._drops_seen: dict[str, int] = {}
        self._reused_seen: dict[str, int] = {}
        self.tb = self._tensorboard() if self.main else None
        self.assembler: BatchAssembler | None = None
        self.prefetcher: Prefetcher | None = None
        self._console_stop = threading.Event()
        self._console_thread = threading.Thread(target=self._console_loop, name="console", daemon=True)
        self.state: dict[str, Any] = {}
        self.refresh()
        self.log.info(
            f"{run.name}: {self.mcfg.name} on {self.device}, batch {self.trainer.batch}, "
            f"{self.batch_size} samples per batch ({self.per_buffer} from each of {names}), "
            f"refilled {self.refill.total} samples from {storage_cfg.path if self.storage else 'nowhere (storage off)'}"
        )

    # -- start ------------------------------------------------------------------------------------------------

    def _resume(self) -> None:
        loaded, refused = load_latest(
            self.run_dir.checkpoints, self.mcfg, self.trainer.module, quarantine=self.main
        )
        self.refused = refused
        m = self.run_dir.manifest
        if loaded is None and (refused or (m is not None and m.checkpoint)):
            # never restart a trained run from scratch behind its batch counter's back
            raise CheckpointError(
                "no_good_checkpoint",
                f"{self.run_dir.name} was trained to batch {m.batch if m else '?'} but none of its checkpoints "
                f"can be loaded (see the errors above; refused ones are moved aside in {self.run_dir.checkpoints}); "
                "put a good checkpoint back, or train a new version (--new-version)",
            )
        if loaded is None:
            # a new run: its configured files, if any (a resumed one continues its checkpoint instead)
            started = fresh_start(
                self.trainer.module, self.mcfg, self.cfg.model.pretrained_file, self.cfg.model.transfer
            )
            if self.main:
                self.log.info(f"{self.run_dir.name} is a new run: {started}")
            return
        self.trainer.restore(loaded)
        self.resumed_from = loaded.path
        self.log.info(f"resumed {self.run_dir.name} from {loaded.path.name} (batch {loaded.batch})")

    def _storage_path(self) -> Path:
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        if self.tcfg.storage.path:
            p = Path(self.tcfg.storage.path)
            return p.with_name(p.stem + suffix + p.suffix) if suffix else p
        return self.run_dir.storage / f"buffers{suffix}.sqlite3"

    def _tensorboard(self) -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # tensorboard is a dependency; a broken install must not stop training
            self.log.warning("tensorboard is not importable; no TensorBoard logs for this run")
            return None
        # purge_step: events a crashed session logged past the checkpoint we resume from are hidden
        purge = self.trainer.batch + 1 if self.trainer.batch else None
        return SummaryWriter(str(self.run_dir.tb), purge_step=purge, flush_secs=30)

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train until SIGTERM (``svc.stop``), then shut down cleanly. Call on the thread that trains."""
        self.assembler = BatchAssembler(self.buffers, self.batch_config, self.device)
        self.prefetcher = Prefetcher(self.assembler, poll=WAIT_S)
        self.receiver.start()
        if self.main:
            self.run_dir.start_period(self.trainer.batch, code_version())
        self.status = "waiting for buffers"
        self.svc.status = "waiting"
        self._console_thread.start()
        if self.tcfg.publish_on_start:
            self.publish()
        held: dict | None = None
        try:
            while True:
                stop = not self.svc.running
                batch = held
                if batch is None and not stop:
                    batch = self.prefetcher.get(timeout=WAIT_S)
                if self.dist is not None:
                    everyone, stop = self.dist.agree(batch is not None, stop)
                else:
                    everyone = batch is not None
                if stop:
                    break
                if not everyone:
                    held = batch  # another rank is still waiting: keep ours for the step we take together
                    continue
                held = None
                self.train(batch)
        finally:
            self.shutdown()

    def train(self, batch: dict) -> StepResult:
        t0 = time.perf_counter()
        with_metrics = (self.trainer.batch + 1) % self.tcfg.log_every == 0
        res = self.trainer.step(batch, with_metrics=with_metrics)
        self._loop_time.observe(time.perf_counter() - t0)
        if res.skipped:
            self._dropped_nonfinite.inc()
            self.svc.reject(
                "nonfinite_batch",
                f"loss {res.loss}, gradient norm {res.grad_norm} at batch {self.trainer.batch}",
            )
            return res
        self.last_step_t = time.monotonic()
        if self.status != "training":
            self.status = "training"
            self.svc.status = "ok"
        b = self.trainer.batch
        self.losses, self.loss_total = res.losses, res.loss
        self.history.add(b, res.loss)
        m = self.metrics
        m.batches.inc()
        m.samples.inc(res.samples * self.world)
        m.batch.set(b)
        m.loss.labels("total").set(res.loss)
        for name, v in res.losses.items():
            m.loss.labels(name).set(v)
        if with_metrics and self.tb is not None:
            self._log_tensorboard(res)
        if b % self.tcfg.publish_every == 0:
            self.publish()
        if b % self.tcfg.checkpoint_every == 0:
            self.checkpoint()
        return res

    def _log_tensorboard(self, res: StepResult) -> None:
        b, tb = self.trainer.batch, self.tb
        tb.add_scalar("loss/total", res.loss, b)
        for name, v in res.losses.items():
            tb.add_scalar(f"loss/{name}", v, b)
        for name, v in (res.metrics or {}).items():
            tb.add_scalar(f"metrics/{name}", v, b)
        tb.add_scalar("train/lr", self.trainer.lr, b)
        tb.add_scalar("train/grad_norm", res.grad_norm, b)
        tb.add_scalar("throughput/samples_per_s", self.samples_per_s, b)
        tb.add_scalar("throughput/batches_per_s", self.batches_per_s, b)
        tb.add_scalar("data/wait_fraction", self.data_wait, b)
        for name, s in self.buffers.sizes().items():
            tb.add_scalar(f"buffer/{name}", s / self.tcfg.buffer.capacity, b)
        for name, n in self._reused_seen.items():
            tb.add_scalar(f"reused/{name}", n, b)

    # -- weights and checkpoints --------------------------------------------------------------------------------

    def publish(self) -> bool:
        """Send the current weights on ``weights.<line>`` (rank 0; once per batch number)."""
        if self.pub is None or self.last_publish_batch == self.trainer.batch:
            return False
        t0 = time.perf_counter()
        b = self.trainer.batch
        payload = self.trainer.weights_payload(
            half=self.tcfg.publish_half, metadata={"charles.run": self.run_dir.name, "charles.batch": str(b)}
        )
        w = Weights(
            model=self.mcfg.name,
            run=self.run_dir.name,
            batch=b,
            config=self.mcfg.to_dict(),
            payload=payload,
            created=time.time(),
        )
        sent = self.pub.send(f"weights.{self.mcfg.name}", w)
        self.metrics.publish_s.observe(time.perf_counter() - t0)
        if sent:
            self.published += 1
            self.last_publish_batch = b
            self.last_publish_time = w.created
            self.metrics.published.inc()
        else:
            self.log.warning(f"weights of batch {b} not sent: the publisher is at its high-water mark")
        return sent

    def checkpoint(self) -> Path | None:
        """Write a checkpoint of the current batch (rank 0), keep the newest K, move the manifest on."""
        if not self.main or self.trainer.batch == 0 or self.checkpoint_batch == self.trainer.batch:
            return None
        t0 = time.perf_counter()
        path = self.trainer.save(
            self.run_dir.checkpoints,
            extra={
                "run": self.run_dir.name,
                "line": self.mcfg.name,
                "run_config": self.cfg.to_dict(),
                "published_batch": self.last_publish_batch,
            },
        )
        prune(self.run_dir.checkpoints, self.tcfg.keep_checkpoints)
        self.checkpoint_batch = self.trainer.batch
        self.run_dir.progress(self.trainer.batch, self.trainer.samples, path, self.last_publish_batch)
        self.log.info(f"checkpoint {path.name} in {time.perf_counter() - t0:.2f}s")
        return path

    # -- console, heartbeat info, gauges -----------------------------------------------------------------------

    def refresh(self) -> dict[str, Any]:
        """Recompute rates, gauges and the console state (console thread, ~console_hz)."""
        now = time.monotonic()
        wait_s = self.prefetcher.wait_s if self.prefetcher is not None else 0.0
        self._rates.append((now, self.trainer.batch, self.trainer.samples, wait_s))
        t0, b0, s0, w0 = self._rates[0]
        dt = now - t0
        if dt > 0:
            self.batches_per_s = (self.trainer.batch - b0) / dt
            self.samples_per_s = (self.trainer.samples - s0) / dt
            self.data_wait = min(1.0, (wait_s - w0) / dt) if self.last_step_t else 0.0
        stats = self.buffers.stats()
        cap = self.tcfg.buffer.capacity
        buffers = {n: {"fill": s["size"], "capacity": cap} for n, s in stats["buffers"].items()}
        m = self.metrics
        for n, s in stats["buffers"].items():
            m.fill.labels(n).set(s["fill"])
            if s["reused"] > self._reused_seen.get(n, 0):
                m.reused.labels(n).inc(s["reused"] - self._reused_seen.get(n, 0))
            self._reused_seen[n] = s["reused"]
        m.wait.set(self.data_wait)
        m.batches_per_s.set(self.batches_per_s)
        m.samples_per_s.set(self.samples_per_s)
        self._count_drops(stats)
        if self.svc.running and self.status != "starting":
            recent = self.last_step_t and now - self.last_step_t < max(2.0, 4 / max(self.batches_per_s, 1e-3))
            if not recent and not self.buffers.ready(self.per_buffer):
                self.status = "waiting for buffers"
                self.svc.status = "waiting"
        state = {
            "status": self.status,
            "run": self.run_dir.name,
            "model": self.mcfg.name,
            "device": str(self.device) + (f" x{self.world}" if self.world > 1 else ""),
            "batch": self.trainer.batch,
            "samples": self.trainer.samples,
            "buffers": buffers,
            "reused": dict(self._reused_seen),
            "start_fraction": self.tcfg.buffer.start_fraction,
            "samples_per_s": round(self.samples_per_s, 2),
            "batches_per_s": round(self.batches_per_s, 3),
            "data_wait": round(self.data_wait, 3),
            "loss": {k: round(v, 6) for k, v in self.losses.items()},
            "loss_total": None if self.loss_total is None else round(self.loss_total, 6),
            "loss_history": self.history.snapshot(),
            "lr": self.trainer.lr,
            "collectors": self.receiver.seen("collector"),
            "players": self.receiver.seen("player"),
            "published": self.published,
            "last_publish_batch": self.last_publish_batch,
            "last_publish_time": self.last_publish_time,
            "checkpoint_batch": self.checkpoint_batch,
            "sets_received": self.receiver.sets,
        }
        self.state = state
        self.svc.info = heartbeat_info(state)  # a new dict each time: the heartbeat thread reads it
        return state

    def _count_drops(self, stats: dict) -> None:
        """Buffer evictions and storage queue overflows as ``charles_drops_total{cause}`` (deltas)."""
        totals = {
            "buffer_evicted": sum(s["evicted"] for s in stats["buffers"].values()),
            "buffer_bytes": sum(s["evicted_bytes"] for s in stats["buffers"].values()),
        }
        if self.storage is not None:
            totals["storage_queue"] = self.storage.dropped
        for cause, n in totals.items():
            d = n - self._drops_seen.get(cause, 0)
            if d > 0:
                self.svc.metrics.drops.labels(cause=cause).inc(d)
            self._drops_seen[cause] = n

    def _console_loop(self) -> None:
        period = 1.0 / self.tcfg.console_hz
        while True:
            stopping = self._console_stop.wait(period)
            try:
                self.publish_console()
            except Exception:  # noqa: BLE001 - the console is never worth the training
                self.log.exception("console refresh failed")
            if stopping:
                return

    def publish_console(self) -> None:
        state = self.refresh()
        if self.console_pub is not None:
            self.console_pub.send(f"console.{self.svc.instance}", Console("trainer", state))
        if self.terminal is not None:
            self.terminal.draw(state)

    # -- stop ---------------------------------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Final checkpoint, final weights, storage flushed, period closed; within service.shutdown_s."""
        self.status = "stopping"
        self.svc.status = "stopping"
        t0 = time.monotonic()
        if self.prefetcher is not None:
            self.prefetcher.close(timeout=1.0)
        self.receiver.stop()
        self.buffers.close()
        try:
            self.checkpoint()
            self.publish()
        finally:
            if self.pub is not None:
                # Service.close closes sockets with linger 0, which would discard the final weights
                self.pub.close(linger_s=min(2.0, self.cfg.service.shutdown_s / 4))
            if self.storage is not None:
                self.storage.close(timeout=max(1.0, self.cfg.service.shutdown_s / 3))
            if self.main:
                self.run_dir.stop_period(
                    self.trainer.batch,
                    self.trainer.samples,
                    self.run_dir.checkpoints / f"batch_{self.checkpoint_batch:09d}"
                    if self.checkpoint_batch
                    else None,
                    self.last_publish_batch,
                )
                self.run_dir.unlock()
            self._console_stop.set()
            if self._console_thread.is_alive():
                self._console_thread.join(2.0)
            if self.tb is not None:
                self.tb.close()
            if self.assembler is not None:
                self.assembler.close()
            self.trainer.close()
            self.log.info(
                f"stopped {self.run_dir.name} at batch {self.trainer.batch} in {time.monotonic() - t0:.1f}s "
                f"({self.published} weight updates sent)"
            )
