"""The trainer process around ``Trainer``: balanced ``set.*`` in, ``weights.<line>.v<N>`` and checkpoints out.

Threads, and what each one owns::

    receive   # irregular (a set per balancer completion) <- set.*, 1 Hz x services <- heartbeat.*
              the SUB socket; inserts sets into the buffers (never waits for training)
    prefetch  draws from the buffers once every buffer is >= start_fraction full, decodes, collates
    train     (the caller of run) the model, the optimizer, checkpoints, the weights publisher, TensorBoard
    console   # console_hz -> console.<instance>; heartbeat info, gauges, the --console terminal view
    heartbeat charles.runtime's, 1 Hz -> heartbeat.<instance>

Start order: resume the newest good checkpoint, refill the buffers from disk (before any socket is read),
then subscribe. With ``trainer.publish: live`` each training period is a new *stream* of the version: its
weights carry the period's start as ``since`` (players following ``newest`` take the stream started last,
charles.proto.versions); with ``off`` nothing is published (off-stream training; ``charles stream`` puts
a checkpoint on the bus later). Status is "waiting for buffers" until every buffer is full enough, "training" after.
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

import dataclasses
import threading
import time
from pathlib import Path
from typing import Any

from charles.config import Config
from charles.outputs import outputs_signature
from charles.proto import Console, Weights
from charles.proto.versions import weights_topic
from charles.runtime import Publisher, Service, Subscriber
from charles.trainer.batches import BatchAssembler, BatchConfig, Prefetcher
from charles.trainer.buffers import buffer_names
from charles.trainer.checkpoint import clean_temp, prune
from charles.trainer.console import TerminalConsole, heartbeat_info, score_state
from charles.trainer.receiver import Receiver
from charles.trainer.reporting import Deltas, Report, TensorBoardLog, TrainerMetrics
from charles.trainer.resume import resume
from charles.trainer.runs import RunDir
from charles.trainer.storage import open_buffers
from charles.trainer.training import Distributed, StepResult, Trainer, resolve_device
from charles.version import code_version

WAIT_S = 0.1
"""Longest wait for a batch: SIGTERM only sets a flag, so the loop looks at it this often."""
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
        # the balanced outputs follow the model line's (kinds, classes): the buffers and the check on
        # every balancer's heartbeat come from this one derivation
        balanced = cfg.balancer.output_specs(self.mcfg.outputs)
        names = buffer_names([s.name for s in balanced], int(cfg.balancer.version))
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
            history_len=self.mcfg.history_rows,
            decode_threads=self.tcfg.threads_for_decode,
            gpu_decode=self.tcfg.gpu_decode,
            prefetch=self.tcfg.prefetch,
        )

        # 3. the bus
        self.sub = sub or svc.subscriber(["set.", "heartbeat.", "score."], late_join=False)
        self.receiver = Receiver(
            svc, self.buffers, self.sub, self.rank, self.world, outputs=outputs_signature(balanced)
        )
        self.live = self.tcfg.publish == "live"
        self.pub = (pub or svc.publisher("weights")) if self.main and self.live else None
        self.topic = weights_topic(self.mcfg.name, run.version)
        self.since = 0.0
        """When this period's stream started (Unix time; set as the period starts)."""
        self.console_pub = svc.publisher("console") if self.main else None
        self.terminal = terminal if self.main else None

        # 4. what is shown and logged
        self.report = Report(
            TrainerMetrics(svc.metrics.registry),
            svc.metrics.drops,
            loss_history=self.tcfg.loss_history,
            world=self.world,
            target_reuse=min(self.tcfg.flow_reuse, self.tcfg.buffer.samples_per_insert),
        )
        self.metrics = self.report.metrics
        self.metrics.batch.set(self.trainer.batch)
        self._loop_time = svc.metrics.loop.labels("train_step")
        self._dropped_nonfinite = svc.metrics.drops.labels(cause="nonfinite_batch")
        self.published = 0
        self.last_publish_batch: int | None = None
        self.last_publish_time: float | None = None
        self.status = "starting"
        self.last_step_t = 0.0
        self.tb = TensorBoardLog.open(run.tb, self.trainer.batch, self.log) if self.main else None
        self.assembler: BatchAssembler | None = None
        self._bad_frames = Deltas()
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
        r = resume(
            self.run_dir,
            self.trainer,
            self.mcfg,
            pretrained_file=self.cfg.model.pretrained_file,
            transfer=self.cfg.model.transfer,
            quarantine=self.main,
        )
        self.refused = r.refused
        if r.path is not None:
            self.resumed_from = r.path
            self.log.info(f"resumed {self.run_dir.name} from {r.path.name} (batch {r.batch})")
        elif self.main:
            self.log.info(f"{self.run_dir.name} is a new run: {r.started}")

    def _storage_path(self) -> Path:
        suffix = "" if self.rank == 0 else f".rank{self.rank}"
        if self.tcfg.storage.path:
            p = Path(self.tcfg.storage.path)
            return p.with_name(p.stem + suffix + p.suffix) if suffix else p
        return self.run_dir.storage / f"buffers{suffix}.sqlite3"

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> None:
        """Train until SIGTERM (``svc.stop``), then shut down cleanly. Call on the thread that trains."""
        self.assembler = BatchAssembler(self.buffers, self.batch_config, self.device)
        self.prefetcher = Prefetcher(self.assembler, poll=WAIT_S)
        self.receiver.start()
        self.since = time.time()
        if self.main:
            period = self.run_dir.start_period(self.trainer.batch, code_version(), self.tcfg.publish)
            self.since = period.started
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
        self.report.trained(b, res)
        if with_metrics and self.tb is not None:
            cap = self.tcfg.buffer.capacity
            self.tb.step(
                b,
                res,
                lr=self.trainer.lr,
                rates=self.report.rates,
                fills={name: size / cap for name, size in self.buffers.sizes().items()},
                reused=dict(self.report.reused.seen),
            )
        if b % self.tcfg.publish_every == 0:
            self.publish()
        if b % self.tcfg.checkpoint_every == 0:
            self.checkpoint()
        return res

    # -- weights and checkpoints --------------------------------------------------------------------------------

    def publish(self) -> bool:
        """Send the current weights on ``weights.<line>.v<N>`` (rank 0, publish live; once per batch number)."""
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
            since=self.since,
        )
        sent = self.pub.send(self.topic, w)
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
        stats = self.buffers.stats()
        self.report.look(
            now,
            self.trainer.batch,
            self.trainer.samples,
            wait_s,
            trained=bool(self.last_step_t),
            buffers=stats["buffers"],
            starved_s=stats["starved_s"],
            storage_dropped=self.storage.dropped if self.storage is not None else None,
        )
        # frames that did not decode at batch time: bad input, counted
        bad = self.assembler.stats()["bad_frames"] if self.assembler is not None else 0
        if grew := self._bad_frames.step("bad", bad):
            self.svc.reject(
                "undecodable_frame",
                f"{grew} sample(s) whose frame does not decode, masked and taken out of the buffers",
                n=grew,
            )
        rates = self.report.rates
        cap = self.tcfg.buffer.capacity
        buffers = {n: {"fill": s["size"], "capacity": cap} for n, s in stats["buffers"].items()}
        if self.svc.running and self.status != "starting":
            recent = self.last_step_t and now - self.last_step_t < max(
                2.0, 4 / max(rates.batches_per_s, 1e-3)
            )
            if not recent and not self.buffers.ready(self.per_buffer):
                self.status = "waiting for buffers"
                self.svc.status = "waiting"
        state = {
            "status": self.status,
            "run": self.run_dir.name,
            "model": self.mcfg.name,
            "version": self.run_dir.version,
            "publish": self.tcfg.publish,
            "device": str(self.device) + (f" x{self.world}" if self.world > 1 else ""),
            "batch": self.trainer.batch,
            "samples": self.trainer.samples,
            "buffers": buffers,
            "start_fraction": self.tcfg.buffer.start_fraction,
            **self.report.summary(),
            "lr": self.trainer.lr,
            "collectors": self.receiver.seen("collector"),
            "players": self.receiver.seen("player"),
            "published": self.published,
            "last_publish_batch": self.last_publish_batch,
            "last_publish_time": self.last_publish_time,
            "checkpoint_batch": self.checkpoint_batch,
            "sets_received": self.receiver.sets,
            "refused_balancers": sorted(self.receiver.refused_balancers),
            **score_state(self.receiver.scores.get(self.run_dir.name)),
        }
        self.state = state
        self.svc.info = heartbeat_info(state)  # a new dict each time: the heartbeat thread reads it
        return state

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
