"""Small deterministic environments for the tests."""

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces


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
