"""Where a run's training starts: its newest good checkpoint, a new run's configured files, or a refusal.

The one rule that matters: a run that was trained (its manifest names a checkpoint, or checkpoints were
refused) never silently starts again from scratch behind its batch counter's back.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from charles.trainer.checkpoint import CheckpointError, LoadedCheckpoint, load_latest
from charles.trainer.initial import fresh_start
from charles.trainer.runs import RunDir


@dataclass
class Resumed:
    """What ``resume`` did."""

    path: Path | None
    """The checkpoint training continues from; None: a new run."""
    batch: int = 0
    refused: list = field(default_factory=list)
    """(path, CheckpointError) of newer checkpoints that could not be loaded."""
    started: str = ""
    """A new run: what its weights start from (for the log)."""


def check_resumable(run: RunDir, loaded: LoadedCheckpoint | None, refused: list) -> None:
    """Raise when no checkpoint loads although the run was trained (or had checkpoints we refused)."""
    m = run.manifest
    if loaded is None and (refused or (m is not None and m.checkpoint)):
        raise CheckpointError(
            "no_good_checkpoint",
            f"{run.name} was trained to batch {m.batch if m else '?'} but none of its checkpoints "
            f"can be loaded (see the errors above; refused ones are moved aside in {run.checkpoints}); "
            "put a good checkpoint back, or train a new version (--new-version)",
        )


def resume(
    run: RunDir,
    trainer: Any,
    mcfg: Any,
    *,
    pretrained_file: str = "",
    transfer: Mapping[str, str] | None = None,
    quarantine: bool = True,
) -> Resumed:
    """Restore ``trainer`` (a ``charles.trainer.training.Trainer``) from the run's newest good checkpoint,
    or start a new run from its configured files. ``quarantine``: move refused checkpoints aside (rank 0)."""
    loaded, refused = load_latest(run.checkpoints, mcfg, trainer.module, quarantine=quarantine)
    check_resumable(run, loaded, refused)
    if loaded is None:
        return Resumed(
            None, refused=refused, started=fresh_start(trainer.module, mcfg, pretrained_file, transfer)
        )
    trainer.restore(loaded)
    return Resumed(loaded.path, batch=loaded.batch, refused=refused)
