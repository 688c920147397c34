"""
``sample(batch_size, env)`` with a ``VecNormalize`` (``sb3_fasttd3.common.normalized_samples``): the samples SB3's
``NStepReplayBuffer`` gives for the same data, the same statistics and the same (row, env) indices.
"""

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.buffers import NStepReplayBuffer
from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from tests.buffer_data import ACTION_SPACE, BOX_SPACE, DICT_SPACE, STATE_DIM, Episodes, add


class SpaceEnv(gym.Env):
    """An env that only has spaces (VecNormalize needs one to wrap)."""

    def __init__(self, observation_space: spaces.Space):
        self.observation_space, self.action_space = observation_space, ACTION_SPACE


def vec_normalize(observation_space: spaces.Space, seed: int, **kwargs) -> VecNormalize:
    """A VecNormalize with random statistics, clipping small enough that it clips some values."""
    env = VecNormalize(DummyVecEnv([lambda: SpaceEnv(observation_space)]), clip_obs=1.5, clip_reward=0.8, **kwargs)
    rng = np.random.default_rng(seed)
    rms_list = [] if not env.norm_obs else env.obs_rms.values() if isinstance(env.obs_rms, dict) else [env.obs_rms]
    for rms in rms_list:
        rms.mean = rng.normal(size=rms.mean.shape) * 3
        rms.var = rng.uniform(0.2, 4.0, size=rms.var.shape)
    env.ret_rms.var = np.float64(rng.uniform(0.3, 3.0))
    return env


@settings(max_examples=25, deadline=None)
@given(
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([1, 3]),
    n_adds=st.integers(min_value=1, max_value=20),
    lean=st.booleans(),
    norm=st.sampled_from([(True, True), (True, False), (False, True)]),
    handle_timeout=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_same_samples_as_sb3_with_vec_normalize(
    n_envs: int, n_steps: int, n_adds: int, lean: bool, norm: tuple[bool, bool], handle_timeout: bool, seed: int
) -> None:
    kwargs = dict(n_envs=n_envs, handle_timeout_termination=handle_timeout, n_steps=n_steps, gamma=0.9)
    ours = DeviceNStepReplayBuffer(6 * n_envs, BOX_SPACE, ACTION_SPACE, "cpu", optimize_memory_usage=lean, **kwargs)
    reference = NStepReplayBuffer(6 * n_envs, BOX_SPACE, ACTION_SPACE, "cpu", **kwargs)
    episodes = Episodes(BOX_SPACE, n_envs, seed, p_terminate=0.2, p_truncate=0.2)
    for _ in range(n_adds):
        step = episodes.step()
        ours.add(**step)
        reference.add(**step)
    env = vec_normalize(BOX_SPACE, seed, norm_obs=norm[0], norm_reward=norm[1])

    # Both buffers use the same rows while ours is not wrapped by the spare row of the lean layout
    n_rows = reference.size()
    rows = np.random.default_rng(seed).integers(0, n_rows, size=50)
    np.random.seed(seed % 2**32)
    expected = reference._get_samples(rows, env)
    np.random.seed(seed % 2**32)
    envs = np.random.randint(0, n_envs, size=rows.shape)  # the draw SB3 made
    ours_rows = (ours.pos - n_rows + (rows - reference.pos) % n_rows) % ours.ring_rows if reference.full else rows
    samples = ours._get_samples(th.from_numpy(ours_rows), env, env_inds=th.from_numpy(envs))
    for field in ("observations", "next_observations", "dones", "actions"):
        assert th.equal(getattr(samples, field), getattr(expected, field)), field
    # Sums and powers in another order: float32 rounding
    th.testing.assert_close(samples.rewards, expected.rewards, rtol=1e-6, atol=1e-6)
    th.testing.assert_close(samples.discounts, expected.discounts.float(), rtol=1e-6, atol=0.0)
    if norm[0]:
        assert samples.observations.abs().max() <= 1.5


@pytest.mark.parametrize("lean", [False, True])
def test_dict_observations_normalize_their_keys(lean: bool) -> None:
    # norm_obs_keys: the state key is normalized, the image key stays uint8, the integer key stays as stored
    buffer = DeviceNStepReplayBuffer(30, DICT_SPACE, ACTION_SPACE, "cpu", 3, optimize_memory_usage=lean, n_steps=2)
    episodes = Episodes(DICT_SPACE, 3, seed=4)
    for _ in range(12):
        add([buffer], episodes.step())
    env = vec_normalize(DICT_SPACE, seed=5, norm_obs_keys=["state"])
    rows, envs = th.arange(8).repeat(3), th.arange(3).repeat_interleave(8)
    raw, normalized = buffer._get_samples(rows, env_inds=envs), buffer._get_samples(rows, env, env_inds=envs)
    for field in ("observations", "next_observations"):
        raw_obs, obs = getattr(raw, field), getattr(normalized, field)
        assert obs["pixels"].dtype == th.uint8 and th.equal(obs["pixels"], raw_obs["pixels"])
        assert th.equal(obs["count"], raw_obs["count"])
        # What VecNormalize.normalize_obs gives for the raw samples, value for value
        expected = env.normalize_obs({key: value.numpy() for key, value in raw_obs.items()})
        assert obs["state"].dtype == th.float32 and obs["state"].shape == (24, STATE_DIM)
        np.testing.assert_array_equal(obs["state"].numpy(), expected["state"])
    assert not th.equal(normalized.rewards, raw.rewards)


def test_sample_normalizes_with_the_current_statistics() -> None:
    buffer = DeviceNStepReplayBuffer(20, BOX_SPACE, ACTION_SPACE, "cpu", 1, n_steps=1)
    episodes = Episodes(BOX_SPACE, 1, seed=0)
    steps = [episodes.step() for _ in range(5)]
    for step in steps:
        buffer.add(**step)
    env = vec_normalize(BOX_SPACE, seed=0)
    rows, envs = th.arange(5), th.zeros(5, dtype=th.int64)
    before = buffer._get_samples(rows, env, env_inds=envs)
    env.obs_rms.mean = env.obs_rms.mean + 1.0
    env.ret_rms.var = env.ret_rms.var * 4
    after = buffer._get_samples(rows, env, env_inds=envs)
    assert not th.equal(before.observations, after.observations)
    assert not th.equal(before.rewards, after.rewards)
    # The buffer keeps the original values
    raw = buffer._get_samples(rows, env_inds=envs)
    np.testing.assert_array_equal(raw.observations.numpy(), np.concatenate([step["obs"] for step in steps]))
    np.testing.assert_array_equal(raw.rewards[:, 0].numpy(), np.concatenate([step["reward"] for step in steps]))
