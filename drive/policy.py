"""A trained model as a driver, fed exactly what the trainer fed it: the player's and ``charles eval``'s policy.

:class:`ModelPolicy` is a :class:`charles.sim.evaluate.Policy`:
``policy(frame, speed, purpose, history) -> (steering, throttle_brake)``. Per call it

1. fits the frame to the model's resolution and passes it through the collectors' codec and back
   (:func:`~charles.drive.frames.as_trainer_sees`): the pixels the model trained on;
2. stacks ``frames - 1`` past frames ``frame_stride`` ticks apart (:class:`FrameStack`, as collectors do;
   before it has enough, the oldest it has stands in);
3. takes ``previous`` = the last history row's action (what the car executed last tick: collectors send
   the same), speed and purpose cleaned to the wire's ranges;
4. predicts and decodes (delta outputs add to the previous action; separate throttle and brake outputs
   combine into throttle_brake).

Torch is imported only when a ModelPolicy is made, so collectors never pay for it.

For the player's loop (charles.sim.session.DriveSession or a remote game)::

    policy = ModelPolicy.from_weights(path_or_bytes, device="cuda")
    session.teleport_hooks.append(policy.reset)
    obs = session.observe()
    if obs.driving:
        steering, throttle_brake = policy(obs.frame, obs.speed, obs.purpose, obs.history)
    else:
        policy.see(obs.frame)              # keep the stack moving through Unstuck's fades

``policy.last_raw`` holds the raw outputs of the last prediction (the player's console shows them);
``policy.predictor`` the Predictor (``swap_weights``, ``convcam``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from charles.drive.controls import clean_control, clean_purpose, clean_speed, control_pair, signals
from charles.drive.frames import as_trainer_sees
from charles.drive.gym import Actions, PairActions, observation_parts
from charles.drive.past import FrameStack, History


class ModelPolicy:
    """Drive with a charles.model Predictor on the inputs the trainer sees (see the module docstring)."""

    needs_frame = True

    def __init__(self, predictor: Any, codec: str = "jpeg", quality: int = 90):
        self.predictor = predictor
        self.cfg = predictor.cfg
        """The model's charles.model.config.ModelConfig."""
        self.codec = codec
        self.quality = quality
        self.stack = FrameStack(self.cfg.frames, self.cfg.frame_stride)
        self.history_rows = max(60, self.cfg.history_length)
        """History rows a caller should keep (charles eval's DriveSession keeps this many)."""
        self.last_raw: dict[str, np.ndarray] = {}
        self.last_controls: dict[str, float] = {}
        self.tick = 0
        """Frames seen (driven or not): the key of each frame in the stack (a DAgger sample's tick)."""

    @classmethod
    def from_weights(
        cls,
        source: Any,
        *,
        expected_cfg: Any = None,
        codec: str = "jpeg",
        quality: int = 90,
        **predictor_kwargs: Any,
    ) -> ModelPolicy:
        """From a safetensors file or bytes (the model's config travels inside); kwargs go to Predictor."""
        from charles.model.predictor import Predictor

        return cls(Predictor.from_weights(source, expected_cfg, **predictor_kwargs), codec, quality)

    # -- the Policy protocol ----------------------------------------------------------------------------------

    def prepare(self, frame: np.ndarray) -> np.ndarray:
        """The frame as the trainer sees it: the model's resolution, through the collectors' codec."""
        return as_trainer_sees(np.asarray(frame), self.cfg.width, self.cfg.height, self.codec, self.quality)

    def __call__(
        self,
        frame: np.ndarray | None,
        speed: float,
        purpose: tuple[float, float],
        history: np.ndarray,
        previous: tuple[float, float] | None = None,
    ) -> tuple[float, float]:
        cfg = self.cfg
        img = self.prepare(frame) if frame is not None else None
        stack = None
        if cfg.frames > 1 and img is not None:
            stack = np.stack([im for _, im in self.stack.past((self.tick + 1, img))])
        history = np.asarray(history, np.float32)
        if previous is None:
            previous = (float(history[-1, 0]), float(history[-1, 1])) if len(history) else (0.0, 0.0)
        previous = (clean_control(previous[0]), clean_control(previous[1]))
        raw = self.predictor.predict(
            img,
            speed=clean_speed(speed),
            purpose=clean_purpose(purpose),
            history=history if cfg.history != "none" else None,
            stack=stack,
            previous=previous,
        )
        self.last_raw = raw
        self.last_controls = self.predictor.controls(raw, signals(*previous))
        self._push(img)
        return control_pair(self.last_controls)

    def see(self, frame: np.ndarray) -> None:
        """A tick it does not drive (Unstuck fading): the frame still enters the stack, as for collectors."""
        if self.cfg.frames > 1 and frame is not None:
            self._push(self.prepare(frame))

    def reset(self) -> None:
        """After a teleport or a new episode: forget the stacked past frames."""
        self.stack.clear()

    def _push(self, img: np.ndarray | None) -> None:
        self.tick += 1
        self.stack.push(self.tick, img)


class GymPolicy:
    """A (frame, speed, purpose, history) policy as a Gymnasium actor ``act(obs, info) -> action``.

    ``actions`` (charles.drive.gym.action_adapter of the env's space; default [steering, throttle_brake])
    turns the policy's controls into the env's action, the mirror of how a collector labels an expert's.
    It keeps the history itself (what the env was given, read back through the same adapter, with speed
    and purpose, as DriveSession does) and forgets it on :meth:`reset` (call at every env.reset).
    """

    def __init__(self, policy: Callable, history_rows: int = 60, actions: Actions | None = None):
        self.policy = policy
        self.history = History(max(1, history_rows))
        self.actions = actions or PairActions()

    def reset(self) -> None:
        self.history.clear()
        if hasattr(self.policy, "reset"):
            self.policy.reset()

    def __call__(self, obs: Any, info: dict) -> Any:
        image, speed, purpose = observation_parts(obs, info)
        action = self.actions.to_env(*self.policy(image, speed, purpose, self.history.copy()))
        # what the car was given: a discrete env's nearest table entry, not the raw prediction
        self.history.push(self.actions.from_env(action), clean_speed(speed), clean_purpose(purpose))
        return action
