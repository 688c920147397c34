"""Small deterministic environments for the tests."""

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

from sb3_fasttd3.vec_env import TorchStep, TorchVecEnv


class CountingEnv(gym.Env):
    """
    Observation ``[t, episode, x]``; the episode terminates when ``x`` leaves [-5, 5]
    (the action adds to ``x``) and is truncated after ``max_steps`` steps. ``nan_at`` makes the
    observation NaN at that global step (to test the finite check).
    """

    def __init__(self, max_steps: int = 10, nan_at: int | None = None, dict_obs: bool = False):
        self.max_steps = max_steps
        self.nan_at = nan_at
        self.dict_obs = dict_obs
        self.action_space = spaces.Box(-2.0, 2.0, shape=(1,), dtype=np.float32)
        box = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        if dict_obs:
            # Asymmetric: the critic also sees a privileged copy of the state plus one extra value
            self.observation_space = spaces.Dict(
                {"state": box, "privileged_state": spaces.Box(-np.inf, np.inf, shape=(4,), dtype=np.float32)}
            )
        else:
            self.observation_space = box
        self.episode, self.global_step, self.t, self.x = -1, 0, 0, 0.0

    def _obs(self) -> Any:
        obs = np.array([self.t, self.episode, self.x], dtype=np.float32)
        if self.nan_at is not None and self.global_step == self.nan_at:
            obs[2] = np.nan
        if self.dict_obs:
            return {"state": obs, "privileged_state": np.append(obs, 1.0).astype(np.float32)}
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        super().reset(seed=seed)
        self.episode += 1
        self.t, self.x = 0, float(self.np_random.uniform(-1, 1))
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[Any, float, bool, bool, dict]:
        self.t += 1
        self.global_step += 1
        self.x += float(np.clip(action[0], -2, 2))
        reward = -abs(self.x)
        terminated = abs(self.x) > 5
        truncated = self.t >= self.max_steps and not terminated
        return self._obs(), reward, terminated, truncated, {}


class CountingTorchVecEnv(TorchVecEnv):
    """
    :class:`CountingEnv` batched in torch: env ``i`` observes ``[t, episode, x]`` (or the same dict), terminates
    when ``x`` leaves [-bound, bound] and is truncated after ``max_steps`` steps, resetting itself. ``nan_at``
    makes the observations NaN at that vector step.
    """

    def __init__(
        self, num_envs: int = 4, max_steps: int = 10, dict_obs: bool = False, nan_at: int | None = None, bound: float = 5.0
    ):
        env = CountingEnv(max_steps=max_steps, dict_obs=dict_obs)
        super().__init__(num_envs, env.observation_space, env.action_space, device="cpu")
        self.max_steps, self.dict_obs, self.nan_at, self.bound = max_steps, dict_obs, nan_at, bound
        self.generator = th.Generator().manual_seed(0)
        self.t = th.zeros(num_envs, dtype=th.int64)
        self.episode = th.zeros(num_envs, dtype=th.int64)
        self.x = th.zeros(num_envs)
        self.steps = 0

    def _obs(self) -> th.Tensor | dict[str, th.Tensor]:
        obs = th.stack([self.t.float(), self.episode.float(), self.x], dim=1)
        if self.nan_at is not None and self.steps == self.nan_at:
            obs = obs * th.nan
        if self.dict_obs:
            return {"state": obs, "privileged_state": th.cat([obs, th.ones(self.num_envs, 1)], dim=1)}
        return obs

    def _draw_x(self) -> th.Tensor:
        return th.rand(self.num_envs, generator=self.generator) * 2.0 - 1.0

    def _reset(self, seed: int | None) -> th.Tensor | dict[str, th.Tensor]:
        if seed is not None:
            self.generator.manual_seed(seed)
        self.t.zero_()
        self.episode.zero_()
        self.x = self._draw_x()
        return self._obs()

    def _step(self, actions: th.Tensor) -> TorchStep:
        self.steps += 1
        self.t += 1
        self.x = self.x + actions[:, 0].clamp(-2.0, 2.0)
        reward = -self.x.abs()
        terminated = self.x.abs() > self.bound
        truncated = (self.t >= self.max_steps) & ~terminated
        final_obs = self._obs()
        done = terminated | truncated
        self.t = th.where(done, 0, self.t)
        self.episode = self.episode + done.long()
        self.x = th.where(done, self._draw_x(), self.x)
        return TorchStep(self._obs(), reward, terminated, truncated, final_obs)
