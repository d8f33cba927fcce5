"""Helpers for tests (a module, not a conftest, so tests can import them by name)."""

from __future__ import annotations

import functools
import http.client
import signal
import subprocess
import time
from collections.abc import Callable


def stop_by_sigterm(proc: subprocess.Popen, within_s: float = 10.0) -> str:
    """SIGTERM a service's process and assert it exits 0 by itself within ``within_s``; returns its output.

    rc 0 already says it stopped inside service.shutdown_s (the watchdog would exit 1); the wall clock
    adds interpreter teardown, slow on a loaded 2-core box.
    """
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=within_s)
    out = proc.stdout.read().decode() if proc.stdout is not None else ""
    assert rc == 0, out
    assert time.monotonic() - t0 < within_s, out
    return out


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


def stream_parts(
    port: int, path: str, n: int, timeout: float = 10.0
) -> tuple[dict, list[tuple[dict, bytes]]]:
    """The response headers and the first ``n`` parts of a multipart stream (each part's headers, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        headers = dict(r.headers)
        parts = []
        while r.status == 200 and len(parts) < n:
            assert r.readline() == b"--frame\r\n"
            ph = {}
            while (line := r.readline()) != b"\r\n":
                k, _, v = line.decode().partition(":")
                ph[k.strip()] = v.strip()
            parts.append((ph, r.read(int(ph["Content-Length"]))))
            assert r.read(2) == b"\r\n"
        return {"status": r.status, **headers}, parts
    finally:
        conn.close()


@functools.lru_cache(maxsize=8)
def driving_weights(seed: int, throttle: float, cfg_json: str | None = None) -> bytes:
    """Weights (real safetensors) of a model line (default tiny) that always asks for ``throttle``, so the
    car moves, and steers a little, by its seed: what the player's and the judge's tests drive."""
    import torch

    from charles.model.config import ModelConfig
    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights

    cfg = ModelConfig.from_json(cfg_json) if cfg_json else get_config("tiny")
    torch.manual_seed(seed)
    model = build_model(cfg)
    with torch.no_grad():
        out = model.heads["throttle_brake"].out
        out.weight.zero_()
        out.bias.fill_(throttle)
        steer = model.heads["steering"].out  # gentle: a car that rolls about, not one that heads for the lake
        steer.weight.mul_(0.1)
        steer.bias.zero_()
    return save_weights(model, cfg, half=True)
