"""Checkpoints: what a restart needs to go on at the same batch, written so a crash never leaves half of one.

One checkpoint is one directory, ``checkpoints/batch_000012000/``::

    weights.safetensors     the model (charles.model.weights: safetensors, its ModelConfig in the metadata)
    optimizer.safetensors   every tensor of the optimizer's state, flattened to ``state.<param>.<key>``
    state.json              batch counter, samples trained, the optimizer's non-tensor state and param
                            groups, the learning-rate schedule, the resolved run configuration, the code
                            version, and the size and SHA-256 of both tensor files

Nothing is pickled: the optimizer's state dict is split into tensors (safetensors) and plain values (JSON)
and put back together on load. Anything read back is treated as untrusted: pickles, truncated or corrupt
files, checksum mismatches and weights of another model are refused with a ``CheckpointError`` whose
``reason`` says which, and ``load_latest`` falls back to the next older checkpoint, moving the refused one
aside (``batch_000012000.refused-corrupt``) so later runs neither retry it nor count it among the kept ones.

Atomic writes: the files go into a hidden temporary directory (``.tmp-batch_000012000-<pid>``), each is
fsynced, then the directory is renamed into place and its parent fsynced. A crash leaves either the whole
checkpoint or a temporary directory that every reader ignores (and ``clean_temp`` removes at start).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import Tensor, nn

from charles.model.config import ModelConfig
from charles.model.weights import WeightsError, check_state_dict, read_weights, save_weights
from charles.version import code_version

log = logging.getLogger(__name__)

FORMAT = 1
WEIGHTS = "weights.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"
_DIR = re.compile(r"^batch_(\d{9,})$")
OPTIMIZER_FORMAT_KEY = "charles.optimizer_format"
MAX_STATE_BYTES = 64 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint we refuse to load; ``reason`` is one short word (pickle, corrupt, checksum, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---- files ----------------------------------------------------------------------------------------------


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable (POSIX; a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_synced(path: Path, data: bytes | memoryview) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so a reader sees the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_synced(tmp, data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    fsync_dir(path.parent)


# ---- the optimizer without pickle -----------------------------------------------------------------------


def _plain(v: Any, where: str) -> Any:
    """A JSON value for one non-tensor optimizer entry (tuples become lists; 0-d tensors numbers)."""
    if isinstance(v, Tensor):
        if v.numel() != 1:
            raise TypeError(f"{where}: a tensor of shape {tuple(v.shape)} outside the state")
        return v.item()
    if isinstance(v, tuple | list):
        return [_plain(x, where) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x, where) for k, x in v.items()}
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise TypeError(f"{where}: cannot store a {type(v).__name__} without pickle")


def flatten_optimizer(state_dict: Mapping[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """An optimizer's state dict as (tensors for safetensors, plain values for JSON)."""
    tensors: dict[str, Tensor] = {}
    plain_state: dict[str, dict[str, Any]] = {}
    for pid, entries in state_dict["state"].items():
        plain_state[str(pid)] = {}
        for key, v in entries.items():
            if isinstance(v, Tensor):
                tensors[f"state.{pid}.{key}"] = v.detach().to("cpu").contiguous()
            else:
                plain_state[str(pid)][key] = _plain(v, f"state.{pid}.{key}")
    groups = [_plain(dict(g), f"param_groups[{i}]") for i, g in enumerate(state_dict["param_groups"])]
    return tensors, {"state": plain_state, "param_groups": groups}


def unflatten_optimizer(tensors: Mapping[str, Tensor], plain: Mapping[str, Any]) -> dict[str, Any]:
    """The inverse of ``flatten_optimizer``; raises CheckpointError on anything malformed."""
    try:
        state: dict[int, dict[str, Any]] = {int(pid): dict(v) for pid, v in plain["state"].items()}
        for name, t in tensors.items():
            kind, pid, key = name.split(".", 2)
            if kind != "state":
                raise ValueError(f"unexpected tensor {name}")
            state.setdefault(int(pid), {})[key] = t
        groups = [dict(g) for g in plain["param_groups"]]
        for g in groups:
            if not isinstance(g.get("params"), list):
                raise ValueError("a param group without params")
            if isinstance(g.get("betas"), list):
                g["betas"] = tuple(g["betas"])
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise CheckpointError("bad_state", f"optimizer state is malformed: {e}") from None
    return {"state": state, "param_groups": groups}


# ---- writing --------------------------------------------------------------------------------------------


def checkpoint_name(batch: int) -> str:
    return f"batch_{batch:09d}"


