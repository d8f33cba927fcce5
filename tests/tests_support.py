"""Helpers for tests (a module, not a conftest, so tests can import them by name)."""

from __future__ import annotations

import time
from collections.abc import Callable


def wait_for(pred: Callable[[], bool], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll until pred() is true; fail with ``what`` after timeout seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s: {what}")


def counter_value(registry, name: str, labels: dict[str, str] | None = None) -> float:
    """Current value of a Prometheus sample (counter `_total` name) in a registry; 0 if absent."""
    labels = labels or {}
    for metric in registry.collect():
        for s in metric.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
    return 0.0


def weights_message(payload: bytes, batch: int, cfg, model: str = "tiny"):
    """A weights announcement as a trainer publishes it: the model line's config and a payload."""
    from charles.proto import Weights

    return Weights(
        model=model,
        run=f"{model}_v1",
        batch=batch,
        config=cfg.to_dict(),
        payload=payload,
        created=time.time(),
    )
