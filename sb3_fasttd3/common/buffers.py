"""Replay buffer storing transitions as torch tensors on the training device, with n-step returns."""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples, ReplayBufferSamples
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env import VecNormalize

ArrayLike = np.ndarray | th.Tensor
ObsLike = ArrayLike | dict[str, ArrayLike]


def _gather_rows(storage: th.Tensor, flat_rows: th.Tensor) -> th.Tensor:
    """Rows ``flat_rows`` of ``storage`` of shape (n_envs, capacity, ...), indexed as env * capacity + row."""
    return storage.flatten(0, 1).index_select(0, flat_rows)


class DeviceNStepReplayBuffer(BaseBuffer):
    """
    Replay buffer for off-policy algorithms that keeps all of its storage as torch tensors
    on ``device`` (e.g. the GPU used for training), so that sampling large batches never
    goes through NumPy nor through host-device copies.

    n-step returns are computed when sampling, with the same semantics as SB3's
    ``NStepReplayBuffer``: starting from the sampled row ``t`` of env ``e``, rows
    ``t, t+1, ..., t+n_steps-1`` of the same env are accumulated, stopping at (and including)
    the first row that is done (termination or truncation). The most recently written row is
    considered truncated while sampling (unless it is already done), so that an n-step window
    never reaches into older data on the other side of the write pointer.

    Storage is allocated lazily, on the first call to ``add()``: a buffer that only exists
    because a model was loaded for prediction does not use any memory.

    Storage layout (``cap = buffer_size // n_envs`` rows per env):

    - ``observations`` / ``next_observations``: float32 ``(n_envs, cap, *obs_shape)``
      (a dict of such tensors for ``Dict`` observation spaces), raw (unnormalized) values
    - ``actions``: float32 ``(n_envs, cap, action_dim)``
    - ``rewards``: float32 ``(n_envs, cap)``
    - ``dones``: bool ``(n_envs, cap)``, the VecEnv ``done`` (terminated or truncated)
    - ``timeouts``: bool ``(n_envs, cap)``, truncation flag (always False when
      ``handle_timeout_termination=False``)

    :param buffer_size: Max number of transitions in the buffer, in total over all envs
        (each env gets ``buffer_size // n_envs`` rows)
    :param observation_space: Observation space, a ``spaces.Box`` or a ``spaces.Dict`` of ``spaces.Box``
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

    observations: th.Tensor | dict[str, th.Tensor] | None
    next_observations: th.Tensor | dict[str, th.Tensor] | None
    actions: th.Tensor | None
    rewards: th.Tensor | None
    dones: th.Tensor | None
    timeouts: th.Tensor | None

    # Names of the storage attributes (moved between devices, pickled as CPU tensors)
    _STORAGE_NAMES = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")

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
        if isinstance(observation_space, spaces.Dict):
            bad_keys = [key for key, space in observation_space.spaces.items() if not isinstance(space, spaces.Box)]
            if bad_keys:
                raise TypeError(
                    "DeviceNStepReplayBuffer supports an observation_space that is a spaces.Box or a spaces.Dict "
                    f"of spaces.Box, but the sub-spaces {bad_keys} of the Dict observation_space are not Box"
                )
        elif not isinstance(observation_space, spaces.Box):
            raise TypeError(
                "DeviceNStepReplayBuffer supports an observation_space that is a spaces.Box or a spaces.Dict "
                f"of spaces.Box, got observation_space={observation_space}"
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

        # Lazily allocated in ``add()``
        self.observations = None
        self.next_observations = None
        self.actions = None
        self.rewards = None
        self.dones = None
        self.timeouts = None

    @property
    def is_allocated(self) -> bool:
        """
        :return: Whether the storage tensors have been allocated (i.e. ``add()`` was called at least once)
        """
        return self.rewards is not None

    def _allocate(self) -> None:
        """
        Allocate the (zero-initialized) storage tensors on ``self.device``.
        """
        n_envs, cap = self.n_envs, self.buffer_size

        def obs_storage() -> th.Tensor | dict[str, th.Tensor]:
            if isinstance(self.obs_shape, dict):
                return {
                    key: th.zeros((n_envs, cap, *shape), dtype=th.float32, device=self.device)
                    for key, shape in self.obs_shape.items()
                }
            return th.zeros((n_envs, cap, *self.obs_shape), dtype=th.float32, device=self.device)

        self.observations = obs_storage()
        self.next_observations = obs_storage()
        self.actions = th.zeros((n_envs, cap, self.action_dim), dtype=th.float32, device=self.device)
        self.rewards = th.zeros((n_envs, cap), dtype=th.float32, device=self.device)
        self.dones = th.zeros((n_envs, cap), dtype=th.bool, device=self.device)
        self.timeouts = th.zeros((n_envs, cap), dtype=th.bool, device=self.device)

    def _write_obs(self, storage: th.Tensor | dict[str, th.Tensor], obs: ObsLike) -> None:
        """
        Write one row of observations (for all envs) at ``self.pos``.

        :param storage: Observation storage (tensor, or dict of tensors)
        :param obs: Observations with leading dimension ``n_envs``
        """
        if isinstance(storage, dict):
            assert isinstance(obs, dict), "Dict observation space: the observations must be a dict"
            assert isinstance(self.obs_shape, dict)
            for key, shape in self.obs_shape.items():
                storage[key][:, self.pos] = th.as_tensor(obs[key], device=self.device).reshape(self.n_envs, *shape)
        else:
            assert not isinstance(obs, dict) and not isinstance(self.obs_shape, dict)
            storage[:, self.pos] = th.as_tensor(obs, device=self.device).reshape(self.n_envs, *self.obs_shape)

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
        assert self.observations is not None and self.next_observations is not None
        assert self.actions is not None and self.rewards is not None
        assert self.dones is not None and self.timeouts is not None

        with th.no_grad():
            self._write_obs(self.observations, obs)
            self._write_obs(self.next_observations, next_obs)
            self.actions[:, self.pos] = th.as_tensor(action, device=self.device).reshape(self.n_envs, self.action_dim)
            self.rewards[:, self.pos] = th.as_tensor(reward, device=self.device).reshape(self.n_envs)
            self.dones[:, self.pos] = th.as_tensor(done, device=self.device).reshape(self.n_envs).to(th.bool)
            if not self.handle_timeout_termination:
                self.timeouts[:, self.pos] = False
            elif truncated is not None:
                self.timeouts[:, self.pos] = th.as_tensor(truncated, device=self.device).reshape(self.n_envs).to(th.bool)
            else:
                flags = [bool(info.get("TimeLimit.truncated", False)) for info in infos]
                self.timeouts[:, self.pos] = th.as_tensor(flags, dtype=th.bool, device=self.device)

        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True
            self.pos = 0

    def sample(  # type: ignore[override]
        self, batch_size: int, env: VecNormalize | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        Sample a batch of n-step transitions, uniformly over the stored (env, row) pairs.
        Uses the global torch RNG on ``self.device``.

        :param batch_size: Number of transitions to sample
        :param env: Must be None (observation/reward normalization by a VecNormalize is not supported)
        :return: A batch with ``rewards`` the n-step discounted returns, ``discounts`` the factors
            (``gamma ** steps_used``) to apply to the bootstrapped target, ``next_observations``
            and ``dones`` taken at the last step used.
        """
        if env is not None:
            raise ValueError("DeviceNStepReplayBuffer does not support normalizing with a VecNormalize, pass env=None")
        rows = self.size()
        if rows == 0:
            raise ValueError("Cannot sample from an empty buffer, call add() first")
        # One draw over every stored (env, row) pair, as flat indices env * capacity + row
        drawn = th.randint(0, self.n_envs * rows, (batch_size,), device=self.device)
        env_inds, batch_inds = drawn // rows, drawn % rows
        return self._get_samples(batch_inds, env_inds=env_inds)

    @th.no_grad()
    def _get_samples(  # type: ignore[override]
        self, batch_inds: th.Tensor, env: VecNormalize | None = None, env_inds: th.Tensor | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        Gather the n-step transitions starting at rows ``batch_inds`` of envs ``env_inds``.

        All gathers index the storage flattened over (env, row): ``take`` / ``index_select`` with one
        flat index are several times faster than advanced indexing with two index tensors.

        :param batch_inds: Starting rows, int64 tensor of shape ``(batch_size,)`` on ``self.device``
        :param env: Unused (must be None)
        :param env_inds: Envs of the samples (drawn uniformly when None)
        :return: The samples
        """
        assert self.observations is not None and self.next_observations is not None
        assert self.actions is not None and self.rewards is not None
        assert self.dones is not None and self.timeouts is not None
        if env_inds is None:
            env_inds = th.randint(0, self.n_envs, batch_inds.shape, device=self.device)
        env_offsets = env_inds * self.buffer_size

        # Rows of the n-step windows, shape (batch, n_steps), and their flat indices
        steps = th.arange(self.n_steps, device=self.device)
        window = batch_inds[:, None] + steps[None, :]
        window = th.where(window >= self.buffer_size, window - self.buffer_size, window)  # wrap (cheaper than %)
        flat_window = env_offsets[:, None] + window
        rewards_seq = th.take(self.rewards, flat_window)
        dones_seq = th.take(self.dones, flat_window)
        timeouts_seq = th.take(self.timeouts, flat_window)

        # The newest row acts as a truncation: never read past the write pointer
        newest_row = (self.pos - 1) % self.buffer_size
        stop = dones_seq | timeouts_seq | (window == newest_row)
        # A step is used if no earlier step of the window stopped the accumulation
        stops_before = th.cumsum(stop.to(th.int64), dim=1) - stop.to(th.int64)
        used_mask = stops_before == 0
        n_used = used_mask.sum(dim=1, keepdim=True)  # (batch, 1), in [1, n_steps]
        last_step = n_used - 1

        reward_discounts = self.gamma ** steps.to(th.float32)
        n_step_returns = th.where(used_mask, rewards_seq * reward_discounts, 0.0).sum(dim=1, keepdim=True)
        target_discounts = th.pow(th.tensor(self.gamma, dtype=th.float32, device=self.device), n_used.to(th.float32))

        # Termination (done and not truncated) at the last step used: no bootstrapping.
        # Note: the temporary truncation of the newest row never changes this value
        # (if that row is done, its stored timeout is used; if it is not done, the result is False anyway).
        last_done = dones_seq.gather(1, last_step)
        last_timeout = timeouts_seq.gather(1, last_step)
        final_dones = (last_done & ~last_timeout).to(th.float32)

        first_rows = env_offsets + batch_inds
        last_rows = flat_window.gather(1, last_step).squeeze(1)
        actions = _gather_rows(self.actions, first_rows)
        if isinstance(self.observations, dict):
            assert isinstance(self.next_observations, dict)
            observations = {key: _gather_rows(obs, first_rows) for key, obs in self.observations.items()}
            next_observations = {key: _gather_rows(obs, last_rows) for key, obs in self.next_observations.items()}
            return DictReplayBufferSamples(
                observations=observations,
                actions=actions,
                next_observations=next_observations,
                dones=final_dones,
                rewards=n_step_returns,
                discounts=target_discounts,
            )
        assert isinstance(self.observations, th.Tensor) and isinstance(self.next_observations, th.Tensor)
        return ReplayBufferSamples(
            observations=_gather_rows(self.observations, first_rows),
            actions=actions,
            next_observations=_gather_rows(self.next_observations, last_rows),
            dones=final_dones,
            rewards=n_step_returns,
            discounts=target_discounts,
        )

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
            if isinstance(value, dict):
                setattr(self, name, {key: tensor.to(device) for key, tensor in value.items()})
            elif value is not None:
                setattr(self, name, value.to(device))

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the storage as CPU tensors, so that a buffer saved on a GPU can be unpickled
        # on a machine without one (no copy is made for storage already on the CPU).
        state = self.__dict__.copy()
        for name in self._STORAGE_NAMES:
            value = state[name]
            if isinstance(value, dict):
                state[name] = {key: tensor.cpu() for key, tensor in value.items()}
            elif value is not None:
                state[name] = value.cpu()
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        # Falls back to the CPU if the saved device is a GPU that is not available
        self.device = get_device(state["device"])
        self._move_storage(self.device)
