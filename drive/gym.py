"""Reading a Gymnasium step as a driver sees it: the picture, speed and purpose, and the action.

Shared by a collector's gym source, :class:`~charles.drive.policy.GymPolicy` (``charles eval`` on any
env, the player's code path) and charles.sim.gym_env's experts. No gymnasium import: only what the
spaces and arrays look like.

A car in Charles takes (steering, throttle_brake) (charles.drive.controls). Envs lay their actions out
in other ways, so one :class:`Actions` adapter per env goes both ways between the two: ``from_env`` turns
an expert's env action into the label a collector sends, ``to_env`` turns a model's (steering,
throttle_brake) into the env's action. The collector, ``charles eval`` and the player all take theirs
from :func:`action_adapter`, so a label and the action that drives the env are mirror images by
construction (a brake the expert pressed is a brake in the label, and the model's brake reaches the env).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from charles.drive.controls import clean_control, combine, split

ACTION_LAYOUTS = ("auto", "pair", "gas_brake", "table")
"""Named layouts for :func:`action_adapter`; anything else with a colon is a ``module:callable``."""


def load_callable(spec: str) -> Callable:
    """``"package.module:name"`` -> the object. Only for specs from our own config or command line."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"expected 'module:callable', got {spec!r}")
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"{spec} is not callable")
    return obj


# ---------------------------------------------------------------------------------------------- actions


class Actions:
    """(steering, throttle_brake) <-> one env's action. Subclasses say how; see the module docstring."""

    layout = "?"

    def to_env(self, steering: float, throttle_brake: float) -> Any:
        """The env action that drives as (steering, throttle_brake) does."""
        raise NotImplementedError

    def from_env(self, action: Any) -> tuple[float, float]:
        """The (steering, throttle_brake) label of an env action (an expert's)."""
        raise NotImplementedError


class _BoxActions(Actions):
    """A continuous action vector, clipped to the env's bounds on the way in."""

    size = 0

    def __init__(self, low: Any = -1.0, high: Any = 1.0, dtype: Any = np.float32):
        self.low = np.broadcast_to(np.asarray(low, np.float64), (self.size,))
        self.high = np.broadcast_to(np.asarray(high, np.float64), (self.size,))
        self.dtype = np.dtype(dtype)

    def _vector(self, action: Any) -> np.ndarray:
        a = np.asarray(action, np.float64).reshape(-1)
        if len(a) != self.size:
            raise ValueError(f"{self.layout} actions have {self.size} components, got {len(a)}")
        return a

    def _out(self, values: Sequence[float]) -> np.ndarray:
        return np.clip(np.asarray(values, np.float64), self.low, self.high).astype(self.dtype)


class PairActions(_BoxActions):
    """[steering, throttle_brake]: Charles's own layout (Charles/Drive-v0)."""

    layout = "pair"
    size = 2

    def to_env(self, steering: float, throttle_brake: float) -> np.ndarray:
        return self._out((clean_control(steering), clean_control(throttle_brake)))

    def from_env(self, action: Any) -> tuple[float, float]:
        a = self._vector(action)
        return clean_control(a[0]), clean_control(a[1])


class GasBrakeActions(_BoxActions):
    """[steer, gas, brake] (Box2D's CarRacing and most car envs): the pedal split into two, both >= 0."""

    layout = "gas_brake"
    size = 3

    def to_env(self, steering: float, throttle_brake: float) -> np.ndarray:
        return self._out((clean_control(steering), *split(clean_control(throttle_brake))))

    def from_env(self, action: Any) -> tuple[float, float]:
        a = self._vector(action)
        return clean_control(a[0]), combine(a[1], a[2])


class TableActions(Actions):
    """A discrete action set: index ``start + i`` drives as ``table[i]`` = (steering, throttle_brake).

    A model's continuous controls become the nearest entry (Euclidean in the (steering, throttle_brake)
    plane; the first of equals), so a label read from an index and back gives the same index.
    """

    layout = "table"

    def __init__(self, table: Sequence[Sequence[float]], start: int = 0):
        t = np.asarray(table, np.float64)
        if t.ndim != 2 or t.shape[1] != 2 or len(t) == 0:
            raise ValueError(f"an action table is a list of [steering, throttle_brake] pairs, got {table!r}")
        if not np.all(np.isfinite(t)) or np.abs(t).max() > 1.0:
            raise ValueError("action table values must lie in [-1, 1]")
        self.table = t
        self.start = int(start)

    def to_env(self, steering: float, throttle_brake: float) -> np.int64:
        want = np.array([clean_control(steering), clean_control(throttle_brake)])
        return np.int64(self.start + int(np.argmin(((self.table - want) ** 2).sum(axis=1))))

    def from_env(self, action: Any) -> tuple[float, float]:
        i = int(np.asarray(action).reshape(-1)[0]) - self.start
        if not 0 <= i < len(self.table):
            raise ValueError(f"action {i + self.start} is outside the table of {len(self.table)} actions")
        return float(self.table[i, 0]), float(self.table[i, 1])


