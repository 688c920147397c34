"""How FastTD3 steps its environments and stores transitions: from NumPy VecEnvs, and from TorchVecEnvs on device."""

import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch as th
from gymnasium import spaces
from numpy.lib.mixins import NDArrayOperatorsMixin
from stable_baselines3.common.buffers import ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.noise import ActionNoise
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.type_aliases import RolloutReturn, TrainFreq, TrainFrequencyUnit
from stable_baselines3.common.utils import obs_as_tensor, should_collect_more_steps
from stable_baselines3.common.vec_env import VecEnv

from sb3_fasttd3.common import sb3_buffers
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.distributed import DataParallel
from sb3_fasttd3.common.noise import MixedGaussianNoise
from sb3_fasttd3.fasttd3.checks import check_final_observations, check_finite, check_finite_actions, check_finite_on_device
from sb3_fasttd3.vec_env.base import TorchObs, TorchVecEnv

if TYPE_CHECKING:
    from sb3_fasttd3.fasttd3.policies import FastTD3Policy

# With a TorchVecEnv, finished episodes are read from the device once every this many vector steps
# (episode statistics reach the logs at most this late)
DEVICE_SYNC_STEPS = 100


class HostView(NDArrayOperatorsMixin):
    """
    A device tensor as SB3's callbacks read the ``locals`` of a rollout step: NumPy's functions, operators and an
    ndarray's methods see it as an array (``np.sum(self.locals["dones"])``, ``dones == 1``, ``rewards < 0``),
    copied to the host only when read, so that the on-device loop pays no host sync for callbacks that do not read
    it. ``tensor`` is the device tensor.

    :param tensor: the tensor to show
    """

    __slots__ = ("tensor",)

    def __init__(self, tensor: th.Tensor):
        self.tensor = tensor

    def __array_ufunc__(self, ufunc: np.ufunc, method: str, *inputs: Any, **kwargs: Any) -> Any:
        arrays = [np.asarray(value) if isinstance(value, HostView) else value for value in inputs]
        return getattr(ufunc, method)(*arrays, **kwargs)

    def __bool__(self) -> bool:
        return bool(np.asarray(self))  # as an array's: ambiguous beyond one element

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        array = self.tensor.detach().cpu().numpy()
        return array if dtype is None else array.astype(dtype, copy=False)

    def __getattr__(self, name: str) -> Any:
        # NumPy's protocols (``__array_interface__``...) are looked up while making the array, and ``tensor`` is
        # missing only while the object is copied: neither is the array's
        if name == "tensor" or name.startswith("__"):
            raise AttributeError(name)
        return getattr(np.asarray(self), name)

    def __len__(self) -> int:
        return len(self.tensor)

    def __getitem__(self, index: Any) -> Any:
        return np.asarray(self)[index]

    def __iter__(self) -> Any:
        return iter(np.asarray(self))

    def __repr__(self) -> str:
        return f"HostView({self.tensor!r})"


class EnvStepError(RuntimeError):
    """An environment failed during ``step``; the original exception is its ``__cause__``."""


def _failed_env_index(env: VecEnv, error: BaseException) -> int | None:
    """
    Which env failed, where the VecEnv lets us tell: a dead worker of a ``SubprocVecEnv``, or the env that
    ``DummyVecEnv.step_wait`` was stepping when it raised. None otherwise (a batched simulator fails as a whole).
    """
    processes = getattr(getattr(env, "unwrapped", env), "processes", None)
    if processes is not None:
        for _ in range(20):  # a dead worker's pipe may close a moment before its process is reaped
            dead = [index for index, process in enumerate(processes) if not process.is_alive()]
            if dead:
                return dead[0]
            time.sleep(0.05)
        return None
    traceback = error.__traceback__
    while traceback is not None:
        frame = traceback.tb_frame
        if frame.f_code.co_name == "step_wait" and isinstance(frame.f_locals.get("env_idx"), int):
            return frame.f_locals["env_idx"]
        traceback = traceback.tb_next
    return None


