"""EnvPool's C++ batched simulators (MuJoCo, DM Control, MuJoCo Playground ports) as a :class:`TorchVecEnv`."""

import warnings
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from sb3_fasttd3.common.utils import is_integer
from sb3_fasttd3.vec_env.base import TorchObs, TorchStep, TorchVecEnv

NumpyObs = np.ndarray | dict[str, np.ndarray]
# What one synchronous step gives: observation, reward, done (the episode ended either way) and truncated (envpool's
# flags), elapsed steps
RawStep = tuple[NumpyObs, np.ndarray, np.ndarray, np.ndarray, np.ndarray]


def _import_envpool() -> Any:
    try:
        import envpool
    except ImportError as error:
        raise ImportError("EnvpoolVecEnv needs envpool: pip install 'sb3_fasttd3[envpool]' (envpool==1.2.5)") from error
    return envpool


def _box(shape: tuple[int, ...]) -> spaces.Box:
    return spaces.Box(-np.inf, np.inf, shape, np.float32)


def _float32_rows(array: np.ndarray) -> np.ndarray:
    """One env's observation per row, as float32: a scalar feature (one value per env) becomes a column."""
    array = array.astype(np.float32, copy=False)
    return array[:, None] if array.ndim == 1 else array


def _observation_space(space: spaces.Space, flatten: bool) -> spaces.Space:
    """float32 version of envpool's observation space (a ``Dict`` flattened to one ``Box`` if ``flatten``)."""
    if isinstance(space, spaces.Box):
        return _box(space.shape)
    if not isinstance(space, spaces.Dict) or not all(isinstance(s, spaces.Box) for s in space.spaces.values()):
        raise TypeError(f"EnvpoolVecEnv supports Box or Dict-of-Box observation spaces, got {space}")
    if flatten:
        return _box((sum(int(np.prod(s.shape or ())) for s in space.spaces.values()),))
    # A scalar feature (DM Control's height, ...) as a vector of one, as policies and replay buffers take it
    return spaces.Dict({key: _box(s.shape or (1,)) for key, s in space.spaces.items()})


class _DirectStep:
    """
    One synchronous envpool step through its C++ binding (``_send`` / ``_recv``), skipping the Python layer of
    ``pool.step`` that rebuilds the action list and the observation and info trees at every call (as long as a
    one-env MuJoCo step itself). It returns what ``pool.step`` returns, with envpool's own
    ``done`` in place of ``terminated`` (``done & ~truncated``) and ``elapsed_step`` in place of ``info``.

    It relies on envpool 1.2.5's layout: the action list in ``_spec._action_keys`` order, the state list in
    ``_state_keys`` order. :meth:`of` gives None for a pool laid out otherwise (the public ``pool.step`` is used).

    :param pool: a synchronous envpool gymnasium pool
    :param dict_keys: the ``Dict`` observation's keys (None for a ``Box``)
    """

    def __init__(self, pool: Any, dict_keys: list[str] | None):
        action_keys, state_keys = list(pool._spec._action_keys), list(pool._state_keys)
        if dict_keys is None:
            obs_keys = [key for key in state_keys if key == "obs" or key.startswith("obs:")]
        else:
            obs_keys = [f"obs:{key}" for key in dict_keys]
        single_player = pool.config.get("max_num_players", 1) == 1
        known_actions = set(action_keys) == {"env_id", "players.env_id", "action"}
        needed = {"reward", "done", "trunc", "elapsed_step", *obs_keys}
        if not (single_player and known_actions) or len(obs_keys) != len(dict_keys or [None]) or not needed <= set(state_keys):
            raise ValueError(f"unknown envpool layout: actions {action_keys}, state {state_keys}")
        self.pool, self.dict_keys = pool, dict_keys
        self._action_slot = action_keys.index("action")
        self._action_dtype = pool._spec._action_spec[self._action_slot][0]
        self._arguments = [pool.all_env_ids] * len(action_keys)  # env_id and players.env_id: every env, in order
        self._obs = [state_keys.index(key) for key in obs_keys]
        self._reward, self._done, self._trunc, self._elapsed = (
            state_keys.index(key) for key in ("reward", "done", "trunc", "elapsed_step")
        )

    @classmethod
    def of(cls, pool: Any, dict_keys: list[str] | None) -> "_DirectStep | None":
        """The direct step of ``pool``, or None if its layout is not the one this class knows."""
        try:
            return cls(pool, dict_keys)
        except (AttributeError, KeyError, ValueError):
            return None

    def __call__(self, actions: np.ndarray) -> RawStep:
        arguments = self._arguments.copy()
        arguments[self._action_slot] = actions.astype(self._action_dtype)
        self.pool._send(arguments)
        state = self.pool._recv()
        if self.dict_keys is None:
            obs = state[self._obs[0]]
        else:
            obs = {key: state[index] for key, index in zip(self.dict_keys, self._obs, strict=True)}
        return obs, state[self._reward], state[self._done], state[self._trunc], state[self._elapsed]


