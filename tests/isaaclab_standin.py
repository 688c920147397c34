"""
A small batched torch environment with the interface of an Isaac Lab RL environment (Isaac Lab needs Isaac Sim
and an RTX GPU, so it cannot run in the tests).

What it follows (Isaac Lab ``ManagerBasedRLEnv`` / ``DirectRLEnv``): ``reset(seed=None, options=None) -> (obs, extras)``
and ``step(actions) -> (obs, rewards, terminated, time_outs, extras)``, every value a batched tensor on ``device``;
``obs`` is a dict of observation groups (``policy``, optional ``critic``); finished environments are reset inside
``step`` (Same-Step autoreset) and, with ``cfg.compute_final_obs``, the whole batch observed before that reset is
published as ``extras["final_obs"]`` on the steps that reset something (the key is not removed afterwards).
Rewards and done flags are persistent buffers rewritten in place at every step, as in Isaac Lab.

Dynamics (deterministic): each environment has a step counter ``t`` and a position ``x`` (0 after a reset); a step
adds ``action[:, 0]`` to ``x`` and rewards the new ``x``. An episode terminates when ``|x| > bound`` and times out
when ``t`` reaches ``max_episode_length``. Observations: ``policy = [t, x]``, ``critic = [t, x, episodes]``
(``episodes``: how many episodes that environment has finished).
"""

from dataclasses import dataclass
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import torch as th
from gymnasium import spaces


@dataclass
class StandInEnvCfg:
    """
    :param num_envs: number of environments
    :param max_episode_length: steps before a time-out
    :param bound: the episode terminates when ``|x|`` exceeds it
    :param compute_final_obs: publish ``extras["final_obs"]`` (Isaac Lab's option of that name)
    :param is_finite_horizon: Isaac Lab's option (used by the wrappers, not by the environment)
    :param critic_obs: add a ``critic`` observation group
    :param action_bound: bound of the action space; None: unbounded, as in Isaac Lab
    :param device: where the tensors live
    """

    num_envs: int = 5
    max_episode_length: int = 5
    bound: float = 3.5
    compute_final_obs: bool = True
    is_finite_horizon: bool = False
    critic_obs: bool = False
    action_bound: float | None = None
    device: str = "cpu"


class IsaacLabStandIn(gym.Env):
    """The stand-in environment (see the module docstring).

    :param cfg: its configuration
    """

    metadata: ClassVar[dict[str, Any]] = {
        "render_modes": [None, "human", "rgb_array"],
        "render_fps": 50,
        "autoreset_mode": gym.vector.AutoresetMode.SAME_STEP,
    }
    is_vector_env = True
    render_height, render_width = 16, 24

    def __init__(self, cfg: StandInEnvCfg, render_mode: str | None = None):
        self.cfg = cfg
        self.render_mode = render_mode
        self.human_renders = 0
        self.num_envs, self.device = cfg.num_envs, th.device(cfg.device)
        box = {"policy": spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)}
        if cfg.critic_obs:
            box["critic"] = spaces.Box(-np.inf, np.inf, shape=(3,), dtype=np.float32)
        self.single_observation_space = spaces.Dict(box)
        bound = np.inf if cfg.action_bound is None else cfg.action_bound
        self.single_action_space = spaces.Box(-bound, bound, shape=(1,), dtype=np.float32)
        self.observation_space = gym.vector.utils.batch_space(self.single_observation_space, self.num_envs)
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, self.num_envs)
        zeros = th.zeros(self.num_envs, device=self.device)
        self.t, self.x, self.episodes = zeros.long(), zeros.clone(), zeros.clone()
        self.reward_buf = zeros.clone()
        self.reset_terminated, self.reset_time_outs = zeros.bool(), zeros.bool()
        self.obs_buf = self._observe_into({})
        self.extras: dict[str, Any] = {}
        self.seeds: list[int] = []
        self.last_actions: th.Tensor | None = None
        self.closed = False

    def seed(self, seed: int = -1) -> int:
        self.seeds.append(seed)
        return seed

    def reset(self, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[dict[str, th.Tensor], dict]:
        if seed is not None:
            self.seed(seed)
        self._reset_where(th.ones(self.num_envs, dtype=th.bool, device=self.device))
        self.episodes.zero_()
        return self._observe_into(self.obs_buf), self.extras

    def step(self, action: th.Tensor) -> tuple[dict[str, th.Tensor], th.Tensor, th.Tensor, th.Tensor, dict]:
        self.last_actions = action.clone()
        self.x += action.to(self.device)[:, 0]
        self.t += 1
        self.reward_buf.copy_(self.x)
        self.reset_terminated.copy_(self.x.abs() > self.cfg.bound)
        self.reset_time_outs.copy_(self.t >= self.cfg.max_episode_length)
        dones = self.reset_terminated | self.reset_time_outs
        if dones.any():
            # Isaac Lab releases without the option never publish it
            if getattr(self.cfg, "compute_final_obs", False):
                self.extras["final_obs"] = self._observe_into({})
            self._reset_where(dones)
            self.episodes += dones.float()
        return self._observe_into(self.obs_buf), self.reward_buf, self.reset_terminated, self.reset_time_outs, self.extras

    def close(self) -> None:
        self.closed = True

    def render(self) -> np.ndarray | None:
        """One viewport image for every env, as Isaac Lab: its red channel is the sum of the positions ``x``."""
        if self.render_mode == "human":
            self.human_renders += 1
        if self.render_mode != "rgb_array":
            return None
        image = np.zeros((self.render_height, self.render_width, 3), dtype=np.uint8)
        image[..., 0] = int(self.x.sum().item()) % 256
        return image

    def _reset_where(self, mask: th.Tensor) -> None:
        self.t.masked_fill_(mask, 0)
        self.x.masked_fill_(mask, 0.0)

    def _observe_into(self, buffers: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
        """The observation groups, written into ``buffers`` (new tensors for missing groups)."""
        groups = {"policy": th.stack([self.t.float(), self.x], dim=1)}
        if self.cfg.critic_obs:
            groups["critic"] = th.stack([self.t.float(), self.x, self.episodes], dim=1)
        for name, value in groups.items():
            if name in buffers:
                buffers[name].copy_(value)
            else:
                buffers[name] = value
        return buffers
