"""Gymnasium's vector envs (``gym.make_vec``, ``SyncVectorEnv``, ``AsyncVectorEnv``) as SB3 VecEnvs."""

from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium.vector import AutoresetMode, VectorEnv, VectorWrapper
from gymnasium.wrappers.vector import NormalizeReward, RecordEpisodeStatistics
from stable_baselines3.common.env_util import is_wrapped
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvObs, VecEnvStepReturn

ACCEPTED_MODES = (AutoresetMode.SAME_STEP, AutoresetMode.DISABLED)
# Vector wrappers that reset every env's statistics on a partial reset: the vector env below them pops
# options["reset_mask"] from the dict they pass on, so they no longer see the mask
PARTIAL_RESET_UNSAFE = (RecordEpisodeStatistics, NormalizeReward)


def unbatch_infos(infos: dict[str, Any], num_envs: int) -> list[dict[str, Any]]:
    """
    Gymnasium's batched infos (a value per env under each key, and a mask ``_key`` of the envs that have it) as
    SB3's list of one dict per env.

    :param infos: the infos of a vector env's ``step`` or ``reset``
    :param num_envs: the number of envs
    """
    per_env: list[dict[str, Any]] = [{} for _ in range(num_envs)]
    for key, value in infos.items():
        if key.startswith("_") and key[1:] in infos:
            continue  # the mask of another key
        mask = infos.get(f"_{key}", np.ones(num_envs, dtype=bool))
        values = unbatch_infos(value, num_envs) if isinstance(value, dict) else value
        for index in np.flatnonzero(mask):
            per_env[index][key] = values[index]
    return per_env


def _copy(obs: Any) -> Any:
    """A copy of a batch of observations (a dict of batches for a ``Dict`` space)."""
    return {key: value.copy() for key, value in obs.items()} if isinstance(obs, dict) else obs.copy()


def _check_partial_resets(env: VectorEnv) -> None:
    """Refuse the wrappers that :data:`PARTIAL_RESET_UNSAFE` lists, which DISABLED mode's partial resets break."""
    unsafe, inner = [], env
    while isinstance(inner, VectorWrapper):
        if isinstance(inner, PARTIAL_RESET_UNSAFE):
            unsafe.append(type(inner).__name__)
        inner = inner.env
    if unsafe:
        raise ValueError(
            f"env has gymnasium's {', '.join(unsafe)} around a vector env with autoreset_mode=DISABLED: finished envs "
            "are reset here with options['reset_mask'], and these wrappers then reset every env's returns and lengths. "
            "Make the env with autoreset_mode=AutoresetMode.SAME_STEP, or leave the wrapper out (SB3's VecMonitor, "
            "which FastTD3 adds, records the episodes)"
        )


def _rows(obs: Any, index: int) -> Any:
    """Env ``index``'s observation in a batch (a dict of batches for a ``Dict`` space)."""
    return {key: value[index] for key, value in obs.items()} if isinstance(obs, dict) else obs[index]


