"""Tests for the huge-page allocation of large CPU tables (``sb3_fasttd3.common.memory``)."""

import sys

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.memory import HUGE_PAGE_BYTES, on_huge_pages, zeros_on_huge_pages

CPU = th.device("cpu")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="huge pages are only asked for on Linux")


@linux_only
def test_large_tensor_starts_on_a_huge_page_and_is_zero() -> None:
    tensor = zeros_on_huge_pages((1000, 700), th.float32, CPU)
    assert tensor.shape == (1000, 700) and tensor.is_contiguous() and tensor.dtype == th.float32
    assert tensor.data_ptr() % HUGE_PAGE_BYTES == 0
    assert not tensor.any()
    # A copy that is not aligned is moved to an aligned one, with the same values; an aligned one is kept
    values = th.randn(1000, 700)
    moved = on_huge_pages(values)
    assert moved.data_ptr() % HUGE_PAGE_BYTES == 0 and th.equal(moved, values)
    assert on_huge_pages(moved) is moved


def test_small_tensor_is_plain() -> None:
    tensor = zeros_on_huge_pages((10, 3), th.int64, CPU)
    assert tensor.shape == (10, 3) and tensor.dtype == th.int64 and not tensor.any()
    small = th.randn(10, 3)
    assert on_huge_pages(small) is small


@linux_only
def test_large_buffer_samples_what_was_added(tmp_path) -> None:
    # 40,000 rows of 21 floats (3.4 MB): the table is on huge pages, before and after a pickle round trip
    n_envs, rows, obs_dim = 4, 10_000, 8
    obs_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    buffer = DeviceNStepReplayBuffer(
        n_envs * rows, obs_space, spaces.Box(-1, 1, (2,), np.float32), device="cpu", n_envs=n_envs, n_steps=2
    )
    for step in range(rows):
        obs = np.full((n_envs, obs_dim), step, dtype=np.float32) + np.arange(n_envs)[:, None] / 10
        buffer.add(obs, obs + 0.5, np.zeros((n_envs, 2)), np.ones(n_envs), np.zeros(n_envs), [{}] * n_envs)
    assert buffer._table.data_ptr() % HUGE_PAGE_BYTES == 0
    set_random_seed(0)
    samples = buffer.sample(1000)
    # Two-step windows: the return is 1 + gamma and the next observation is the next row's (except the newest row)
    step = samples.observations[:, 0].floor()
    newest = step == rows - 1
    th.testing.assert_close(samples.next_observations[~newest], samples.observations[~newest] + 1.5)
    th.testing.assert_close(samples.rewards[~newest, 0], th.full(((~newest).sum(),), 1.99))
    th.testing.assert_close(samples.rewards[newest, 0], th.ones(newest.sum()))
    save_to_pkl(tmp_path / "buffer", buffer)
    loaded = load_from_pkl(tmp_path / "buffer")
    assert loaded._table.data_ptr() % HUGE_PAGE_BYTES == 0
    set_random_seed(0)
    th.testing.assert_close(loaded.sample(1000), samples, rtol=0.0, atol=0.0)
