"""Reading a Gymnasium step as a driver sees it: the picture, speed and purpose, and the action.

Shared by a collector's gym source, :class:`~charles.drive.policy.GymPolicy` (``charles eval`` on any
env) and charles.sim.gym_env's experts. No gymnasium import: only what the arrays look like.
"""

from __future__ import annotations

from typing import Any

import numpy as np


def observation_image(obs: Any) -> np.ndarray:
    """The picture in a Gymnasium observation: the array itself, or a dict's ``image`` (or first HxWx3)."""
    if isinstance(obs, dict):
        if "image" in obs:
            return np.asarray(obs["image"])
        for v in obs.values():
            a = np.asarray(v)
            if a.ndim == 3 and a.shape[2] in (1, 3):
                return a
        raise ValueError(f"observation dict {list(obs)} holds no HxWx3 image")
    return np.asarray(obs)


def as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 RGB HxWx3 from whatever an environment renders (floats in [0, 1], grey, uint8)."""
    if img.dtype != np.uint8:
        scale = 255.0 if img.dtype.kind == "f" and float(np.nanmax(img, initial=0.0)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img * scale), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)  # the model line reads RGB
    return np.ascontiguousarray(img)


def action_pair(action: Any) -> tuple[float, float]:
    """The first two action components as (steering, throttle_brake); a 1-D action drives at zero pedal."""
    a = np.asarray(action, np.float64).reshape(-1)
    return float(a[0]), float(a[1]) if len(a) > 1 else 0.0


def observation_parts(obs: Any, info: dict) -> tuple[np.ndarray, float, tuple[float, float]]:
    """(RGB uint8 picture, speed m/s, purpose) of a Gymnasium step; speed and purpose from the observation
    dict or the info (Charles/Drive-v0 has both), 0 where the environment has none."""
    return as_rgb_uint8(observation_image(obs)), *_speed_purpose(obs, info)


def _speed_purpose(obs: Any, info: dict) -> tuple[float, tuple[float, float]]:
    speed = info.get("speed")
    purpose = info.get("purpose")
    if isinstance(obs, dict):
        speed = obs.get("speed", speed)
        purpose = obs.get("purpose", purpose)
    s = float(np.asarray(speed).reshape(-1)[0]) if speed is not None else 0.0
    p = np.asarray(purpose, np.float64).reshape(-1) if purpose is not None else np.zeros(2)
    return s, (float(p[0]), float(p[1])) if len(p) >= 2 else (0.0, 0.0)
