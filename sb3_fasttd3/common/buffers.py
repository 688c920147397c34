"""Replay buffer storing transitions as torch tensors on the training device, with n-step returns."""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples, ReplayBufferSamples
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env import VecNormalize

from sb3_fasttd3.common.memory import on_huge_pages, zeros_on_huge_pages
from sb3_fasttd3.common.row_sampling import gather_rows, sample_rows

ArrayLike = np.ndarray | th.Tensor
ObsLike = ArrayLike | dict[str, ArrayLike]
TensorObs = th.Tensor | dict[str, th.Tensor]

# Observation spaces (and Dict sub-spaces) the buffer stores; integer observations are stored as exact float32 values
STORABLE_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


class RowLayout:
    """
    Column ranges of the fields packed side by side in one float32 row per stored transition:
    ``observation | action | next observation | n-step return | discount | terminal``, each
    observation flattened key after key. The fields written when a window grows (next observation
    to terminal) come last, so that they form one contiguous column range.

    :param obs_shapes: Shape of the observation, or of each key of a Dict observation
    :param action_dim: Dimension of the action
    """

    def __init__(self, obs_shapes: tuple[int, ...] | dict[str, tuple[int, ...]], action_dim: int):
        self.obs_shapes = obs_shapes
        shapes = obs_shapes if isinstance(obs_shapes, dict) else {"": obs_shapes}
        self.obs_width = sum(int(np.prod(shape)) for shape in shapes.values())
        self.key_slices: dict[str, slice] = {}
        start = 0
        for key, shape in shapes.items():
            self.key_slices[key] = slice(start, start + int(np.prod(shape)))
            start += int(np.prod(shape))
        self.obs = slice(0, self.obs_width)
        self.action = slice(self.obs_width, self.obs_width + action_dim)
        self.window_start = self.action.stop
        self.next_obs = slice(self.window_start, self.window_start + self.obs_width)
        self.n_step_return, self.discount, self.terminal = (self.next_obs.stop + offset for offset in range(3))
        self.width = self.terminal + 1

    def flatten_obs(self, obs: ObsLike, n_rows: int, device: th.device) -> th.Tensor:
        """
        :param obs: Observations with leading dimension ``n_rows`` (or a dict of those)
        :return: The observations as float32 rows of width ``obs_width``, keys side by side
        """
        if isinstance(self.obs_shapes, dict):
            assert isinstance(obs, dict), "Dict observation space: the observations must be a dict"
            parts = [th.as_tensor(obs[key], device=device).reshape(n_rows, -1) for key in self.obs_shapes]
            return th.cat(parts, dim=1).float()
        assert not isinstance(obs, dict)
        return th.as_tensor(obs, device=device).reshape(n_rows, self.obs_width).float()

    def unflatten_obs(self, rows: th.Tensor) -> TensorObs:
        """
        :param rows: Tensor of shape ``(..., obs_width)``
        :return: Views of the observation (or of each key) with their original shapes
        """
        if isinstance(self.obs_shapes, dict):
            return {key: rows[..., self.key_slices[key]].unflatten(-1, shape) for key, shape in self.obs_shapes.items()}
        return rows.unflatten(-1, self.obs_shapes)