def action_adapter(space: Any, layout: str = "auto", table: Sequence[Sequence[float]] = ()) -> Actions:
    """The :class:`Actions` for an env's action space.

    ``layout``: ``pair``, ``gas_brake``, ``table`` (a discrete space; ``table`` lists each index's
    (steering, throttle_brake)), ``module:callable`` (a factory called with the space, returning an
    object with ``to_env`` and ``from_env``), or ``auto``: a 2-component Box is ``pair``; a 3-component
    Box whose last two components cannot go negative is ``gas_brake``; a discrete space with a ``table``
    is ``table``. Anything else is refused with an error naming the choices: a guessed layout would train
    on wrong labels without a word.
    """
    if layout not in ACTION_LAYOUTS:
        if ":" not in layout:
            raise ValueError(
                f"action layout {layout!r}: one of {', '.join(ACTION_LAYOUTS)} or module:callable"
            )
        return load_callable(layout)(space)
    n = getattr(space, "n", None)
    if layout == "table" or (layout == "auto" and n is not None):
        if n is None:
            raise ValueError(f"an action table needs a discrete action space, got {space}")
        if len(table) != int(n):
            raise ValueError(
                f"a discrete action space of {int(n)} actions needs an action table of {int(n)} "
                f"[steering, throttle_brake] pairs (collector.gym_action_table), got {len(table)}"
            )
        return TableActions(table, int(getattr(space, "start", 0)))
    shape = tuple(getattr(space, "shape", None) or ())
    low, high = getattr(space, "low", None), getattr(space, "high", None)
    if low is None or high is None or not np.issubdtype(np.dtype(space.dtype), np.floating):
        raise ValueError(f"not a continuous or discrete action space: {space}")
    if layout == "auto":
        if shape == (2,):
            layout = "pair"
        elif shape == (3,) and np.all(np.asarray(low)[1:] >= 0):
            layout = "gas_brake"
        else:
            raise ValueError(
                f"cannot tell how {space} lays out steering and pedals: set collector.gym_action to "
                f"pair, gas_brake, table or module:callable"
            )
    cls = PairActions if layout == "pair" else GasBrakeActions
    if shape != (cls.size,):
        raise ValueError(f"{layout} actions have {cls.size} components, the space has shape {shape}")
    return cls(low, high, space.dtype)


# ---------------------------------------------------------------------------------------------- observations


def observation_image(obs: Any) -> np.ndarray:
    """The picture in a Gymnasium observation: the array itself, or a dict's ``image`` (or first picture)."""
    if isinstance(obs, dict):
        if "image" in obs:
            return np.asarray(obs["image"])
        for v in obs.values():
            a = np.asarray(v)
            if a.ndim == 3 and (a.shape[2] in (1, 3) or a.shape[0] in (1, 3)):
                return a
        raise ValueError(f"observation dict {list(obs)} holds no HxWx3 image")
    return np.asarray(obs)


def as_rgb_uint8(img: np.ndarray) -> np.ndarray:
    """uint8 RGB HxWx3 from whatever an environment renders: floats in [0, 1], grey, channels first
    (3xHxW, torch-style wrappers) or last. The size stays: the model's resize is fit_frame's, downstream."""
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[2] not in (1, 3):
        img = np.moveaxis(img, 0, 2)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] not in (1, 3)):
        raise ValueError(f"an observation image is HxW, HxWx1|3 or 1|3xHxW, got shape {img.shape}")
    if img.dtype != np.uint8:
        scale = 255.0 if img.dtype.kind == "f" and float(np.nanmax(img, initial=0.0)) <= 1.0 else 1.0
        img = np.clip(np.nan_to_num(img * scale), 0, 255).astype(np.uint8)
    if img.ndim == 2:
        img = img[:, :, None]
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)  # the model line reads RGB
    return np.ascontiguousarray(img)


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
