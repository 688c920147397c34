"""Action spaces of more than one dimension: the actor acts flat, the envs get actions of the space's shape."""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import NormalActionNoise

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.vec_env import TorchStep, TorchVecEnv
from tests.test_fasttd3 import TINY

# Uneven bounds, so that a flat action scaled with the bounds of another position is caught
LOW = np.array([[-1.0, 0.0], [-2.0, -3.0]], dtype=np.float32)
HIGH = np.array([[1.0, 4.0], [2.0, 3.0]], dtype=np.float32)
ACTION_SPACE = spaces.Box(LOW, HIGH, dtype=np.float32)
OBSERVATION_SPACE = spaces.Box(-10.0, 10.0, shape=(5,), dtype=np.float32)
STEPS = 5


class MatrixActionEnv(gym.Env):
    """Observes the action it was last given (flattened) and its step count; truncated after ``STEPS`` steps."""

    action_space, observation_space = ACTION_SPACE, OBSERVATION_SPACE

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(5, dtype=np.float32), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        assert action.shape == ACTION_SPACE.shape, f"the env got actions of shape {action.shape}"
        self.t += 1
        obs = np.append(action.flatten(), self.t).astype(np.float32)
        return obs, -float(np.square(action).sum()), False, self.t >= STEPS, {}


class MatrixActionTorchVecEnv(TorchVecEnv):
    """:class:`MatrixActionEnv` batched in torch."""

    def __init__(self, num_envs: int = 2):
        super().__init__(num_envs, OBSERVATION_SPACE, ACTION_SPACE, device="cpu")
        self.t = th.zeros(num_envs)

    def _reset(self, seed: int | None) -> th.Tensor:
        self.t.zero_()
        return th.zeros(self.num_envs, 5)

    def _step(self, actions: th.Tensor) -> TorchStep:
        assert actions.shape == (self.num_envs, *ACTION_SPACE.shape), f"the env got actions of shape {actions.shape}"
        self.t += 1
        obs = th.cat([actions.flatten(1), self.t[:, None]], dim=1)
        truncated = self.t >= STEPS
        self.t = th.where(truncated, 0.0, self.t)
        reset_obs = th.where(truncated[:, None], 0.0, obs)
        no = th.zeros(self.num_envs, dtype=th.bool)
        return TorchStep(reset_obs, -actions.square().flatten(1).sum(1), no, truncated, obs)


@pytest.mark.parametrize("torch_env", [False, True])
@pytest.mark.parametrize("noise_shape", [None, (4,), (2, 2)])
def test_a_matrix_action_space_reaches_the_env_in_its_shape_and_the_buffer_flat(torch_env, noise_shape):
    env = MatrixActionTorchVecEnv() if torch_env else make_vec_env(MatrixActionEnv, n_envs=2, seed=0)
    action_noise = None if noise_shape is None else NormalActionNoise(np.zeros(noise_shape), 0.3 * np.ones(noise_shape))
    model = FastTD3("MlpPolicy", env, seed=0, action_noise=action_noise, **TINY)
    model.learn(60)

    samples = model.replay_buffer.sample(64)
    assert samples.actions.shape == (64, 4) and samples.actions.abs().max() <= 1.0
    # The next observation holds the action the env got: the stored action scaled, position by position
    env_actions = LOW.flatten() + (samples.actions.cpu().numpy() + 1.0) * (HIGH - LOW).flatten() / 2.0
    np.testing.assert_allclose(samples.next_observations[:, :4].cpu().numpy(), env_actions, rtol=1e-5, atol=1e-5)

    assert model.predict(np.zeros((3, 5), dtype=np.float32))[0].shape == (3, 2, 2)
    action, _ = model.predict(np.zeros(5, dtype=np.float32))
    assert action.shape == (2, 2) and ACTION_SPACE.contains(action)
    evaluate_policy(model, make_vec_env(MatrixActionEnv, n_envs=2), n_eval_episodes=2)


def test_action_noise_of_another_size_names_the_space_shape():
    model = FastTD3("MlpPolicy", MatrixActionEnv(), action_noise=NormalActionNoise(np.zeros(3), np.ones(3)), **TINY)
    with pytest.raises(ValueError, match=r"action shape \(2, 2\) \(or, vectorized, \(1, 2, 2\)\), got \(3,\)"):
        model.learn(10)