class GymnasiumVecEnv(VecEnv):
    """
    A gymnasium ``VectorEnv`` behind SB3's ``VecEnv`` interface: one info dict per env, and a finished env's reset
    observation returned by the step that finished it, with ``"terminal_observation"`` and ``"TimeLimit.truncated"``
    in its info, as SB3's VecEnvs do. FastTD3 wraps a ``VectorEnv`` it is given in one; other SB3 algorithms take it
    too.

    The vector env must reset finished envs in the same step (``AutoresetMode.SAME_STEP``: the final observation is
    read from its infos) or not at all (``AutoresetMode.DISABLED``: finished envs are reset here, with its
    ``reset_mask`` option). Gymnasium's default, ``NEXT_STEP``, resets one step late and ignores that step's action,
    a step that is not a transition and that SB3's VecEnv cannot express: it is refused, saying how to make the env.
    Gymnasium's vector wrappers around it are kept; attribute and method calls reach the envs below them.

    :param env: the gymnasium vector env
    """

    def __init__(self, env: VectorEnv):
        if not isinstance(env, VectorEnv):
            raise TypeError(f"GymnasiumVecEnv wraps a gymnasium VectorEnv, got {type(env).__name__} for parameter env")
        mode = env.metadata.get("autoreset_mode", AutoresetMode.NEXT_STEP)
        if mode not in ACCEPTED_MODES:
            raise ValueError(
                f"env resets finished envs with autoreset_mode={mode}, one step late, which SB3's VecEnvs cannot express: "
                f"make it with autoreset_mode in {[str(accepted) for accepted in ACCEPTED_MODES]}, e.g. "
                "gym.make_vec(env_id, num_envs, vector_kwargs=dict(autoreset_mode=gym.vector.AutoresetMode.SAME_STEP)), "
                "or use stable_baselines3.common.env_util.make_vec_env"
            )
        if mode == AutoresetMode.DISABLED:
            _check_partial_resets(env)
        # Any: a list of seeds, get_attr, set_attr, call and envs belong to SyncVectorEnv and AsyncVectorEnv, not to
        # VectorEnv; the vector env below gymnasium's wrappers answers the attribute and method calls
        self.env: Any = env
        self.vector_env: Any = env.unwrapped
        # Arrays the env overwrites at its next step or reset (copy=False): SB3 keeps the observations it gets
        self._copies = not getattr(self.vector_env, "copy", True)
        self.autoreset_mode = mode
        self.render_mode = env.render_mode
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)
        self._actions: np.ndarray | None = None

    def reset(self) -> VecEnvObs:
        options = self._options[0] if self._options else {}
        if any(options != other for other in self._options):
            raise ValueError("a gymnasium vector env resets with one options dict for all envs: give every env the same")
        obs, infos = self.env.reset(seed=list(self._seeds), options=options or None)
        self.reset_infos = unbatch_infos(infos, self.num_envs)
        self._reset_seeds()
        self._reset_options()
        return _copy(obs) if self._copies else obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = actions

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, terminated, truncated, batched_infos = self.env.step(self._actions)
        if self._copies:
            obs = _copy(obs)
        dones = np.logical_or(terminated, truncated)
        infos = unbatch_infos(batched_infos, self.num_envs)
        finished = np.flatnonzero(dones)
        if len(finished) > 0:
            if self.autoreset_mode == AutoresetMode.SAME_STEP:
                final_obs = batched_infos["final_obs"]
                final_infos = unbatch_infos(batched_infos["final_info"], self.num_envs)
                for index in finished:
                    # The step's own info is its final_info; the rest is what the reset that followed it returned
                    info = {key: value for key, value in infos[index].items() if key not in ("final_obs", "final_info")}
                    self.reset_infos[index] = info
                    infos[index] = {**final_infos[index], "terminal_observation": final_obs[index]}
            else:
                final_obs = obs
                obs, reset_infos = self.env.reset(options={"reset_mask": dones})
                obs = _copy(obs) if self._copies else obs
                reset_per_env = unbatch_infos(reset_infos, self.num_envs)
                for index in finished:
                    infos[index]["terminal_observation"] = _rows(final_obs, int(index))
                    self.reset_infos[index] = reset_per_env[index]
            for index in finished:
                infos[index]["TimeLimit.truncated"] = bool(truncated[index] and not terminated[index])
        return obs, rewards.astype(np.float32), dones, infos

    def close(self) -> None:
        self.env.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        frames = self.env.render()  # one frame per env, in rgb_array mode
        return list(frames) if frames is not None else [None for _ in range(self.num_envs)]

    def _select(self, values: Sequence[Any], indices: VecEnvIndices) -> list[Any]:
        return [values[index] for index in self._get_indices(indices)]

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        return self._select(self.vector_env.get_attr(attr_name), indices)

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        values = list(self.vector_env.get_attr(attr_name))
        for index in self._get_indices(indices):
            values[index] = value
        self.vector_env.set_attr(attr_name, values)

    def env_method(self, method_name: str, *method_args, indices: VecEnvIndices = None, **method_kwargs) -> list[Any]:
        """Call a method of the envs ``indices``; an ``AsyncVectorEnv`` calls it in every env (one call to its workers)."""
        envs = getattr(self.vector_env, "envs", None)  # a SyncVectorEnv's; an AsyncVectorEnv's live in its workers
        if envs is None:
            return self._select(self.vector_env.call(method_name, *method_args, **method_kwargs), indices)
        # As the vector env's call(): an attribute that is not callable is returned as it is
        values = [envs[index].get_wrapper_attr(method_name) for index in self._get_indices(indices)]
        return [value(*method_args, **method_kwargs) if callable(value) else value for value in values]

    def env_is_wrapped(self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None) -> list[bool]:
        envs = getattr(self.vector_env, "envs", None)
        if envs is None:
            return [False for _ in self._get_indices(indices)]
        return [is_wrapped(envs[index], wrapper_class) for index in self._get_indices(indices)]
