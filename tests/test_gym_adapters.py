"""Any Gymnasium car env both ways: one action adapter labels an expert's actions and turns a model's
controls into the env's actions; observations of another size or layout reach the model's input.

The fake envs here have the layouts a new user meets first: [steer, gas, brake] (Box2D's CarRacing) and
a discrete action set. Before the adapters, a collector labelled a [steer, gas, brake] expert with
(steer, gas) (every brake lost) and a model's 2-component action made such an env raise IndexError.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from charles import config
from charles.cli import main as cli
from charles.collector.sources import GymSource
from charles.config import ConfigError
from charles.drive.gym import (
    GasBrakeActions,
    PairActions,
    TableActions,
    action_adapter,
    observation_parts,
)
from charles.drive.policy import GymPolicy
from charles.drive.samples import Encoder, SampleBuilder
from charles.drive.shape import InputShape

ROOT = Path(__file__).resolve().parent.parent
GAS_BRAKE = "CharlesTest/GasBrake-v0"
DISCRETE = "CharlesTest/Discrete-v0"
TABLE = [[0.0, 0.0], [0.6, 0.0], [-0.6, 0.0], [0.0, 0.2], [0.0, -0.8]]  # CarRacing-v3's discrete set
"""CarRacing-v3's discrete actions: nothing, right, left, gas, brake."""


