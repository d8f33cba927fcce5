"""The Gymnasium wrapper passes the checker; evaluate_gym runs on it with the NPC expert."""

from __future__ import annotations

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from charles.sim.config import SimConfig
from charles.sim.evaluate import evaluate_gym
from charles.sim.gym_env import ENV_ID, DrivingEnv, register

SMALL = SimConfig(blocks=3, traffic=1)


@pytest.mark.parametrize("obs", ["image", "dict"])
def test_check_env_passes(obs):
    register()
    env = gym.make(ENV_ID, sim=SMALL, obs=obs, max_steps=50, render_mode="rgb_array")
    check_env(env.unwrapped)  # raises on any failure; made through gym.make so render modes are checked too
    assert isinstance(env.unwrapped, DrivingEnv)
    env.close()


def test_registered_and_repeatable():
    register()
    register()  # idempotent
    env = gym.make(ENV_ID, sim=SMALL, max_steps=40)
    o1, _ = env.reset(seed=3)
    a = np.array([0.1, 0.6], np.float32)
    traj1 = [env.step(a)[1] for _ in range(20)]
    o2, _ = env.reset(seed=3)
    traj2 = [env.step(a)[1] for _ in range(20)]
    assert np.array_equal(o1, o2) and traj1 == traj2
    assert o1.shape == (54, 96, 3) and o1.dtype == np.uint8
    o3, _ = env.reset(seed=4)
    assert not np.array_equal(o1, o3)
    assert env.render() is None  # no render_mode
    env.close()


def test_render_is_the_cinematic_camera():
    env = DrivingEnv(render_mode="rgb_array", sim=SMALL)
    env.reset(seed=0)
    assert env.render().shape == (SMALL.cinematic_height, SMALL.cinematic_width, 3)


def test_evaluate_gym_expert_beats_random():
    kw = {"sim": SMALL, "max_steps": 300}
    expert = evaluate_gym(
        ENV_ID, policy="expert", expert="charles.sim.gym_env:npc_expert", episodes=2, env_kwargs=kw
    )
    rand = evaluate_gym(
        ENV_ID, policy="random", expert="charles.sim.gym_env:npc_expert", episodes=2, env_kwargs=kw
    )
    for r in (expert, rand):
        assert {"episode_return", "episode_return_std", "episode_length", "episodes"} <= r.keys()
        assert r["episode_length"] == 300
    assert expert["episode_return"] > 50.0 > rand["episode_return"]
    assert 0.1 < rand["expert_mae"] < 2.0  # random actions disagree with the NPC


def test_evaluate_gym_needs_an_expert_for_policy_expert():
    with pytest.raises(ValueError):
        evaluate_gym(ENV_ID, policy="expert", expert=None, episodes=1, env_kwargs={"sim": SMALL})