class RolloutCollection(OffPolicyAlgorithm):
    """
    FastTD3's ``collect_rollouts``: the noisy actor (before ``learning_starts``: uniform actions, or the actor too),
    true final observations stored for finished episodes, callbacks once per vector step.
    A :class:`~sb3_fasttd3.vec_env.TorchVecEnv` keeps the whole loop on the device.
    """

    # The state the loop uses, set up by the algorithm (FastTD3's _setup_model, _setup_fast_path and _setup_learn)
    policy: "FastTD3Policy"
    replay_buffer: DeviceNStepReplayBuffer  # type: ignore[assignment]
    action_space: spaces.Box
    exploration_noise: MixedGaussianNoise | None  # the mixed noise, None when SB3's action_noise replaces it
    std_min: float
    std_max: float
    noise_correlation: float | None
    stratified_noise: bool
    warmup_actions: str  # how to act before learning_starts: "uniform" or "actor"
    n_step_start: int  # transitions stored before num_timesteps reaches it keep one-step returns
    n_step_max_noise: float | None  # transitions acted with a larger noise scale keep one-step returns
    _acted_uniformly: bool  # whether the last actions were the uniform warm-up's
    _last_obs_tensor: TorchObs | None  # the last observation on the model's device (None: convert _last_obs)
    _act_fn: Callable[[TorchObs], th.Tensor]  # the noisy actor (compiled or not)
    _autocast: Callable[[], AbstractContextManager]  # the autocast context of the updates and of acting
    _data_parallel: DataParallel | None  # the other ranks of data-parallel training (None: a single process)
    _transitions_per_step: int  # transitions one vector step adds over all ranks
    _env_action_low: th.Tensor  # the action space's bounds on the env's device (TorchVecEnv only)
    _env_action_half_range: th.Tensor

    def _make_exploration_noise(self, n_envs: int | None = None) -> MixedGaussianNoise:
        """
        The mixed exploration noise: one scale per env, white or correlated in time.

        :param n_envs: number of envs (``None``: this model's)
        """
        n_envs = self.n_envs if n_envs is None else n_envs
        action_dim = spaces.flatdim(self.action_space)
        return MixedGaussianNoise(
            n_envs, self.std_min, self.std_max, self.device, self.noise_correlation, action_dim, self.stratified_noise
        )

    def _setup_device_rollouts(self) -> None:
        """Checks and constants for the on-device loop (called by ``_setup_learn``)."""
        env = self.env
        if not isinstance(env, TorchVecEnv):
            return
        if not isinstance(self.replay_buffer, DeviceNStepReplayBuffer):
            raise ValueError(
                f"replay_buffer_class={type(self.replay_buffer).__name__} keeps NumPy arrays on the host, and a "
                "TorchVecEnv keeps its transitions on its device: use the default DeviceNStepReplayBuffer"
            )
        train_freq = self.train_freq
        assert isinstance(train_freq, TrainFreq)  # converted by _setup_model
        if train_freq.unit == TrainFrequencyUnit.EPISODE:
            raise ValueError(
                f"train_freq={tuple(train_freq)} counts episodes, which with a TorchVecEnv would need a host "
                "sync every step: use a number of steps, e.g. train_freq=1"
            )
        low = th.as_tensor(self.action_space.low, device=env.device, dtype=th.float32).flatten()
        high = th.as_tensor(self.action_space.high, device=env.device, dtype=th.float32).flatten()
        self._env_action_low, self._env_action_half_range = low, (high - low) / 2.0

    def collect_rollouts(  # type: ignore[override]
        self,
        env: VecEnv,
        callback: BaseCallback,
        train_freq: TrainFreq,
        replay_buffer: ReplayBuffer,
        action_noise: ActionNoise | None = None,
        learning_starts: int = 0,
        log_interval: int | None = None,
    ) -> RolloutReturn:
        """
        Step the envs with the noisy actor (before ``learning_starts``, as ``warmup_actions`` says) and store
        the transitions, with the true final observation of every finished episode.
        Observations cross to torch once per vector step; callbacks are called once per vector step.
        """
        assert self.exploration_noise is not None or self.action_noise is not None, "call learn() first"
        self.policy.set_training_mode(False)
        if isinstance(env, TorchVecEnv):
            return self._collect_on_device(env, callback, train_freq, learning_starts, log_interval)
        num_collected_steps, num_collected_episodes = 0, 0
        callback.on_rollout_start()
        while should_collect_more_steps(train_freq, num_collected_steps, num_collected_episodes):
            obs_tensor = self._last_obs_tensor
            if obs_tensor is None:
                obs_tensor = obs_as_tensor(self._last_obs, self.device)  # type: ignore[arg-type]
            buffer_actions = self._exploration_actions(obs_tensor, learning_starts)
            host_actions = buffer_actions.cpu().numpy()
            check_finite_actions(host_actions, self.num_timesteps + self._transitions_per_step)
            actions = self.policy.unscale_action(host_actions.reshape(-1, *self.action_space.shape))

            new_obs, rewards, dones, infos = self._step_env(env, actions)
            self.num_timesteps += self._transitions_per_step
            num_collected_steps += 1

            # The step is stored before the callback runs, so that a callback stopping training never leaves
            # the newest transition out of the buffer (its n-step windows would then cross into the next episode)
            self._update_info_buffer(infos, dones)
            new_obs_tensor = self._store_step(obs_tensor, buffer_actions, new_obs, rewards, dones, infos)
            self._last_obs, self._last_obs_tensor = new_obs, new_obs_tensor
            self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
            self._on_step()

            done_indices = np.flatnonzero(dones)
            # At every step, as the device loop does: one seed draws the same noise on both loops
            self._reset_noise(done_indices, th.as_tensor(dones, device=self.device))
            if len(done_indices) > 0:
                num_collected_episodes += len(done_indices)
                self._count_episodes(len(done_indices), log_interval)

            callback.update_locals(locals())
            if not self._all_continue(callback.on_step()):
                return RolloutReturn(num_collected_steps * env.num_envs, num_collected_episodes, continue_training=False)
        callback.on_rollout_end()
        return RolloutReturn(num_collected_steps * env.num_envs, num_collected_episodes, True)

    def _step_env(self, env: VecEnv, actions: Any) -> Any:
        """
        ``env.step(actions)``; an exception from the envs is raised again as an :class:`EnvStepError` naming the
        env (where known) and the timestep, before anything of the step is stored or counted.
        """
        try:
            return env.step(actions)
        except Exception as error:
            # Envs stepped before the failing one are ahead of the last observation: learn() and checkpoints reset them
            self._last_obs, self._last_obs_tensor = None, None  # type: ignore[assignment]
            env_idx = _failed_env_index(env, error)
            which = "An environment" if env_idx is None else f"Env {env_idx}"
            timestep = self.num_timesteps + self._transitions_per_step
            raise EnvStepError(
                f"{which} failed at timestep {timestep} ({type(error).__name__}: {error}). "
                "Nothing of this step was stored: the model and its replay buffer are intact and can be saved. "
                "To go on, replace the envs with model.set_env(new_env) and call learn() again."
            ) from error

    def _all_continue(self, continue_training: bool) -> bool:
        """Whether training goes on: in data-parallel training, unless a callback stopped it on any rank."""
        if self._data_parallel is None:
            return continue_training
        return self._data_parallel.all_true(continue_training)

    def _reset_noise(self, done_indices: np.ndarray, dones: th.Tensor) -> None:
        """
        New exploration noise for the envs whose episode ended: SB3's ``action_noise`` is reset per env index
        (as SB3's off-policy algorithms do), the mixed noise draws new scales from the done mask on the device.
        """
        if self.action_noise is not None:
            if len(done_indices) == 0:
                return
            kwargs = dict(indices=done_indices.tolist()) if self.n_envs > 1 else {}
            self.action_noise.reset(**kwargs)
        elif self.exploration_noise is not None:
            self.exploration_noise.reset(dones)

    def _collect_on_device(
        self, env: TorchVecEnv, callback: BaseCallback, train_freq: TrainFreq, learning_starts: int, log_interval: int | None
    ) -> RolloutReturn:
        """
        The same loop for a TorchVecEnv, without NumPy or per-env Python. One scalar is read from the device
        per vector step: the finite check, so that nothing non-finite is ever stored. Episode statistics are
        read every :data:`DEVICE_SYNC_STEPS` vector steps.
        """
        num_collected_steps = 0
        callback.on_rollout_start()
        while should_collect_more_steps(train_freq, num_collected_steps, 0):
            obs: TorchObs = self._last_obs  # type: ignore[assignment]
            buffer_actions = self._exploration_actions(self._to_model_device(obs), learning_starts)
            actions = self._env_action_low + (buffer_actions.to(env.device) + 1.0) * self._env_action_half_range
            actions = actions.reshape(-1, *self.action_space.shape)

            new_obs, rewards, dones, infos = self._step_env(env, actions)
            self.num_timesteps += self._transitions_per_step
            num_collected_steps += 1

            final_obs = infos["final_observation"]
            check_finite_on_device(actions, new_obs, rewards, final_obs, self.num_timesteps)
            self._set_return_length()
            self.replay_buffer.add(obs, final_obs, buffer_actions, rewards, dones, [], truncated=infos["truncated"])  # type: ignore[arg-type]
            if self.action_noise is not None:
                # SB3's action noise lives on the host: reading which envs are done costs a sync per step
                self._reset_noise(th.nonzero(dones).flatten().cpu().numpy(), dones)
            else:
                self._reset_noise(np.empty(0, dtype=np.int64), dones.to(self.device))
            self._last_obs = new_obs  # type: ignore[assignment]
            self._update_current_progress_remaining(self.num_timesteps, self._total_timesteps)
            self._on_step()
            if (self.num_timesteps // self._transitions_per_step) % DEVICE_SYNC_STEPS == 0:
                self._read_device_episodes(log_interval)

            # SB3's callbacks read the step's dones and rewards with NumPy; infos stay the env's batched dict
            callback.update_locals({**locals(), "dones": HostView(dones), "rewards": HostView(rewards)})
            if not self._all_continue(callback.on_step()):
                return RolloutReturn(num_collected_steps * env.num_envs, 0, continue_training=False)
        callback.on_rollout_end()
        return RolloutReturn(num_collected_steps * env.num_envs, 0, True)

    def _read_device_episodes(self, log_interval: int | None = None) -> None:
        """Read the episodes that finished on the device (one host sync) and log them."""
        env = self.env
        if not isinstance(env, TorchVecEnv):
            return
        episodes, finished = env.episode_tracker.drain()
        self.ep_info_buffer.extend(episodes)  # type: ignore[union-attr]
        self._count_episodes(finished, log_interval)

    def _count_episodes(self, finished: int, log_interval: int | None) -> None:
        """Count finished episodes; dump the logs (once at most) when a multiple of ``log_interval`` is crossed."""
        episodes_before = self._episode_num
        self._episode_num += finished
        if log_interval is not None and self._episode_num // log_interval > episodes_before // log_interval:
            self.dump_logs()

    def _to_model_device(self, obs: TorchObs) -> TorchObs:
        if isinstance(obs, dict):
            return {key: value.to(self.device) for key, value in obs.items()}
        return obs.to(self.device)

    def _exploration_actions(self, obs: TorchObs, learning_starts: int) -> th.Tensor:
        """
        Actions in [-1, 1] for every env: uniform during warm-up (unless ``warmup_actions="actor"``), the actor's
        otherwise, with the exploration noise: SB3's ``action_noise`` when given (added to uniform actions too, as SB3
        does), else the mixed noise.
        """
        data_parallel = self._data_parallel
        self.policy.update_normalizer(obs, None if data_parallel is None else data_parallel.merge_moments)
        action_noise = self.action_noise
        self._acted_uniformly = self.num_timesteps < learning_starts and self.warmup_actions == "uniform"
        if self._acted_uniformly:
            actions = th.rand(self.n_envs, spaces.flatdim(self.action_space), device=self.device) * 2.0 - 1.0
        elif action_noise is None:
            assert self.exploration_noise is not None
            self.exploration_noise.advance()  # outside the compiled actor: its state is mutated in place
            with th.no_grad(), self._autocast():
                return self._act_fn(obs).float()
        else:
            with th.no_grad(), self._autocast():
                actions = self.policy.live_actions(obs).float()
        if action_noise is None:
            return actions
        noise = th.as_tensor(action_noise(), device=self.device, dtype=th.float32)
        n_envs, action_dim = actions.shape
        shapes = ((action_dim,), tuple(self.action_space.shape))  # per env: flat, or the space's own shape
        if noise.shape in shapes:
            noise = noise.reshape(action_dim)
        elif noise.shape[:1] == (n_envs,) and noise.shape[1:] in shapes:
            noise = noise.reshape(n_envs, action_dim)
        else:
            shape = shapes[-1]
            size = shape[0] if len(shape) == 1 else shape
            raise ValueError(
                f"action_noise must return noise of the action shape {shape} (or, vectorized, {(n_envs, *shape)}), "
                f"got {tuple(noise.shape)}: build it from the action space, e.g. "
                f"NormalActionNoise(mean=np.zeros({size}), sigma=0.1 * np.ones({size}))"
            )
        return (actions + noise).clamp(-1.0, 1.0)

    def _noisy_actions(self, obs: TorchObs) -> th.Tensor:
        """The live actor's actions (its own weights, no copy) plus each env's exploration noise, clipped to [-1, 1]."""
        assert self.exploration_noise is not None
        return self.exploration_noise(self.policy.live_actions(obs))

    def _store_step(
        self,
        obs: TorchObs,
        buffer_actions: th.Tensor,
        new_obs: np.ndarray | dict[str, np.ndarray],
        rewards: np.ndarray,
        dones: np.ndarray,
        infos: list[dict[str, Any]],
    ) -> TorchObs:
        """
        Check the step is finite, then store it with true final observations; return the new obs as torch.
        Behind a ``VecNormalize``, the original (unnormalized) observations and rewards are stored, as in SB3.
        """
        final_obs = {int(i): infos[i].get("terminal_observation") for i in np.flatnonzero(dones)}
        check_final_observations(final_obs, self.num_timesteps)
        stored_obs, stored_new_obs = obs, new_obs
        vec_normalize = self._vec_normalize_env
        if vec_normalize is not None:
            rewards = vec_normalize.get_original_reward()
            final_obs = {i: vec_normalize.unnormalize_obs(o) for i, o in final_obs.items()}  # type: ignore[arg-type]
            if vec_normalize.norm_obs:
                stored_obs = obs_as_tensor(self._last_original_obs, self.device)  # type: ignore[arg-type]
                stored_new_obs = self._last_original_obs = vec_normalize.get_original_obs()
        check_finite(stored_new_obs, rewards, final_obs, self.num_timesteps)
        new_obs_tensor = obs_as_tensor(new_obs, self.device)  # type: ignore[arg-type]
        next_obs = new_obs_tensor if stored_new_obs is new_obs else obs_as_tensor(stored_new_obs, self.device)  # type: ignore[arg-type]
        next_obs = self._replace_rows(next_obs, final_obs)
        truncated = np.array([info.get("TimeLimit.truncated", False) for info in infos], dtype=bool)
        self._set_return_length()
        sb3_buffers.add_step(self.replay_buffer, stored_obs, next_obs, buffer_actions, rewards, dones, infos, truncated)
        return new_obs_tensor

    def _set_return_length(self) -> None:
        """
        Which transitions stored next keep one-step returns: all while ``num_timesteps`` (counting them) is below
        ``n_step_start``; with ``n_step_max_noise``, uniform warm-up actions and those of the envs whose noise scale
        is above it (a mask on the device, no host sync). SB3's buffers have no such switch (both options refuse them).
        """
        if not isinstance(self.replay_buffer, DeviceNStepReplayBuffer):
            return
        one_step: bool | th.Tensor = self.num_timesteps < self.n_step_start or (
            self.n_step_max_noise is not None and self._acted_uniformly
        )
        if not one_step and self.n_step_max_noise is not None:
            assert self.exploration_noise is not None  # action_noise is refused with n_step_max_noise
            one_step = self.exploration_noise.sigmas[:, 0] > self.n_step_max_noise
        self.replay_buffer.one_step_returns = one_step

    def _replace_rows(self, obs: TorchObs, rows: dict[int, Any]) -> TorchObs:
        """Copy of ``obs`` where env ``i``'s row is ``rows[i]`` (the true final observation of its episode)."""
        if not rows:
            return obs
        if isinstance(obs, dict):
            return {key: self._replace_rows(value, {i: row[key] for i, row in rows.items()}) for key, value in obs.items()}  # type: ignore[misc]
        obs = obs.clone()
        indices = list(rows)
        obs[indices] = th.as_tensor(np.stack([rows[i] for i in indices]), device=obs.device, dtype=obs.dtype)
        return obs
