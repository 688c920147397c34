"""Trajectories for the replay buffer tests: consistent episodes (an env's next observation is its next observation)."""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.row_sampling import gather_tables

STATE_DIM, ACTION_DIM = 5, 2
ACTION_SPACE = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
BOX_SPACE = spaces.Box(-np.inf, np.inf, shape=(STATE_DIM,), dtype=np.float32)
IMAGE_SPACE = spaces.Box(0, 255, shape=(4, 3, 2), dtype=np.uint8)
# A float key, an image key (stored as uint8) and an integer key
DICT_SPACE = spaces.Dict({"state": BOX_SPACE, "pixels": IMAGE_SPACE, "count": spaces.Discrete(9)})


class Episodes:
    """
    Vectorized-env steps of random episodes, as a VecEnv gives them: the observation of a step is the next
    observation of the step before unless that one ended the episode (then a reset observation). Column 0 of the
    state is a unique id: ``step * n_envs + env`` for observations, that plus 0.5 for final observations.

    :param observation_space: ``BOX_SPACE``, ``IMAGE_SPACE`` or ``DICT_SPACE``
    :param n_envs: Number of envs
    :param seed: Seed of the episodes
    :param p_terminate: Probability that a step terminates
    :param p_truncate: Probability that a step that does not terminate is truncated
    """

    def __init__(
        self, observation_space: spaces.Space, n_envs: int, seed: int, p_terminate: float = 0.1, p_truncate: float = 0.1
    ):
        self.space, self.n_envs = observation_space, n_envs
        self.rng = np.random.default_rng(seed)
        self.p_terminate, self.p_truncate = p_terminate, p_truncate
        self.step_index = 0
        self.obs = self._observations(0.0)

    def _observations(self, id_offset: float) -> dict[str, np.ndarray] | np.ndarray:
        n = self.n_envs
        state = self.rng.normal(size=(n, STATE_DIM)).astype(np.float32)
        state[:, 0] = self.step_index * n + np.arange(n) + id_offset
        pixels = self.rng.integers(0, 256, size=(n, *IMAGE_SPACE.shape), dtype=np.uint8)
        if self.space is BOX_SPACE:
            return state
        if self.space is IMAGE_SPACE:
            return pixels
        return {"state": state, "pixels": pixels, "count": self.rng.integers(0, 9, size=n)}

    def reset(self) -> None:
        """Reset every env (its episode does not end: the buffer's windows must be closed)."""
        self.obs = self._observations(0.0)

    def step(self) -> dict[str, Any]:
        """:return: The arguments of one ``add``, as a dict"""
        n = self.n_envs
        next_obs = self._observations(0.5)
        terminated = self.rng.random(n) < self.p_terminate
        truncated = (self.rng.random(n) < self.p_truncate) & ~terminated
        done = terminated | truncated
        self.step_index += 1
        reset_obs = self._observations(0.0)
        step = dict(
            obs=self.obs,
            next_obs=next_obs,
            action=self.rng.uniform(-1, 1, size=(n, ACTION_DIM)).astype(np.float32),
            reward=self.rng.normal(size=n).astype(np.float32),
            done=done,
            infos=[{"TimeLimit.truncated": True} if flag else {} for flag in truncated],
        )
        self.obs = _select(done, reset_obs, next_obs)
        return step


def _select(mask: np.ndarray, where_true: Any, where_false: Any) -> Any:
    if isinstance(where_true, dict):
        return {key: _select(mask, where_true[key], where_false[key]) for key in where_true}
    shape = (-1,) + (1,) * (where_true.ndim - 1)
    return np.where(mask.reshape(shape), where_true, where_false)


def add(buffers: list[DeviceNStepReplayBuffer], step: dict[str, Any]) -> None:
    for buffer in buffers:
        buffer.add(**step)


def stored_flat_indices(buffer: DeviceNStepReplayBuffer) -> th.Tensor:
    """:return: The flat (row, env) indices of the stored transitions, oldest first (the order the sampler draws in)"""
    n_flat = buffer.ring_rows * buffer.n_envs
    return (buffer._oldest() + th.arange(buffer.n_transitions)) % n_flat


def stored_samples(buffer: DeviceNStepReplayBuffer, flat: th.Tensor | None = None) -> Any:
    """:return: The samples of the transitions at ``flat`` (default: every stored one, oldest first)"""
    flat = stored_flat_indices(buffer) if flat is None else flat
    return buffer._samples(flat, gather_tables(buffer._flat_tables(), flat), None)


def sample_columns(samples: Any) -> th.Tensor:
    """:return: Every field of ``samples`` as float64 columns side by side, one row per transition"""
    columns = []
    for value in samples:
        parts = [value[key] for key in sorted(value)] if isinstance(value, dict) else [value]
        columns += [part.reshape(len(part), -1).double() for part in parts]
    return th.cat(columns, dim=1)


def assert_same_samples(samples_a: Any, samples_b: Any) -> None:
    """Every field equal, value for value, with the same dtypes and shapes."""
    for field in samples_a._fields:
        value_a, value_b = getattr(samples_a, field), getattr(samples_b, field)
        if isinstance(value_a, dict):
            assert value_a.keys() == value_b.keys(), field
            pairs = [(f"{field}/{key}", value_a[key], value_b[key]) for key in value_a]
        else:
            pairs = [(field, value_a, value_b)]
        for name, a, b in pairs:
            assert a.dtype == b.dtype and a.shape == b.shape, name
            assert th.equal(a, b), name