class EnvpoolVecEnv(TorchVecEnv):
    """
    An envpool (1.2.5, gymnasium API, synchronous mode) pool of environments with torch tensors on ``device``.

    envpool resets a finished env on its NEXT step (that step ignores the action, returns reward 0 and the
    first observation). Here, right after a step where some envs finished, those envs alone are reset with
    ``reset(env_id)``: the step reports the true final observation as ``final_obs`` and the reset observation
    as ``obs``, the other envs are untouched, and envpool's next step is a real transition for every env.

    The time limit is applied here, not by envpool: when an episode terminates on its last allowed step,
    envpool reports it as truncated; here termination wins (the pool is made with ``max_episode_steps + 1``).
    For a pool made by the caller, envpool's own limit and flags are used as they are.

    Steps go straight to envpool's C++ binding, without the Python layer of ``pool.step`` (see :class:`_DirectStep`).

    Observations are float32. DM Control tasks return a dict of features of one state (``position``,
    ``velocity``, ...): by default they are concatenated into one ``Box`` (the keys' order in envpool's space),
    the vector MLP policies and dm_control's ``flatten_observation`` use. The MuJoCo Playground ports return
    ``state`` / ``privileged_state``: kept as a ``Dict`` for the asymmetric actor-critic.

    envpool seeds at creation (env ``i`` gets ``seed + i``): a seed given with :meth:`seed` re-makes the pool at
    the next :meth:`reset`, so the same seed gives the same trajectories. A pool made by the caller cannot be
    re-seeded (a warning is issued).

    :param env: an envpool task id (``envpool.list_all_envs()``: ``HalfCheetah-v4``/``-v5``, ``CheetahRun-v1``,
        ``Go1JoystickFlatTerrain-v1``, ...) or a pool made with ``envpool.make(..., env_type="gymnasium")``
    :param num_envs: number of environments (task id only)
    :param seed: seed of the pool (task id only)
    :param device: the device of every tensor
    :param max_episode_steps: time limit (task id only; None: the task's default)
    :param flatten_obs: concatenate a ``Dict`` observation into one ``Box``
        (None: flatten unless it has a ``state`` key, as the Playground ports do)
    :param make_kwargs: further keyword arguments of ``envpool.make`` (task id only), e.g. ``num_threads``
    """

    def __init__(
        self,
        env: str | Any,
        num_envs: int = 1,
        seed: int = 0,
        device: th.device | str = "cpu",
        max_episode_steps: int | None = None,
        flatten_obs: bool | None = None,
        **make_kwargs: Any,
    ):
        self.task_id = env if isinstance(env, str) else None
        self._make_kwargs = dict(num_envs=num_envs, **make_kwargs)
        if self.task_id is None:
            if max_episode_steps is not None or make_kwargs:
                raise ValueError("max_episode_steps and envpool.make arguments need a task id, not a pool")
            self.max_episode_steps = int(env.config["max_episode_steps"])  # type: ignore[union-attr]
        else:
            if max_episode_steps is not None and not (is_integer(max_episode_steps) and max_episode_steps >= 1):
                raise ValueError(f"max_episode_steps must be an integer >= 1 or None, got {max_episode_steps!r}")
            default_max_episode_steps = self._default_max_episode_steps()
            self.max_episode_steps = default_max_episode_steps if max_episode_steps is None else int(max_episode_steps)
            env = self._make(seed)
        assert not isinstance(env, str)
        self._check_pool(env)
        space = env.observation_space
        self._keys = list(space.spaces) if isinstance(space, spaces.Dict) else None
        self._use_pool(env)
        self.flatten_obs = self._keys is not None and (flatten_obs if flatten_obs is not None else "state" not in self._keys)
        low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
        action_space = spaces.Box(low, high, env.action_space.shape, np.float32)
        super().__init__(env.num_envs, _observation_space(space, self.flatten_obs), action_space, device)
        self._time_limit = np.int32(self.max_episode_steps)  # compared with envpool's int32 elapsed_step
        if self.device.type == "cpu":  # a step makes five tensors: at one env, even a wrapper call is a visible cost
            self._tensor = th.from_numpy  # type: ignore[method-assign, assignment]

    def _default_max_episode_steps(self) -> int:
        """The task's time limit; checks that envpool knows the task."""
        envpool = _import_envpool()
        if self.task_id not in envpool.list_all_envs():
            raise ValueError(f"env={self.task_id!r}: unknown envpool task id, see envpool.list_all_envs()")
        return int(envpool.make_spec(self.task_id).config.max_episode_steps)

    def _make(self, seed: int) -> Any:
        """A new pool seeded with ``seed``; its own time limit is one step past ours (see the class docstring)."""
        kwargs = dict(self._make_kwargs, seed=seed, max_episode_steps=self.max_episode_steps + 1)
        return _import_envpool().make(self.task_id, env_type="gymnasium", **kwargs)

    @staticmethod
    def _check_pool(pool: Any) -> None:
        if not hasattr(pool, "num_envs") or not hasattr(pool, "config"):
            raise TypeError(f"env must be an envpool task id or an envpool gymnasium pool, got {type(pool).__name__}")
        if pool.is_async:
            raise ValueError("env: asynchronous envpool pools (batch_size < num_envs) are not supported")
        if not isinstance(pool.action_space, spaces.Box):
            raise TypeError(f"EnvpoolVecEnv needs a Box action space, got {pool.action_space}")

    def _use_pool(self, pool: Any) -> None:
        """Step ``pool`` from now on, through its C++ binding where its layout allows it (see :class:`_DirectStep`)."""
        self.pool = pool
        direct = _DirectStep.of(pool, self._keys)
        self._raw_step = direct if direct is not None else self._public_step

    def _public_step(self, actions: np.ndarray) -> RawStep:
        obs, reward, terminated, truncated, info = self.pool.step(actions)
        return obs, reward, terminated | truncated, truncated, info["elapsed_step"]

    def _to_numpy(self, obs: NumpyObs) -> NumpyObs:
        """envpool's observation (float64) as float32 arrays, flattened if asked."""
        if not isinstance(obs, dict):
            return obs.astype(np.float32, copy=False)
        assert self._keys is not None
        if self.flatten_obs:
            return np.concatenate([obs[key].reshape(len(obs[key]), -1) for key in self._keys], axis=1, dtype=np.float32)
        return {key: _float32_rows(obs[key]) for key in self._keys}

    def _tensor(self, array: np.ndarray) -> th.Tensor:
        """``array`` as a tensor on the device (on the CPU, ``th.from_numpy`` itself takes this method's place)."""
        return th.from_numpy(array).to(self.device)

    def _to_torch(self, obs: NumpyObs) -> TorchObs:
        if isinstance(obs, dict):
            return {key: self._tensor(value) for key, value in obs.items()}
        return self._tensor(obs)

    def _reset_envs(self, final_obs: NumpyObs, env_ids: np.ndarray) -> NumpyObs:
        """``final_obs`` with the rows of ``env_ids`` replaced by the first observation of their next episode."""
        reset_obs, info = self.pool.reset(env_ids.astype(np.int32))
        reset_obs, rows = self._to_numpy(reset_obs), info["env_id"]
        if isinstance(final_obs, dict):
            assert isinstance(reset_obs, dict)
            obs = {key: value.copy() for key, value in final_obs.items()}
            for key, value in obs.items():
                value[rows] = reset_obs[key]
            return obs
        rows_obs = final_obs.copy()
        rows_obs[rows] = reset_obs
        return rows_obs

    def _reset(self, seed: int | None) -> TorchObs:
        if seed is not None and self.task_id is None:
            warnings.warn("EnvpoolVecEnv: a pool made by the caller cannot be re-seeded; seed ignored", stacklevel=2)
        elif seed is not None:
            self.pool.close()
            self._use_pool(self._make(seed))
        obs, _ = self.pool.reset()
        return self._to_torch(self._to_numpy(obs))

    def _step(self, actions: th.Tensor) -> TorchStep:
        """One envpool step, then a reset of the envs that finished (``obs`` is ``final_obs`` if none did)."""
        obs, reward, done, truncated, elapsed = self._raw_step(actions.detach().cpu().numpy())
        terminated = done & ~truncated
        dones = done | (elapsed >= self._time_limit)  # our time limit (envpool's is one step later)
        truncated = dones & ~terminated  # termination wins on the last allowed step
        final_obs = self._to_numpy(obs)
        final_obs_t = self._to_torch(final_obs)
        return TorchStep(
            obs=self._to_torch(self._reset_envs(final_obs, np.flatnonzero(dones))) if np.count_nonzero(dones) else final_obs_t,
            reward=self._tensor(reward.astype(np.float32, copy=False)),
            terminated=self._tensor(terminated),
            truncated=self._tensor(truncated),
            final_obs=final_obs_t,
            dones=self._tensor(dones),
        )

    def close(self) -> None:
        self.pool.close()