class DeviceNStepReplayBuffer(BaseBuffer):
    """
    Replay buffer for off-policy algorithms that keeps all of its storage as torch tensors
    on ``device`` (e.g. the GPU used for training), so that sampling large batches never
    goes through NumPy nor through host-device copies.

    n-step returns have the same semantics as SB3's ``NStepReplayBuffer``: starting from row ``t``
    of env ``e``, rows ``t, t+1, ..., t+n_steps-1`` of the same env are accumulated, stopping at
    (and including) the first row that is done (termination or truncation), and never past the
    newest row, which counts as truncated until its successor arrives. Unlike SB3, the windows
    are kept up to date as rows are added (each add extends the windows of the ``n_steps - 1``
    previous rows that are still open), so that sampling is a single row gather from one packed
    table: several times faster than computing the windows at sampling time.

    Storage is allocated lazily, on the first call to ``add()``: a buffer that only exists
    because a model was loaded for prediction does not use any memory.

    Storage (``cap = buffer_size // n_envs`` rows per env), exposed as views of shape ``(n_envs, cap, ...)``:

    - ``observations``: float32 ``(n_envs, cap, *obs_shape)`` (a dict of such views for ``Dict``
      observation spaces), raw (unnormalized) values
    - ``actions``: float32 ``(n_envs, cap, action_dim)``
    - ``rewards``: float32 ``(n_envs, cap)``, the one-step rewards
    - ``dones``: bool ``(n_envs, cap)``, the VecEnv ``done`` (terminated or truncated)
    - ``timeouts``: bool ``(n_envs, cap)``, truncation flag (always False when
      ``handle_timeout_termination=False``)
    - ``next_observations``: the observation the n-step target bootstraps from, i.e. the next
      observation of the last row of the window (for a done row: the final observation of the
      episode, not the reset one); with ``n_steps=1``, the one-step next observation
    - ``n_step_returns``, ``discounts`` (``gamma ** rows_used``) and ``terminals`` (the last row
      of the window is terminated, not truncated: no bootstrapping): float32 ``(n_envs, cap)``

    :param buffer_size: Max number of transitions in the buffer, in total over all envs
        (each env gets ``buffer_size // n_envs`` rows)
    :param observation_space: Observation space, one of :data:`STORABLE_SPACES` or a ``spaces.Dict`` of those
    :param action_space: Action space, a ``spaces.Box``
    :param device: PyTorch device on which the storage lives and the samples are returned
    :param n_envs: Number of parallel environments
    :param optimize_memory_usage: Not supported, must be False
    :param handle_timeout_termination: Handle timeout termination (due to time limit)
        separately and treat the task as an infinite horizon task (truncations bootstrap).
        If False, truncations are treated as terminations.
    :param n_steps: Number of steps to accumulate rewards for n-step returns
    :param gamma: Discount factor, in (0, 1]
    """

    # Storage tensors, all of shape (cap, n_envs, ...): moved between devices, pickled as CPU tensors
    _STORAGE_NAMES = ("_table", "_rewards", "_dones", "_timeouts", "_open", "_gamma_powers")

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        n_steps: int = 1,
        gamma: float = 0.99,
    ):
        if n_steps < 1:
            raise ValueError(f"n_steps must be an integer >= 1, got n_steps={n_steps}")
        if not 0.0 < gamma <= 1.0:
            raise ValueError(f"gamma must be in the interval (0, 1], got gamma={gamma}")
        if optimize_memory_usage:
            raise ValueError(
                "DeviceNStepReplayBuffer does not support optimize_memory_usage=True, use optimize_memory_usage=False"
            )
        subspaces = observation_space.spaces if isinstance(observation_space, spaces.Dict) else {"": observation_space}
        if not all(isinstance(space, STORABLE_SPACES) for space in subspaces.values()):
            accepted = ", ".join(space.__name__ for space in STORABLE_SPACES)
            raise TypeError(
                f"DeviceNStepReplayBuffer supports an observation_space that is a {accepted} space or a spaces.Dict "
                f"of those, got observation_space={observation_space}"
            )
        if not isinstance(action_space, spaces.Box):
            raise TypeError(f"DeviceNStepReplayBuffer supports only a spaces.Box action_space, got {action_space}")
        if buffer_size // n_envs < n_steps + 1:
            raise ValueError(
                f"buffer_size={buffer_size} is too small: with n_envs={n_envs} and n_steps={n_steps}, the buffer "
                f"must hold at least n_envs * (n_steps + 1) = {n_envs * (n_steps + 1)} transitions"
            )

        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        # Rows per env (SB3 convention: buffer_size counts transitions over all envs)
        self.buffer_size = max(buffer_size // n_envs, 1)
        self.optimize_memory_usage = False
        self.handle_timeout_termination = handle_timeout_termination
        self.n_steps = int(n_steps)
        self.gamma = float(gamma)

        self.layout = RowLayout(self.obs_shape, self.action_dim)  # type: ignore[arg-type]
        # Lazily allocated in ``add()``: the packed rows, the one-step rewards and flags, and which
        # rows still have an open n-step window (not yet n_steps long, and no done row in it)
        self._table: th.Tensor | None = None
        self._rewards: th.Tensor | None = None
        self._dones: th.Tensor | None = None
        self._timeouts: th.Tensor | None = None
        self._open: th.Tensor | None = None
        self._gamma_powers: th.Tensor | None = None

    @property
    def is_allocated(self) -> bool:
        """
        :return: Whether the storage tensors have been allocated (i.e. ``add()`` was called at least once)
        """
        return self._table is not None

    def _allocate(self) -> None:
        """
        Allocate the (zero-initialized) storage tensors on ``self.device``.
        """
        shape = (self.buffer_size, self.n_envs)
        self._table = zeros_on_huge_pages((*shape, self.layout.width), th.float32, self.device)
        self._rewards = th.zeros(shape, dtype=th.float32, device=self.device)
        self._dones = th.zeros(shape, dtype=th.bool, device=self.device)
        self._timeouts = th.zeros(shape, dtype=th.bool, device=self.device)
        self._open = th.zeros(shape, dtype=th.bool, device=self.device)
        # gamma ** k for k = 0..n_steps, each rounded once from float64
        self._gamma_powers = th.tensor([self.gamma**k for k in range(self.n_steps + 1)], device=self.device)

    # Per-env views of the storage, shape (n_envs, cap, ...), None before the first add
    def _column_view(self, column: slice | int) -> th.Tensor | None:
        return None if self._table is None else self._table[..., column].transpose(0, 1)

    @property
    def observations(self) -> TensorObs | None:
        columns = self._column_view(self.layout.obs)
        return None if columns is None else self.layout.unflatten_obs(columns)

    @property
    def next_observations(self) -> TensorObs | None:
        columns = self._column_view(self.layout.next_obs)
        return None if columns is None else self.layout.unflatten_obs(columns)

    @property
    def actions(self) -> th.Tensor | None:
        return self._column_view(self.layout.action)

    @property
    def n_step_returns(self) -> th.Tensor | None:
        return self._column_view(self.layout.n_step_return)

    @property
    def discounts(self) -> th.Tensor | None:
        return self._column_view(self.layout.discount)

    @property
    def terminals(self) -> th.Tensor | None:
        return self._column_view(self.layout.terminal)

    @property
    def rewards(self) -> th.Tensor | None:
        return None if self._rewards is None else self._rewards.T

    @property
    def dones(self) -> th.Tensor | None:
        return None if self._dones is None else self._dones.T

    @property
    def timeouts(self) -> th.Tensor | None:
        return None if self._timeouts is None else self._timeouts.T

    def _flags(self, values: ArrayLike) -> th.Tensor:
        return th.as_tensor(values, device=self.device).reshape(self.n_envs).to(th.bool)

    def add(
        self,
        obs: ObsLike,
        next_obs: ObsLike,
        action: ArrayLike,
        reward: ArrayLike,
        done: ArrayLike,
        infos: list[dict[str, Any]],
        truncated: ArrayLike | None = None,
    ) -> None:
        """
        Add one transition per env. Inputs can be NumPy arrays or torch tensors (on any device).

        :param obs: Observations, shape ``(n_envs, *obs_shape)`` (or dict of those)
        :param next_obs: Next observations (for a done env: the final observation of the episode, not the reset one)
        :param action: Actions, shape ``(n_envs, action_dim)``
        :param reward: Rewards, shape ``(n_envs,)``
        :param done: VecEnv dones (terminated or truncated), shape ``(n_envs,)``
        :param infos: VecEnv infos, used to read ``"TimeLimit.truncated"`` when ``truncated`` is None
        :param truncated: Optional truncation flags, shape ``(n_envs,)``, overriding the infos
        """
        if not self.is_allocated:
            self._allocate()
        assert self._table is not None and self._rewards is not None and self._open is not None
        assert self._dones is not None and self._timeouts is not None

        with th.no_grad():
            reward_t = th.as_tensor(reward, device=self.device).reshape(self.n_envs).float()
            done_t = self._flags(done)
            if not self.handle_timeout_termination:
                timeout_t = th.zeros_like(done_t)
            elif truncated is not None:
                timeout_t = self._flags(truncated)
            else:
                timeout_t = self._flags([bool(info.get("TimeLimit.truncated", False)) for info in infos])
            terminal_t = (done_t & ~timeout_t).float()
            next_obs_t = self.layout.flatten_obs(next_obs, self.n_envs, self.device)
            if self.n_steps > 1:
                self._extend_windows(next_obs_t, reward_t, done_t, terminal_t)

            row = self._table[self.pos]
            row[:, self.layout.obs] = self.layout.flatten_obs(obs, self.n_envs, self.device)
            row[:, self.layout.action] = th.as_tensor(action, device=self.device).reshape(self.n_envs, self.action_dim)
            row[:, self.layout.next_obs] = next_obs_t
            row[:, self.layout.n_step_return] = reward_t
            row[:, self.layout.discount] = self.gamma
            row[:, self.layout.terminal] = terminal_t
            self._rewards[self.pos], self._dones[self.pos], self._timeouts[self.pos] = reward_t, done_t, timeout_t
            self._open[self.pos] = ~done_t & (self.n_steps > 1)

        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    def _extend_windows(self, next_obs: th.Tensor, reward: th.Tensor, done: th.Tensor, terminal: th.Tensor) -> None:
        """
        Append the row being written at ``self.pos`` to the open windows of the ``n_steps - 1`` rows
        before it (the newest rows of each env, whatever the wrap-around): their return gains
        ``gamma ** lag * reward``, and their next observation, discount and terminal flag become this row's.
        """
        assert self._table is not None and self._open is not None and self._gamma_powers is not None
        lags = th.arange(1, self.n_steps, device=self.device)
        rows = (self.pos - lags) % self.buffer_size
        is_open = self._open[rows]  # (n_steps - 1, n_envs)
        window = self._table[rows, :, self.layout.window_start :]  # next obs, return, discount, terminal
        powers = self._gamma_powers
        extended = th.cat(
            [
                next_obs.expand(len(lags), -1, -1),
                (window[..., -3] + powers[1:-1, None] * reward)[..., None],
                powers[2:, None, None].expand(-1, self.n_envs, 1),
                terminal.expand(len(lags), -1)[..., None],
            ],
            dim=-1,
        )
        self._table[rows, :, self.layout.window_start :] = th.where(is_open[..., None], extended, window)
        self._open[rows] = is_open & ~done & (lags < self.n_steps - 1)[:, None]

    def close_windows(self) -> None:
        """
        End the n-step windows that are still open: call it when the next transitions added do not
        follow the newest ones (e.g. the environments were reset without ending their episodes),
        so that those windows bootstrap from the newest rows instead of reaching into the new episodes.
        """
        if self._open is not None:
            self._open.zero_()

    def reset(self) -> None:
        super().reset()
        self.close_windows()

    def sample(  # type: ignore[override]
        self, batch_size: int, env: VecNormalize | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        Sample a batch of n-step transitions, uniformly over the stored (env, row) pairs. On the CPU the
        indices come from NumPy's global RNG (as in SB3's buffers, seeded by ``set_random_seed``), through
        :func:`~sb3_fasttd3.common.row_sampling.sample_rows`; on other devices from the device's torch RNG.

        :param batch_size: Number of transitions to sample
        :param env: Must be None (observation/reward normalization by a VecNormalize is not supported)
        :return: A batch with ``rewards`` the n-step discounted returns, ``discounts`` the factors
            (``gamma ** steps_used``) to apply to the bootstrapped target, ``next_observations``
            and ``dones`` (terminated, not truncated) taken at the last step used.
        """
        if env is not None:
            raise ValueError("DeviceNStepReplayBuffer does not support normalizing with a VecNormalize, pass env=None")
        if self.size() == 0:
            raise ValueError("Cannot sample from an empty buffer, call add() first")
        assert self._table is not None
        # Storage is (row, env)-major: the stored rows of every env are the first size() * n_envs flat rows
        table, high = self._table.flatten(0, 1), self.size() * self.n_envs
        if self.device.type == "cpu":
            return self._samples(sample_rows(table, high, batch_size))
        return self._samples(table.index_select(0, th.randint(0, high, (batch_size,), device=self.device)))

    def _get_samples(  # type: ignore[override]
        self, batch_inds: th.Tensor, env: VecNormalize | None = None, env_inds: th.Tensor | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        The n-step transitions starting at rows ``batch_inds`` of envs ``env_inds``.

        :param batch_inds: Starting rows, int64 tensor of shape ``(batch_size,)`` on ``self.device``
        :param env: Unused (must be None)
        :param env_inds: Envs of the samples (drawn uniformly when None)
        :return: The samples
        """
        assert self._table is not None
        if env_inds is None:
            env_inds = th.randint(0, self.n_envs, batch_inds.shape, device=self.device)
        return self._samples(gather_rows(self._table.flatten(0, 1), batch_inds * self.n_envs + env_inds))

    def _samples(self, batch: th.Tensor) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        :param batch: Gathered rows of the table, shape ``(batch_size, width)``
        :return: The samples, views of ``batch``
        """
        layout = self.layout
        fields = dict(
            observations=layout.unflatten_obs(batch[:, layout.obs]),
            actions=batch[:, layout.action],
            next_observations=layout.unflatten_obs(batch[:, layout.next_obs]),
            dones=batch[:, layout.terminal, None],
            rewards=batch[:, layout.n_step_return, None],
            discounts=batch[:, layout.discount, None],
        )
        if isinstance(fields["observations"], dict):
            return DictReplayBufferSamples(**fields)  # type: ignore[arg-type]
        return ReplayBufferSamples(**fields)  # type: ignore[arg-type]

    def to(self, device: th.device | str) -> None:
        """
        Move the storage to another device (e.g. after loading a saved buffer) and use it from now on.

        :param device: The new device
        """
        self.device = get_device(device)
        self._move_storage(self.device)

    def _move_storage(self, device: th.device) -> None:
        for name in self._STORAGE_NAMES:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self._table is not None:
            self._table = on_huge_pages(self._table)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the storage as CPU tensors, so that a buffer saved on a GPU can be unpickled
        # on a machine without one (no copy is made for storage already on the CPU).
        state = self.__dict__.copy()
        for name in self._STORAGE_NAMES:
            if state[name] is not None:
                state[name] = state[name].cpu()
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_table" not in state:
            raise ValueError(
                "This replay buffer was saved by an earlier version of sb3_fasttd3, whose storage layout is not "
                "supported anymore: train without it (or with a buffer saved by this version)"
            )
        self.__dict__.update(state)
        # Falls back to the CPU if the saved device is a GPU that is not available
        self.device = get_device(state["device"])
        self._move_storage(self.device)