class GasBrakeEnv(gym.Env):
    """[steer, gas, brake] like CarRacing; observes a float picture channels first, 3x40x64, in [0, 1]."""

    def __init__(self, max_steps: int = 30):
        self.action_space = spaces.Box(np.array([-1, 0, 0], np.float32), np.ones(3, np.float32))
        self.observation_space = spaces.Box(0.0, 1.0, (3, 40, 64), np.float32)
        self.max_steps = max_steps
        self.seen: list[np.ndarray] = []
        self.speed = 0.0

    def _obs(self) -> np.ndarray:
        return np.full((3, 40, 64), min(1.0, self.speed / 10), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.speed = 0, 0.0
        return self._obs(), {"speed": self.speed}

    def step(self, action):
        steer, gas, brake = float(action[0]), float(action[1]), float(action[2])  # IndexError on a pair
        self.seen.append(np.asarray(action, np.float32).copy())
        self.speed = max(0.0, self.speed + gas - brake)
        self.t += 1
        reward = self.speed * (1 - abs(steer)) / 10
        return self._obs(), reward, False, self.t >= self.max_steps, {"speed": self.speed}


class DiscreteEnv(GasBrakeEnv):
    """CarRacing's discrete layout (0 nothing, 1 right, 2 left, 3 gas, 4 brake), HxW grey pictures."""

    def __init__(self, max_steps: int = 30):
        super().__init__(max_steps)
        self.action_space = spaces.Discrete(5)
        self.observation_space = spaces.Box(0, 255, (40, 64), np.uint8)

    def _obs(self) -> np.ndarray:
        return np.full((40, 64), min(255, int(self.speed * 20)), np.uint8)

    def step(self, action):
        self.seen.append(np.asarray(action).copy())
        a = int(action)
        if not self.action_space.contains(a):
            raise ValueError(f"not an action: {action!r}")
        gas, brake = (0.2 if a == 3 else 0.0), (0.8 if a == 4 else 0.0)
        self.speed = max(0.0, self.speed + gas - brake)
        self.t += 1
        return self._obs(), self.speed / 10, False, self.t >= self.max_steps, {"speed": self.speed}


for _id, _cls in ((GAS_BRAKE, GasBrakeEnv), (DISCRETE, DiscreteEnv)):
    if _id not in gym.registry:  # this module may be imported twice (load_callable of its experts)
        gym.register(_id, entry_point=_cls)


def pedal_expert(env):
    """Gas for 3 steps, then brake hard for 2, steering a little: labels must carry both pedals."""

    def act(obs, info):
        t = env.unwrapped.t
        return np.array([0.25, 0.0, 0.9] if t % 5 >= 3 else [0.25, 0.7, 0.0], np.float32)

    return act


def index_expert(env):
    """Gas, gas, left, brake, right, again."""

    def act(obs, info):
        return [3, 3, 2, 4, 1][env.unwrapped.t % 5]

    return act


def mirrored(space):
    """A module:callable layout: [throttle_brake, steering], the pair swapped."""

    class Swapped:
        layout = "swapped"

        def to_env(self, steering, throttle_brake):
            return np.array([throttle_brake, steering], np.float32)

        def from_env(self, action):
            return float(action[1]), float(action[0])

    return Swapped()


# ---------------------------------------------------------------------------------------------- registration


def test_the_sim_env_is_made_by_name_in_a_fresh_interpreter():
    code = (
        "import gymnasium\n"
        "env = gymnasium.make('charles.sim.gym_env:Charles/Drive-v0', max_steps=5)\n"
        "obs, info = env.reset(seed=0)\n"
        "print(obs.shape, gymnasium.make('Charles/Drive-v0').spec.id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(54,", "96,", "3)", "Charles/Drive-v0"]


# ---------------------------------------------------------------------------------------------- adapters


def test_the_layout_is_detected_where_the_space_leaves_no_doubt():
    assert isinstance(action_adapter(spaces.Box(-1, 1, (2,))), PairActions)
    assert isinstance(action_adapter(GasBrakeEnv().action_space), GasBrakeActions)
    assert isinstance(action_adapter(spaces.Discrete(5), table=TABLE), TableActions)
    doubtful = [
        spaces.Box(-1, 1, (3,)),  # three symmetric components: gas/brake or something else?
        spaces.Box(-1, 1, (4,)),
        spaces.Discrete(5),  # no table: which index steers?
        spaces.MultiBinary(3),
    ]
    for space in doubtful:
        with pytest.raises(ValueError, match="gym_action"):
            action_adapter(space)
    with pytest.raises(ValueError, match="table of 5"):
        action_adapter(spaces.Discrete(5), table=TABLE[:4])
    with pytest.raises(ValueError, match="3 components"):
        action_adapter(spaces.Box(-1, 1, (2,)), "gas_brake")
    custom = action_adapter(spaces.Box(-1, 1, (2,)), "test_gym_adapters:mirrored")
    assert custom.from_env(custom.to_env(0.3, -0.4)) == (pytest.approx(0.3), pytest.approx(-0.4))


@pytest.mark.parametrize("steering", [-1.0, -0.3, 0.0, 0.55, 1.0])
@pytest.mark.parametrize("pedal", [-1.0, -0.25, 0.0, 0.4, 1.0])
def test_labels_and_actions_are_mirror_images(steering, pedal):
    for actions in (PairActions(), GasBrakeActions([-1, 0, 0], [1, 1, 1])):
        env_action = actions.to_env(steering, pedal)
        assert actions.from_env(env_action) == (pytest.approx(steering), pytest.approx(pedal))
    gb = GasBrakeActions([-1, 0, 0], [1, 1, 1]).to_env(steering, pedal)
    assert gb[1] >= 0 and gb[2] >= 0 and min(gb[1], gb[2]) == 0  # one pedal at a time, like two triggers


def test_a_discrete_set_round_trips_and_a_model_picks_the_nearest():
    table = TableActions(TABLE, start=2)
    for i in range(2, 7):
        assert table.to_env(*table.from_env(i)) == i
    assert table.to_env(0.9, 0.05) == 3  # right
    assert table.to_env(-0.1, -0.5) == 6  # brake
    assert table.to_env(float("nan"), 0.0) == 2  # a broken value drives as 0
    with pytest.raises(ValueError, match="outside"):
        table.from_env(7)


def test_the_car_racing_configuration_loads():
    cfg = config.load(ROOT / "deploy" / "car_racing.yaml", environ={})
    assert (
        cfg.collector.source == "gym:CarRacing-v3" and cfg.collector.expert == "charles.sim.car_racing:expert"
    )


def test_config_refuses_an_unknown_layout_or_a_bad_table():
    with pytest.raises(ConfigError, match="gym_action"):
        config.load(data={"collector": {"gym_action": "triple"}}, environ={})
    with pytest.raises(ConfigError, match="gym_action_table"):
        config.load(data={"collector": {"gym_action_table": [[0, 2.0]]}}, environ={})
    cfg = config.load(data={"collector": {"gym_action": "table", "gym_action_table": TABLE}}, environ={})
    assert cfg.collector.gym_action_table == TABLE


# ---------------------------------------------------------------------------------------------- the collector


def collect(source: GymSource, n: int):
    try:
        return [source.next() for _ in range(n)]
    finally:
        source.close()


def test_an_expert_on_steer_gas_brake_keeps_its_brake_in_the_labels():
    caps = collect(GymSource(GAS_BRAKE, "test_gym_adapters:pedal_expert", env_kwargs={"max_steps": 10}), 20)
    pedals = sorted({round(c.label[1], 3) for c in caps})
    assert pedals == [-0.9, 0.7], "gas 0.7 and brake 0.9 both reach the labels (the brake used to vanish)"
    assert all(c.label == c.executed and c.label[0] == pytest.approx(0.25) for c in caps)


def test_an_expert_on_a_discrete_set_is_labelled_from_the_table():
    src = GymSource(
        DISCRETE, "test_gym_adapters:index_expert", env_kwargs={"max_steps": 10}, action_table=TABLE
    )
    caps = collect(src, 10)
    assert [c.label for c in caps[:5]] == [(0.0, 0.2), (0.0, 0.2), (-0.6, 0.0), (0.0, -0.8), (0.6, 0.0)]
    with pytest.raises(ValueError, match="CharlesTest/Discrete-v0: .*gym_action_table"):
        GymSource(DISCRETE, "test_gym_adapters:index_expert")


def test_another_size_and_layout_reaches_the_models_input():
    # channels-first floats of 64x40 and HxW grey both become RGB uint8, then the collectors' one resize
    src = GymSource(GAS_BRAKE, "test_gym_adapters:pedal_expert", env_kwargs={"max_steps": 10})
    caps = collect(src, 6)
    assert caps[5].image.shape == (40, 64, 3) and caps[5].image.dtype == np.uint8
    assert caps[5].speed > 0, "speed comes from the env's info"
    shape = InputShape(160, 90, history_rows=4)
    builder = SampleBuilder(shape)
    samples = [p for c in caps if (p := builder.push(c)) is not None]
    assert Encoder("gym", shape, codec="raw").sample(samples[-1]).frame.decode().shape == (90, 160, 3)
    grey, speed, purpose = observation_parts(np.full((40, 64), 7, np.uint8), {"speed": 3.0})
    assert grey.shape == (40, 64, 3) and (grey == 7).all() and speed == 3.0 and purpose == (0.0, 0.0)
    with pytest.raises(ValueError, match="observation image"):
        observation_parts(np.zeros((4, 40, 64), np.uint8), {})  # a frame stack is not a picture


# ---------------------------------------------------------------------------------------------- driving


def test_a_models_controls_drive_steer_gas_brake_and_discrete_envs():
    def braking(frame, speed, purpose, history):
        return (-0.5, -0.6) if speed > 1.0 else (0.2, 0.9)

    env = gym.make(GAS_BRAKE, max_steps=20)
    act = GymPolicy(braking, 8, action_adapter(env.action_space))
    obs, info = env.reset(seed=0)
    for _ in range(6):
        obs, _, _, _, info = env.step(act(obs, info))
    seen = np.array(env.unwrapped.seen)
    assert seen.shape == (6, 3)
    assert {tuple(np.round(a.astype(np.float64), 3).tolist()) for a in seen} == {
        (0.2, 0.9, 0.0),
        (-0.5, 0.0, 0.6),
    }
    assert act.history.copy()[-1, :2].tolist() == pytest.approx([-0.5, -0.6])  # what the env was given

    env = gym.make(DISCRETE, max_steps=20)
    act = GymPolicy(braking, 8, action_adapter(env.action_space, table=TABLE))
    obs, info = env.reset(seed=0)
    for _ in range(6):
        obs, _, _, _, info = env.step(act(obs, info))
    assert {int(a) for a in env.unwrapped.seen} <= {3, 4} and 3 in {int(a) for a in env.unwrapped.seen}
    # the history holds the table entry the env executed, not the raw prediction
    assert np.round(act.history.copy()[-1, :2].astype(np.float64), 3).tolist() in ([0.0, 0.2], [0.0, -0.8])


@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory):
    pytest.importorskip("timm")
    from charles.model.net import build_model
    from charles.model.presets import get_config
    from charles.model.weights import save_weights

    cfg = get_config("tiny")
    path = tmp_path_factory.mktemp("weights") / "tiny.safetensors"
    save_weights(build_model(cfg), cfg, path)
    return path