def list_checkpoints(directory: str | os.PathLike) -> list[tuple[int, Path]]:
    """(batch, path) of every checkpoint directory, oldest first; temporary and refused ones are ignored."""
    d = Path(directory)
    if not d.is_dir():
        return []
    out = []
    for p in d.iterdir():
        m = _DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _sha256(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def save_checkpoint(
    directory: str | os.PathLike,
    model: nn.Module,
    cfg: ModelConfig,
    optimizer: torch.optim.Optimizer,
    batch: int,
    *,
    state: Mapping[str, Any] | None = None,
) -> Path:
    """Write one checkpoint atomically and return its directory; an existing one of that batch is replaced.

    ``state`` adds JSON fields (samples trained, schedule, run configuration, ...) to state.json.
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    name = checkpoint_name(batch)
    weights = save_weights(model, cfg, metadata={"charles.batch": str(batch)})
    assert weights is not None
    tensors, plain = flatten_optimizer(optimizer.state_dict())
    opt_bytes = safetensors.torch.save(tensors, metadata={"format": "pt", OPTIMIZER_FORMAT_KEY: "1"})
    doc = {
        "format": FORMAT,
        "batch": int(batch),
        "created": time.time(),
        "code_version": code_version(),
        **dict(state or {}),
        "optimizer": {"class": type(optimizer).__name__, **plain},
        "files": {
            WEIGHTS: {"bytes": len(weights), "sha256": _sha256(weights)},
            OPTIMIZER: {"bytes": len(opt_bytes), "sha256": _sha256(opt_bytes)},
        },
    }
    text = json.dumps(doc, indent=1, sort_keys=True, allow_nan=False).encode()
    tmp = d / f".tmp-{name}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        write_synced(tmp / WEIGHTS, weights)
        write_synced(tmp / OPTIMIZER, opt_bytes)
        write_synced(tmp / STATE, text)  # last: a state.json means the tensor files before it are complete
        fsync_dir(tmp)
        final = d / name
        old = None
        if final.exists():  # a final checkpoint at a batch that was just checkpointed: replace it whole
            old = d / f".old-{name}-{os.getpid()}"
            os.rename(final, old)
        os.rename(tmp, final)
        fsync_dir(d)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def prune(directory: str | os.PathLike, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` checkpoints; returns what was removed."""
    found = list_checkpoints(directory)
    doomed = [p for _, p in found[: max(0, len(found) - keep)]]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


def clean_temp(directory: str | os.PathLike) -> list[Path]:
    """Remove temporary directories a crash left behind (call before this process writes any)."""
    d = Path(directory)
    if not d.is_dir():
        return []
    gone = []
    for p in sorted(d.iterdir()):
        if p.name.startswith(".old-"):  # a crash between replacing a checkpoint's two renames: put it back
            final = d / p.name[len(".old-") :].rsplit("-", 1)[0]
            if _DIR.match(final.name) and not final.exists():
                os.rename(p, final)
                continue
        if p.name.startswith((".tmp-", ".old-")):
            gone.append(p)
    for p in gone:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return gone


# ---- reading --------------------------------------------------------------------------------------------


@dataclass
class LoadedCheckpoint:
    """A checkpoint that passed every check, not yet applied to any model."""

    path: Path
    batch: int
    weights: dict[str, Tensor]
    optimizer: dict[str, Any]
    state: dict[str, Any] = field(default_factory=dict)
    """state.json as written (samples, schedule, run_config, code_version, ...)."""

    @property
    def samples(self) -> int:
        return int(self.state.get("samples", 0))


def _looks_pickled(data: bytes) -> bool:
    """torch.save's zip archive or a bare pickle (asked only of a file that already failed its checks)."""
    return data[:4] == b"PK\x03\x04" or (len(data) >= 2 and data[0] == 0x80 and 2 <= data[1] <= 5)


def _read_file(path: Path, meta: Any) -> bytes:
    """A tensor file's bytes, after its size and SHA-256 matched what state.json recorded."""
    if not path.is_file():
        raise CheckpointError("missing", f"{path} does not exist")
    data = path.read_bytes()
    ok = isinstance(meta, dict) and len(data) == meta.get("bytes") and _sha256(data) == meta.get("sha256")
    if ok:
        return data
    if _looks_pickled(data):
        raise CheckpointError(
            "pickle", f"{path} is a pickle, which can run code when loaded; Charles only loads safetensors"
        )
    if not isinstance(meta, dict):
        raise CheckpointError("bad_state", f"state.json has no size and checksum for {path.name}")
    if len(data) != meta.get("bytes"):
        raise CheckpointError(
            "corrupt", f"{path} has {len(data)} bytes, state.json says {meta.get('bytes')} (truncated?)"
        )
    raise CheckpointError("checksum", f"{path} does not match the SHA-256 in state.json (corrupt)")


def read_checkpoint(
    path: str | os.PathLike, expected_cfg: ModelConfig, model: nn.Module | None = None
) -> LoadedCheckpoint:
    """Read and check one checkpoint without changing anything; raises CheckpointError with a reason.

    With ``model`` the weights are also checked against its tensors (names and shapes).
    """
    p = Path(path)
    state_path = p / STATE
    if not state_path.is_file():
        raise CheckpointError("missing", f"{state_path} does not exist (an incomplete checkpoint?)")
    raw = state_path.read_bytes()[: MAX_STATE_BYTES + 1]
    if raw[:1] == b"\x80" or raw[:4] == b"PK\x03\x04":
        raise CheckpointError("pickle", f"{state_path} is a pickle, which can run code when loaded; refused")
    if len(raw) > MAX_STATE_BYTES:
        raise CheckpointError("corrupt", f"{state_path} is larger than {MAX_STATE_BYTES} bytes")
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError("corrupt", f"{state_path} is not JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("batch"), int):
        raise CheckpointError("bad_state", f"{state_path} is not a format-{FORMAT} checkpoint state")
    files = doc.get("files") if isinstance(doc.get("files"), dict) else {}
    try:
        weights_data = _read_file(p / WEIGHTS, files.get(WEIGHTS))
        w = read_weights(weights_data, expected_cfg)
        opt_data = _read_file(p / OPTIMIZER, files.get(OPTIMIZER))
        o = read_weights(opt_data, check_finite=False)
    except WeightsError as e:
        raise CheckpointError(e.reason, f"{p.name}: {e}") from None
    if o.metadata.get(OPTIMIZER_FORMAT_KEY) != "1":
        raise CheckpointError("bad_state", f"{p / OPTIMIZER} is not a Charles optimizer state")
    if model is not None:
        try:
            check_state_dict(model, w.state_dict, str(p / WEIGHTS))
        except WeightsError as e:
            raise CheckpointError(e.reason, str(e)) from None
    opt = doc.get("optimizer")
    if not isinstance(opt, dict):
        raise CheckpointError("bad_state", f"{state_path} has no optimizer state")
    optimizer = unflatten_optimizer(o.state_dict, opt)
    optimizer_class = opt.get("class")
    state = {k: v for k, v in doc.items() if k not in ("optimizer", "files")}
    state["optimizer_class"] = optimizer_class
    return LoadedCheckpoint(p, int(doc["batch"]), w.state_dict, optimizer, state)


def load_latest(
    directory: str | os.PathLike,
    expected_cfg: ModelConfig,
    model: nn.Module | None = None,
    *,
    quarantine: bool = True,
) -> tuple[LoadedCheckpoint | None, list[tuple[Path, CheckpointError]]]:
    """The newest checkpoint that passes every check, and the refused newer ones (moved aside if asked).

    Each refusal is logged as an error naming the file and the reason; the fallback is logged too.
    """
    refused: list[tuple[Path, CheckpointError]] = []
    for batch, path in reversed(list_checkpoints(directory)):
        try:
            loaded = read_checkpoint(path, expected_cfg, model)
        except CheckpointError as e:
            log.error("refusing checkpoint %s: %s", path, e)
            where = path
            if quarantine:
                where = path.with_name(f"{path.name}.refused-{e.reason}")
                if where.exists():
                    shutil.rmtree(where, ignore_errors=True)
                os.rename(path, where)
                log.error("moved %s aside to %s", path.name, where.name)
            refused.append((where, e))
            continue
        if refused:
            log.warning(
                "falling back to the previous good checkpoint %s (batch %d) after refusing %d newer one(s)",
                path.name,
                batch,
                len(refused),
            )
        return loaded, refused
    return None, refused


def apply_checkpoint(
    loaded: LoadedCheckpoint, model: nn.Module, optimizer: torch.optim.Optimizer | None
) -> None:
    """Load a checked checkpoint into the model and optimizer: the optimizer first (the step that can still
    refuse, leaving both untouched), then the weights (already checked against the model's tensors)."""
    from charles.model.weights import unwrap

    if optimizer is not None:
        if loaded.state.get("optimizer_class") not in (None, type(optimizer).__name__):
            raise CheckpointError(
                "optimizer_mismatch",
                f"{loaded.path.name} holds {loaded.state.get('optimizer_class')} state, the trainer runs "
                f"{type(optimizer).__name__} (trainer.optimizer changed: start a new version or change it back)",
            )
        try:
            optimizer.load_state_dict(loaded.optimizer)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError("optimizer_mismatch", f"{loaded.path.name}: {e}") from None
    target = unwrap(model)
    check_state_dict(target, loaded.weights, str(loaded.path / WEIGHTS))
    with torch.no_grad():
        target.load_state_dict(loaded.weights, strict=True)


def newest_weights(directory: str | os.PathLike) -> Path | None:
    """The weights file of the newest complete checkpoint in a checkpoints directory (not checked)."""
    for _, path in reversed(list_checkpoints(directory)):
        if (path / STATE).is_file() and (path / WEIGHTS).is_file():
            return path / WEIGHTS
    return None
