"""Runs: a run is a version of a model line, with its own directory, batch counter and training periods.

Layout under ``$CHARLES_RUN_DIR`` (default ``runs/``)::

    runs/
      model_0004_inceptionresnetv2/              the line (a model preset's name)
        model_0004_inceptionresnetv2_v3/         a run: the line's third version
          manifest.json                          batch counter, samples, periods, model config
          checkpoints/batch_000184250/ ...       charles.trainer.checkpoint (the newest K)
          storage/buffers.sqlite3                the buffers' on-disk mirror (trainer.storage)
          tb/                                    TensorBoard event files
          run.lock                               held (flock) while a trainer trains this run

The manifest keeps the seed's record of a run: every *period* a trainer trained it ("Started training
model_0004_inceptionresnetv2_v3 from batch 22250 … stopped at batch 184250"), with start and stop batch and
wall time. A period is written as open when training starts and its stop is moved forward at every
checkpoint, so after a crash it still ends at the last checkpoint — exactly where the next period resumes.

Public API for the player, benches and tools: ``find_run`` (a line or run name -> its ``RunDir``),
``newest_weights`` (a line or run name -> the newest checkpoint's weights file), ``list_runs``.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from charles.proto.versions import parse_run_name, run_name
from charles.trainer.checkpoint import atomic_write, fsync_dir, list_checkpoints
from charles.trainer.checkpoint import newest_weights as _newest_in

RUN_DIR_ENV = "CHARLES_RUN_DIR"
CHECKPOINT_DIR_ENV = "CHARLES_CHECKPOINT_DIR"
STORAGE_DIR_ENV = "CHARLES_STORAGE_DIR"
MANIFEST = "manifest.json"
MANIFEST_FORMAT = 1
STREAMS = "streams.jsonl"
STREAMS_SHOWN = 100
"""Streams of a run that `charles models` reads back (the newest)."""
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class RunError(ValueError):
    """A run that cannot be opened as asked (another model's run, in use, a bad name)."""


def runs_root(root: str | os.PathLike | None = None) -> Path:
    """Where runs live: ``root`` if given, else ``$CHARLES_RUN_DIR``, else ``runs/``."""
    return Path(root if root is not None else os.environ.get(RUN_DIR_ENV) or "runs")


def _check_name(name: str, what: str) -> str:
    if not _SAFE.match(name):
        raise RunError(f"{what} {name!r} is not a safe directory name (letters, digits, _ . -)")
    return name


@dataclass
class Period:
    """One session of training a run (the seed's "Started … from batch X, stopped at batch Y")."""

    start_batch: int
    stop_batch: int
    started: float
    """Unix time."""
    stopped: float
    open: bool = True
    """True while the trainer runs — or when it died; its stop is then the last checkpoint."""
    host: str = ""
    code_version: str = ""
    publish: str = "live"
    """``live``: the period streamed its weights to players; ``off``: trained off-stream (trainer.publish)."""

    @property
    def seconds(self) -> float:
        return max(0.0, self.stopped - self.started)


@dataclass
class Manifest:
    line: str
    run: str
    version: int
    created: float
    batch: int = 0
    """Batches trained (optimizer steps): the newest checkpoint's counter."""
    samples: int = 0
    """Samples trained (all ranks)."""
    checkpoint: str | None = None
    """The newest checkpoint, relative to the run directory; absolute where CHARLES_CHECKPOINT_DIR put it
    outside (containers)."""
    published_batch: int | None = None
    periods: list[Period] = field(default_factory=list)
    name: str = ""
    """The configuration's ``run`` setting when this run was created (the experiment it belongs to)."""
    model: dict[str, Any] = field(default_factory=dict)
    """The ModelConfig (to_dict) the run trains; a different model cannot resume it."""
    format: int = MANIFEST_FORMAT

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True, allow_nan=False).encode()

    @classmethod
    def from_json(cls, data: bytes | str, where: str = "manifest") -> Manifest:
        try:
            d = json.loads(data)
            if not isinstance(d, dict) or d.get("format") != MANIFEST_FORMAT:
                raise ValueError(f"not a format-{MANIFEST_FORMAT} manifest")
            d["periods"] = [Period(**p) for p in d.get("periods", [])]
            return cls(**d)
        except (ValueError, TypeError) as e:
            raise RunError(f"{where} is unreadable: {e}") from None