@pytest.mark.parametrize(
    ("env_id", "extra"),
    [
        (GAS_BRAKE, []),
        (DISCRETE, ["--set", "collector.gym_action=table", "--set", f"collector.gym_action_table={TABLE}"]),
    ],
)
def test_charles_eval_drives_a_trained_model_on_both_layouts(capsys, tiny_weights, env_id, extra):
    args = [
        "eval",
        "--env",
        f"gym:{env_id}",
        "--episodes",
        "2",
        "--set",
        "collector.gym_kwargs={max_steps: 15}",
    ]
    for policy in (f"weights:{tiny_weights}", "constant", "random"):
        assert cli([*args, *extra, "--policy", policy]) == 0  # a 2-component action used to raise IndexError
        r = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert r["episodes"] == 2 and r["ticks"] == 30 and r["env_id"] == env_id


# ---------------------------------------------------------------------------------------------- Box2D car racing


def test_the_car_racing_expert_drives_round_the_track_and_its_brake_reaches_the_labels():
    pytest.importorskip("Box2D")
    from charles.evaluate import evaluate_env

    steps = 250
    src = GymSource(
        "CarRacing-v3", "charles.sim.car_racing:expert", seed=3, env_kwargs={"max_episode_steps": steps}
    )
    caps = collect(src, steps)
    assert caps[0].image.shape == (96, 96, 3) and src.returns, "one whole (short) episode"
    assert min(c.label[1] for c in caps) < -0.1 < 0.1 < max(c.label[1] for c in caps), "gas and brake both"
    cfg = config.load(data={"collector": {"gym_kwargs": {"max_episode_steps": steps}}}, environ={})
    rnd = evaluate_env(
        "CarRacing-v3", "random", seed=3, episodes=1, cfg=cfg, env_kwargs=cfg.collector.gym_kwargs
    )
    assert src.returns[0] > 50 > rnd["episode_return"], (src.returns, rnd)
