"""Any TorchVecEnv seen as an ordinary NumPy VecEnv, for every SB3 algorithm and evaluation tool."""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.monitor import Monitor
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvObs, VecEnvStepReturn

from sb3_fasttd3.vec_env.base import TorchObs, TorchVecEnv


def to_numpy(obs: TorchObs) -> np.ndarray | dict[str, np.ndarray]:
    """Host copy of a tensor (or dict of tensors)."""
    if isinstance(obs, dict):
        return {key: value.detach().cpu().numpy() for key, value in obs.items()}
    return obs.detach().cpu().numpy()


class NumpyVecEnv(VecEnv):
    """
    A :class:`~sb3_fasttd3.vec_env.TorchVecEnv` behind SB3's NumPy ``VecEnv`` interface, so that SAC, TD3, PPO,
    ``evaluate_policy`` and ``EvalCallback`` run on it unchanged. Each step copies to the host (FastTD3 takes
    the TorchVecEnv itself and does not need this).

    Infos follow SB3: one dict per env, empty unless the env's episode ended, then with
    ``"terminal_observation"``, ``"TimeLimit.truncated"`` and ``"episode"`` (``{"r", "l"}``, as a Monitor writes).
    Because of that last key it answers ``env_is_wrapped(Monitor)`` with True: ``evaluate_policy`` reads
    the episode statistics from it as from a Monitor.

    :param venv: the torch vector env
    """

    def __init__(self, venv: TorchVecEnv):
        if not isinstance(venv, TorchVecEnv):
            raise TypeError(f"NumpyVecEnv wraps a TorchVecEnv, got {type(venv).__name__} for parameter venv")
        self.venv = venv
        super().__init__(venv.num_envs, venv.observation_space, venv.action_space)
        self._returns = np.zeros(self.num_envs)
        self._lengths = np.zeros(self.num_envs, dtype=np.int64)

    def reset(self) -> VecEnvObs:
        self._returns[:], self._lengths[:] = 0.0, 0
        return to_numpy(self.venv.reset())

    def step_async(self, actions: np.ndarray) -> None:
        self.venv.step_async(th.as_tensor(np.asarray(actions, dtype=np.float32), device=self.venv.device))

    def step_wait(self) -> VecEnvStepReturn:
        obs, rewards, dones, batched_infos = self.venv.step_wait()
        rewards_np, dones_np = rewards.cpu().numpy(), dones.cpu().numpy()
        self._returns += rewards_np
        self._lengths += 1
        infos: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        done_envs = np.flatnonzero(dones_np)
        if len(done_envs) > 0:
            final_obs = to_numpy(batched_infos["final_observation"])
            truncated = batched_infos["truncated"].cpu().numpy()
            for i in done_envs:
                terminal = {key: value[i] for key, value in final_obs.items()} if isinstance(final_obs, dict) else final_obs[i]
                infos[i] = {
                    "terminal_observation": terminal,
                    "TimeLimit.truncated": bool(truncated[i]),
                    "episode": {"r": float(self._returns[i]), "l": int(self._lengths[i])},
                }
            self._returns[done_envs], self._lengths[done_envs] = 0.0, 0
        return to_numpy(obs), rewards_np.astype(np.float32), dones_np.astype(bool), infos

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        return self.venv.seed(seed)

    def close(self) -> None:
        self.venv.close()

    def get_images(self) -> Sequence[np.ndarray | None]:
        return self.venv.get_images()

    def render(self, mode: str | None = None) -> np.ndarray | None:
        return self.venv.render(mode)

    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return self.venv.get_attr(attr_name, indices)

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        self.venv.set_attr(attr_name, value, indices)

    def env_method(self, method_name: str, *method_args, indices: Any = None, **method_kwargs) -> list[Any]:
        return self.venv.env_method(method_name, *method_args, indices=indices, **method_kwargs)

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        if issubclass(Monitor, wrapper_class):
            return [True for _ in self.venv._indices(indices)]
        return self.venv.env_is_wrapped(wrapper_class, indices)