class RunDir:
    """One run's directory and manifest. The trainer (rank 0) is the only writer."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        parsed = parse_run_name(self.path.name)
        if parsed is None:
            raise RunError(f"{self.path} is not a run directory name (<line>_v<N>)")
        self.line, self.version = parsed
        self.name = self.path.name
        self.manifest: Manifest | None = None
        self.error: str | None = None
        """Why the manifest could not be read (listings show it; open_run refuses the run)."""
        if (self.path / MANIFEST).is_file():
            try:
                self.manifest = self._read()
            except (RunError, OSError) as e:
                self.error = str(e)
        self._lock_fd: int | None = None
        self._period: Period | None = None

    def _placed(self, env: str, leaf: str) -> Path:
        # Containers keep checkpoints (precious) and storage (big, rotating, fast disk) on volumes of their
        # own: CHARLES_CHECKPOINT_DIR=/runs/checkpoints puts this run's at /runs/checkpoints/<line>/<run>.
        root = os.environ.get(env)
        return Path(root) / self.line / self.name if root else self.path / leaf

    @property
    def checkpoints(self) -> Path:
        return self._placed(CHECKPOINT_DIR_ENV, "checkpoints")

    @property
    def storage(self) -> Path:
        return self._placed(STORAGE_DIR_ENV, "storage")

    @property
    def tb(self) -> Path:
        return self.path / "tb"

    def _read(self) -> Manifest:
        return Manifest.from_json((self.path / MANIFEST).read_bytes(), str(self.path / MANIFEST))

    def save(self) -> None:
        assert self.manifest is not None
        atomic_write(self.path / MANIFEST, self.manifest.to_json())

    def create(self, model: dict[str, Any], name: str = "") -> Manifest:
        """Make the directories and, for a new run, its manifest."""
        for d in (self.path, self.checkpoints, self.storage, self.tb):
            d.mkdir(parents=True, exist_ok=True)
        if self.manifest is None:
            self.manifest = Manifest(
                line=self.line,
                run=self.name,
                version=self.version,
                created=time.time(),
                name=name,
                model=model,
            )
            self.save()
        return self.manifest

    # -- one trainer at a time --------------------------------------------------------------------------

    def lock(self) -> None:
        """Hold ``run.lock`` while training: a second trainer of the same run gets a clear error."""
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (the trainer runs on Linux)
            return
        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / "run.lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise RunError(
                f"run {self.name} is being trained by another trainer ({holder or 'unknown'})"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None

    # -- periods ----------------------------------------------------------------------------------------

    def start_period(self, batch: int, code_version: str = "", publish: str = "live") -> Period:
        """Record that training (re)starts at ``batch``; a period left open by a crash is closed first."""
        m = self.manifest
        assert m is not None, "create() first"
        now = time.time()
        for p in m.periods:
            p.open = False
        m.batch = batch
        self._period = Period(batch, batch, now, now, True, socket.gethostname(), code_version, publish)
        m.periods.append(self._period)
        self.save()
        return self._period

    def progress(
        self, batch: int, samples: int, checkpoint: Path | None = None, published: int | None = None
    ) -> None:
        """Move the counter and the open period's stop forward (at every checkpoint)."""
        m = self.manifest
        assert m is not None
        m.batch, m.samples = batch, samples
        if checkpoint is not None:
            # in containers the checkpoints live on a volume of their own, outside the run directory
            inside = checkpoint.is_relative_to(self.path)
            m.checkpoint = str(checkpoint.relative_to(self.path) if inside else checkpoint)
        if published is not None:
            m.published_batch = published
        if self._period is not None:
            self._period.stop_batch = batch
            self._period.stopped = time.time()
        self.save()

    def stop_period(
        self, batch: int, samples: int, checkpoint: Path | None = None, published: int | None = None
    ) -> None:
        if self._period is not None:
            self._period.open = False
        self.progress(batch, samples, checkpoint, published)
        self._period = None

    def newest_weights(self) -> Path | None:
        return _newest_in(self.checkpoints)

    def checkpoint_path(self, batch: int) -> Path:
        """The checkpoint of ``batch``; RunError naming the batches there are when it is not one of them."""
        have = dict(list_checkpoints(self.checkpoints))
        if batch not in have:
            shown = ", ".join(str(b) for b in sorted(have)[-12:]) or "none"
            raise RunError(f"{self.name} has no checkpoint at batch {batch} (its checkpoints: {shown})")
        return have[batch]

    def rewind(self, batch: int) -> list[Path]:
        """Make the checkpoint of ``batch`` the newest, so training continues from it (the seed's "continuing
        training from batch 162650" after it had reached 165250). Newer checkpoints move aside, whole, into
        ``checkpoints/superseded-<time>-from-<batch>/``: they are another branch of the version's history,
        kept for whoever wants them, and out of the way of resume (which takes the newest) and of pruning
        (which would delete the new branch's first checkpoints for being older). Returns what moved."""
        target = self.checkpoint_path(batch)
        newer = [p for b, p in list_checkpoints(self.checkpoints) if b > batch]
        if newer:
            aside = self.checkpoints / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}-from-{batch}"
            aside.mkdir()
            for p in newer:
                os.rename(p, aside / p.name)
            fsync_dir(self.checkpoints)
        if self.manifest is not None:
            inside = target.is_relative_to(self.path)
            self.manifest.checkpoint = str(target.relative_to(self.path) if inside else target)
            self.manifest.batch = batch
            self.save()
        return newer

    # -- streams: saved checkpoints put on the bus by `charles stream` -------------------------------------

    def record_stream(self, batch: int, since: float, checkpoint: Path) -> None:
        """Append one ``charles stream`` of this run to ``streams.jsonl``: a file of its own, since the
        manifest belongs to the trainer (which may be training this run off-stream meanwhile)."""
        entry = {"batch": batch, "since": since, "host": socket.gethostname(), "checkpoint": str(checkpoint)}
        with open(self.path / STREAMS, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")

    def streams(self, last: int = STREAMS_SHOWN) -> list[dict[str, Any]]:
        """The newest ``last`` streams recorded, oldest first (a line per command; unreadable lines skipped)."""
        path = self.path / STREAMS
        if not path.is_file():
            return []
        out: collections.deque[dict[str, Any]] = collections.deque(maxlen=last)
        with open(path) as f:
            for line in f:
                with contextlib.suppress(ValueError):
                    entry = json.loads(line)
                    if isinstance(entry, dict) and isinstance(entry.get("batch"), int):
                        out.append(entry)
        return list(out)


# ---- finding runs -----------------------------------------------------------------------------------------


def versions(line: str, root: str | os.PathLike | None = None) -> list[int]:
    """The versions of a line that have a directory, ascending."""
    d = runs_root(root) / line
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        parsed = parse_run_name(p.name)
        if p.is_dir() and parsed is not None and parsed[0] == line:
            out.append(parsed[1])
    return sorted(out)


def open_run(
    line: str,
    root: str | os.PathLike | None = None,
    *,
    version: int | None = None,
    new: bool = False,
    model: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    name: str = "",
) -> RunDir:
    """The run to train: a new version (``new``), a given one (created if missing), or the newest (default;
    v1 when the line has none). ``identity`` (ModelConfig.identity of what will train) must match the run's
    saved model, so a changed resolution or output never resumes weights it cannot load."""
    _check_name(line, "model line")
    if new and version is not None:
        raise RunError("ask for a version or a new version, not both")
    have = versions(line, root)
    if new:
        version = (have[-1] + 1) if have else 1
    elif version is None:
        version = have[-1] if have else 1
    if version < 1:
        raise RunError(f"versions start at 1, got {version}")
    run = RunDir(runs_root(root) / line / run_name(line, version))
    if run.error:
        raise RunError(f"{run.error}; repair or move aside {run.path / MANIFEST}")
    if run.manifest is not None and identity is not None and run.manifest.model:
        from charles.model.config import ModelConfig

        saved = ModelConfig.from_dict(run.manifest.model)
        diff = {k: (saved.identity()[k], v) for k, v in identity.items() if saved.identity().get(k) != v}
        if diff:
            shown = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in list(diff.items())[:4])
            raise RunError(
                f"{run.name} trains a different model ({shown}); train it with its own settings, "
                f"or start a new version (--new-version)"
            )
    run.create(model or {}, name)
    return run


