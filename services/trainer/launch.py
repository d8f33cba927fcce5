"""One command for one or several training processes: ``charles trainer`` starts torchrun itself.

Compose and k8s run every trainer as ``python -m charles.trainer`` and say how many GPUs with one setting,
``trainer.procs`` (``CHARLES__TRAINER__PROCS``; 0: one per GPU the container sees). When it comes to N > 1
and this process is not a torchrun worker already, the entry point runs, as its child::

    python -m torch.distributed.run --nnodes=1 --nproc_per_node=N --rdzv-backend=c10d
        --rdzv-endpoint=127.0.0.1:0 --local-addr=127.0.0.1 -m charles.trainer <its own arguments>

and waits for it. Each worker finds ``LOCAL_RANK`` (so it does not launch again), joins the process group
(``charles.trainer.training.Distributed``) and trains its share of the sets (``charles.trainer.service``).
One machine, so the rendezvous is on loopback with a port the kernel picks: a container's hostname need not
resolve, and nothing outside the pod has to reach it.

Stopping: torchrun answers SIGTERM by stopping its workers and then raising (a traceback, exit status 1),
so a clean stop would read as a crash. SIGTERM or SIGINT here goes to the workers instead (torchrun's
children, each in a session of its own): every rank stops as a single trainer does (rank 0 writes the
last checkpoint), torchrun sees them all exit 0 and exits 0 itself. A worker that fails makes torchrun stop
the others and exit non-zero, which is this process's exit status too.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


def is_worker(environ: Mapping[str, str] = os.environ) -> bool:
    """True in a process that torchrun started (it sets LOCAL_RANK): it trains, it does not launch."""
    return "LOCAL_RANK" in environ


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def processes(procs: int, device: str) -> int:
    """How many training processes ``trainer.procs`` asks for on this machine (``device``: trainer.device).

    Raises ValueError when the machine cannot give every process a GPU of its own."""
    if device == "cpu":
        return max(1, procs)
    if procs == 1:
        return 1
    gpus = visible_gpus()
    if procs == 0:
        return max(1, gpus)
    if gpus and procs > gpus:
        raise ValueError(
            f"trainer.procs is {procs} but this machine shows {gpus} GPU(s): one process per GPU"
        )
    if not gpus and device == "cuda":
        raise ValueError(f"trainer.procs is {procs} on trainer.device cuda, but CUDA is not available here")
    return procs


def torchrun_command(procs: int, program: Sequence[str], python: str = sys.executable) -> list[str]:
    """torchrun on this machine alone running ``program`` (``["-m", "charles.trainer", ...]`` or a script)."""
    return [
        python,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        f"--nproc_per_node={procs}",
        "--rdzv-backend=c10d",
        "--rdzv-endpoint=127.0.0.1:0",
        "--local-addr=127.0.0.1",
        *program,
    ]


def torchrun_env(environ: Mapping[str, str] = os.environ) -> dict[str, str]:
    """The environment torchrun gets: gloo (the CPU backend) binds to the interface the host name resolves to,
    which a CI box or a container need not have; one machine, so loopback unless told otherwise."""
    return {"GLOO_SOCKET_IFNAME": "lo", **environ}


def children(pid: int) -> list[int]:
    """The processes ``pid`` started and that still run (from /proc; every thread's list)."""
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, ValueError):
            continue
    return out


def run_ranks(procs: int, argv: Sequence[str]) -> int:
    """Run ``procs`` training processes under torchrun; returns its exit status (0: every rank stopped well)."""
    cmd = torchrun_command(procs, ["-m", "charles.trainer", *argv])
    log.info(f"starting {procs} training processes: {' '.join(cmd)}")
    proc = subprocess.Popen(cmd, env=torchrun_env())

    def stop(signum: int, _frame) -> None:
        workers = children(proc.pid)
        log.info(f"{signal.Signals(signum).name}: stopping the {len(workers)} training processes")
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
                os.kill(pid, signal.SIGTERM)
        if not workers:  # torchrun has not started them yet: it stops what it has and exits
            proc.send_signal(signal.SIGTERM)

    before = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        rc = proc.wait()
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
    if rc:
        log.error(f"torchrun exited with status {rc}")
    return rc
