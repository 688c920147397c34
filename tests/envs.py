"""Small deterministic environments for the tests."""

from typing import Any

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces

from sb3_fasttd3.vec_env import TorchStep, TorchVecEnv


class CountingEnv(gym.Env):
    """
    Observation ``[t, episode, x]``; the episode terminates when ``x`` leaves [-bound, bound]
    (the action adds to ``x``) and is truncated after ``max_steps`` steps. ``nan_at`` makes the
    observation NaN at that global step (to test the finite check).
    """

    def __init__(self, max_steps: int = 10, nan_at: int | None = None, dict_obs: bool = False, bound: float = 5.0):
        self.max_steps, self.bound = max_steps, bound
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
        terminated = abs(self.x) > self.bound
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


class BrightnessTargetEnv(gym.Env):
    """
    One-step task from pixels: the brightness of the image's left and right halves encodes a target action in
    [-1, 1] (left bright: -1, right bright: +1); the reward is ``-|action - target|``. A uniformly random policy
    scores -2/3 on average, the zero action -1/2, a perfect policy 0.

    :param size: height and width of the grayscale image (NatureCNN needs at least 36)
    :param channel_last: images of shape (size, size, 1) instead of (1, size, size)
    """

    def __init__(self, size: int = 36, channel_last: bool = False):
        self.size = size
        shape = (size, size, 1) if channel_last else (1, size, size)
        self.observation_space = spaces.Box(0, 255, shape=shape, dtype=np.uint8)
        self.action_space = spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
        self.target = 0.0

    def _obs(self) -> np.ndarray:
        right = (self.target + 1.0) / 2.0
        image = np.empty((self.size, self.size), dtype=np.uint8)
        image[:, : self.size // 2] = round(235 * (1.0 - right))
        image[:, self.size // 2 :] = round(235 * right)
        return image.reshape(self.observation_space.shape)

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.target = float(self.np_random.uniform(-1.0, 1.0))
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        return self._obs(), -abs(float(action[0]) - self.target), True, False, {}


class MixedDictEnv(gym.Env):
    """
    Dict observations of every kind FastTD3 reads: an image, a vector (mean 5, standard deviation 2), a Discrete
    and a MultiDiscrete value, and with ``privileged`` a second vector (the critic's in an asymmetric setup).
    The reward is the first action; episodes are truncated after ``max_steps`` steps.

    :param max_steps: episode length
    :param privileged: add the ``privileged_state`` vector
    """

    def __init__(self, max_steps: int = 5, privileged: bool = False):
        self.max_steps = max_steps
        vector = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        self.observation_space = spaces.Dict(
            {
                "pixels": spaces.Box(0, 255, shape=(1, 36, 36), dtype=np.uint8),
                "state": vector,
                "mode": spaces.Discrete(4),
                "flags": spaces.MultiDiscrete([2, 3]),
                **({"privileged_state": vector} if privileged else {}),
            }
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(2,), dtype=np.float32)
        self.t = 0

    def _obs(self) -> dict[str, Any]:
        obs = self.observation_space.sample()
        for key in ("state", "privileged_state"):
            if key in obs:
                obs[key] = self.np_random.normal(5.0, 2.0, size=3).astype(np.float32)
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict[str, Any], dict]:
        super().reset(seed=seed)
        if seed is not None:
            self.observation_space.seed(seed)
        self.t = 0
        return self._obs(), {}

    def step(self, action: np.ndarray) -> tuple[dict[str, Any], float, bool, bool, dict]:
        self.t += 1
        return self._obs(), float(action[0]), False, self.t >= self.max_steps, {}