def open_for_training(
    line: str,
    root: str | os.PathLike | None = None,
    *,
    version: int | None = None,
    new: bool = False,
    model: dict[str, Any] | None = None,
    identity: dict[str, Any] | None = None,
    name: str = "",
    rank: int = 0,
    broadcast: Callable[[int], int] | None = None,
) -> RunDir:
    """The run this process trains, locked on rank 0.

    Rank 0 chooses (``open_run``: a new version, a given one, or the newest) and holds its lock. Under
    torchrun, ``broadcast`` hands rank 0's version to every rank (called on all of them, rank 0 included),
    and the other ranks open that run, so no two ranks can choose differently.
    """
    run = None
    if rank == 0:
        run = open_run(line, root, version=version, new=new, model=model, identity=identity, name=name)
        run.lock()
    if broadcast is not None:
        chosen = broadcast(run.version if run is not None else 0)
        if run is None:
            run = open_run(line, root, version=chosen, identity=identity)
    if run is None:
        raise RunError(f"rank {rank} cannot choose a run: only rank 0 does, and no broadcast was given")
    return run


def locate(line: str, version: int, root: str | os.PathLike | None = None) -> RunDir:
    """An existing version of a line (``charles stream``, ``charles trainer --resume``); RunError naming
    the versions there are when it has none of that number, or when its manifest cannot be read."""
    have = versions(line, root)
    if version not in have:
        shown = ", ".join(f"v{v}" for v in have) or "none"
        raise RunError(f"{line} has no version v{version} under {runs_root(root)} (its versions: {shown})")
    run = RunDir(runs_root(root) / line / run_name(line, version))
    if run.error:
        raise RunError(f"{run.error}; repair or move aside {run.path / MANIFEST}")
    return run


