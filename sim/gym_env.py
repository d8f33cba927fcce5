"""The sim as a Gymnasium environment: ``Charles/Drive-v0``, registered when this module is imported.

In any process, with nothing imported first::

    gymnasium.make("charles.sim.gym_env:Charles/Drive-v0")   # Gymnasium imports the module, then makes the env

Gymnasium 1.x has no plugin discovery (the ``gymnasium.envs`` entry points of gym 0.2x were removed in
1.0), so a bare ``gymnasium.make("Charles/Drive-v0")`` works only once this module is imported
(``import charles.sim.gym_env``, or ``gymnasium.register_envs(charles.sim.gym_env)``); the module-qualified
id above is Gymnasium's own way to name an env a package registers.

Observation: the hood camera, small by default (96x54 RGB uint8) so RL baselines train on a CPU; with
``obs="dict"`` also speed (m/s) and purpose (angle rad, distance m). Action: Box [-1, 1]^2 =
(steering, negative left; throttle_brake, positive throttle).

Reward per step: metres driven along the road this step (the step's distance times the cosine between
the car's heading and the nearest lane going its way; wrong-way and sideways driving earn nothing), +10
for reaching the purpose target, -0.05 per step off the road, -5 per new collision; driving into water ends
the episode with -20. Not "progress towards the target": streets have no U-turns, so the best route often
starts by driving away from it, and a straight-line reward would punish the expert for that.
Episodes are truncated after ``max_steps`` (default 1000 steps, 33 s of game time).

The town is fixed by ``SimConfig.seed``; ``reset(seed=...)`` picks the spawn, targets and traffic.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from charles.sim.config import NpcConfig, SimConfig
from charles.sim.npc import Npc
from charles.sim.world import SimWorld

ENV_ID = "Charles/Drive-v0"


def register() -> None:
    """Register ``Charles/Drive-v0`` with Gymnasium (idempotent; importing this module already did)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="charles.sim.gym_env:DrivingEnv")


class DrivingEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 30}

    def __init__(
        self,
        render_mode: str | None = None,
        sim: SimConfig | dict | None = None,
        obs_width: int = 96,
        obs_height: int = 54,
        obs: str = "image",
        max_steps: int = 1000,
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        if obs not in ("image", "dict"):
            raise ValueError("obs must be 'image' or 'dict'")
        base = (
            SimConfig(blocks=4, traffic=2)
            if sim is None
            else (SimConfig(**sim) if isinstance(sim, dict) else sim)
        )
        self.sim_cfg = replace(base, hood_width=obs_width, hood_height=obs_height)
        self.render_mode = render_mode
        self.obs_mode = obs
        self.max_steps = int(max_steps)
        image = spaces.Box(0, 255, (obs_height, obs_width, 3), np.uint8)
        if obs == "image":
            self.observation_space = image
        else:
            self.observation_space = spaces.Dict(
                {
                    "image": image,
                    "speed": spaces.Box(0.0, 100.0, (1,), np.float32),
                    "purpose": spaces.Box(
                        np.array([-math.pi, 0.0], np.float32), np.array([math.pi, 1e4], np.float32)
                    ),
                }
            )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.world: SimWorld | None = None
        self._steps = 0

    def _obs(self) -> Any:
        img = self.world.hood_frame()
        if self.obs_mode == "image":
            return img
        angle, dist = self.world.purpose()
        return {
            "image": img,
            "speed": np.array([self.world.speed], np.float32),
            "purpose": np.array([angle, min(dist, 1e4)], np.float32),
        }

    def _info(self) -> dict[str, Any]:
        w = self.world
        return {
            "speed": w.speed,
            "purpose": w.purpose(),
            "on_road": w.on_road,
            "in_water": w.player.in_water,
            "collisions": w.collisions,
            "distance_m": w.odometer_m,
            "targets_reached": w.targets_reached,
        }

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict[str, Any]]:
        super().reset(seed=seed)
        # The episode's randomness comes from Gymnasium's seeded np_random, so reset(seed=s) is repeatable.
        episode_seed = int(self.np_random.integers(2**31))
        if self.world is None:
            self.world = SimWorld(self.sim_cfg, episode_seed=episode_seed)
        else:
            self.world.reset(episode_seed)
        self._steps = 0
        return self._obs(), self._info()

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict[str, Any]]:
        if self.world is None:
            raise RuntimeError("call reset() before step()")
        a = np.clip(np.asarray(action, np.float64).reshape(2), -1.0, 1.0)
        info = self.world.step(float(a[0]), float(a[1]))
        self._steps += 1
        reward = self._along_road(info.distance_m) if info.on_road else 0.0
        if info.target_reached:
            reward += 10.0
        if not info.on_road:
            reward -= 0.05
        if info.new_collision:
            reward -= 5.0
        terminated = info.in_water
        if info.entered_water:
            reward -= 20.0
        truncated = self._steps >= self.max_steps
        return self._obs(), float(reward), bool(terminated), bool(truncated), self._info()

    def _along_road(self, metres: float) -> float:
        p = self.world.player
        lane, idx, off = self.world.town.nearest_lane(p.x, p.y, p.heading)
        if off > 3.0:  # inside a junction, between lanes: any direction on asphalt is fine
            return metres
        return metres * max(0.0, math.cos(p.heading - float(self.world.town.lanes[lane].headings[idx])))

    def render(self) -> np.ndarray | None:
        if self.render_mode == "rgb_array" and self.world is not None:
            return self.world.cinematic_frame()
        return None


def npc_expert(env: gym.Env) -> Callable[[Any, dict], np.ndarray]:
    """Expert factory for :func:`charles.sim.evaluate.evaluate_gym`: the NPC (no noise) driving this env.

    Spec: ``"charles.sim.gym_env:npc_expert"``. The NPC reads the world, not the observation.
    """
    inner = env.unwrapped
    state: dict[str, Any] = {"npc": None, "world": None}

    def act(obs: Any, info: dict) -> np.ndarray:
        world = inner.world
        if state["world"] is not world:
            state["npc"] = Npc(world, cfg=NpcConfig(noise_rate_hz=0.0))
            state["world"] = world
        label, _ = state["npc"].act()
        return np.array(label, np.float32)

    return act


register()  # at import: what makes "charles.sim.gym_env:Charles/Drive-v0" work in a fresh process