def find_run(name: str, root: str | os.PathLike | None = None) -> RunDir | None:
    """A run by its name (``tiny_v2``) or a line's newest run (``tiny``); None when there is none."""
    base = runs_root(root)
    parsed = parse_run_name(name)
    if parsed is not None and (base / parsed[0] / name).is_dir():
        return RunDir(base / parsed[0] / name)
    have = versions(name, root)
    return RunDir(base / name / run_name(name, have[-1])) if have else None


def newest_weights(name: str, root: str | os.PathLike | None = None) -> Path | None:
    """The weights file (safetensors) of the newest checkpoint of a run (``tiny_v2``) or of a line's newest
    run (``tiny``). Load it with ``charles.model.weights.model_from_weights`` or ``Predictor.from_weights``."""
    run = find_run(name, root)
    return run.newest_weights() if run is not None else None


def list_lines(root: str | os.PathLike | None = None) -> list[str]:
    base = runs_root(root)
    if not base.is_dir():
        return []
    return sorted(p.name for p in base.iterdir() if p.is_dir() and versions(p.name, root))


def list_runs(root: str | os.PathLike | None = None, line: str | None = None) -> list[RunDir]:
    """Every run (of one line, or of all), by line then version."""
    out = []
    for ln in [line] if line else list_lines(root):
        for v in versions(ln, root):
            out.append(RunDir(runs_root(root) / ln / run_name(ln, v)))
    return out


def checkpoint_batches(run: RunDir) -> list[int]:
    return [b for b, _ in list_checkpoints(run.checkpoints)]
