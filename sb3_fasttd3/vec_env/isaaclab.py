"""
Isaac Lab RL environments (``ManagerBasedRLEnv``, ``DirectRLEnv``) as a :class:`TorchVecEnv` on the simulation device.

Only torch is needed here: the Isaac Lab environment is created by the user (``gym.make(task, cfg=env_cfg)``).
Isaac Lab resets finished environments inside ``step`` (gymnasium Same-Step autoreset): the observation it returns
for them is already the first one of the next episode. The observation they reached is published in
``extras["final_obs"]`` when the environment config has ``compute_final_obs=True``.
"""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from gymnasium.vector import AutoresetMode

from sb3_fasttd3.vec_env.base import TorchObs, TorchStep, TorchVecEnv

FINAL_OBS_KEY = "final_obs"
MISSING_FINAL_OBS = (
    "The Isaac Lab environment does not publish the observation an episode ends on (extras['final_obs']), "
    "which is needed to bootstrap truncated episodes. Set `env_cfg.compute_final_obs = True` before "
    "`gym.make(task, cfg=env_cfg)` (this needs an Isaac Lab version that has the `compute_final_obs` option)."
)


class IsaacLabVecEnv(TorchVecEnv):
    """
    An Isaac Lab RL environment as a :class:`~sb3_fasttd3.vec_env.TorchVecEnv`: tensors stay on the simulation device.

    Observation groups: the ``policy`` group alone gives a ``Box`` observation; with a ``critic`` group
    (asymmetric actor-critic) the observation is ``Dict({"policy": ..., "critic": ...})``, the groups
    FastTD3's policies use for the actor and the critic. Each group must be one concatenated vector (``Box``).

    Time-outs are reported as ``truncated`` (``terminated`` wins when both are set), or as ``terminated``
    for finite-horizon tasks (``env_cfg.is_finite_horizon``). The returned tensors are copies: Isaac Lab
    reuses its buffers from one step to the next.

    Rendering follows the environment's ``render_mode`` (``gym.make(task, cfg=env_cfg, render_mode="rgb_array")``,
    with ``--enable_cameras`` when headless): Isaac Lab renders every env into one scene, so :meth:`get_images`
    returns one image, the viewport's.

    :param env: an Isaac Lab RL environment, possibly inside gymnasium wrappers, created with
        ``env_cfg.compute_final_obs = True``
    :param clip_actions: actions are clamped to ``[-clip_actions, clip_actions]``, which becomes the action space
        (required when the environment's action space is unbounded, as it usually is in Isaac Lab).
        None: use the environment's (bounded) action space and clamp to it.
    """

    def __init__(self, env: Any, clip_actions: float | None = None):
        self.env = env
        unwrapped = env.unwrapped
        _check_autoreset_mode(unwrapped)
        if getattr(getattr(unwrapped, "cfg", None), "compute_final_obs", None) is False:
            raise ValueError(MISSING_FINAL_OBS)
        self.groups = _observation_groups(unwrapped.single_observation_space)
        group_spaces = {group: unwrapped.single_observation_space[group] for group in self.groups}
        observation_space = spaces.Dict(group_spaces) if len(self.groups) > 1 else group_spaces["policy"]
        action_space = _action_space(unwrapped.single_action_space, clip_actions)
        self.render_mode = env.render_mode  # read by SB3's VecEnv.__init__
        super().__init__(unwrapped.num_envs, observation_space, action_space, unwrapped.device)
        if "render_fps" in unwrapped.metadata:  # the frame rate of videos (VecVideoRecorder)
            self.metadata["render_fps"] = unwrapped.metadata["render_fps"]
        self.finite_horizon = bool(getattr(getattr(unwrapped, "cfg", None), "is_finite_horizon", False))
        self._action_low = th.as_tensor(action_space.low, device=self.device)
        self._action_high = th.as_tensor(action_space.high, device=self.device)
        # Checked (one host sync per step) until the environment has published a final observation once
        self._final_obs_seen = False

    def _reset(self, seed: int | None) -> TorchObs:
        obs, _ = self.env.reset(seed=seed)
        return self._select(obs)

    def _step(self, actions: th.Tensor) -> TorchStep:
        actions = th.clamp(actions, self._action_low, self._action_high)
        obs, reward, terminated, time_outs, extras = self.env.step(actions)
        terminated, truncated = self._flags(terminated, time_outs)
        next_obs = self._select(obs)
        final_obs = self._final_obs(extras, next_obs, terminated | truncated)
        return TorchStep(next_obs, reward.to(dtype=th.float32, copy=True), terminated, truncated, final_obs)

    def close(self) -> None:
        self.env.close()

    def render(self, mode: str | None = None) -> np.ndarray | None:
        if self.render_mode == "human" and mode in (None, "human"):
            # Isaac Lab draws its own window; SB3's VecEnv.render would call env_method("render"), i.e. this method
            self.env.render()
            return None
        return super().render(mode)

    def get_images(self) -> list[np.ndarray | None]:
        """One image, the viewport's (all envs in one scene), in ``rgb_array`` mode."""
        return [self.env.render()]

    def _select(self, obs: dict[str, th.Tensor]) -> TorchObs:
        """Copies of the observation groups we use (a tensor for ``policy`` alone)."""
        selected = {group: obs[group].clone() for group in self.groups}
        return selected if len(self.groups) > 1 else selected["policy"]

    def _flags(self, terminated: th.Tensor, time_outs: th.Tensor) -> tuple[th.Tensor, th.Tensor]:
        """``(terminated, truncated)`` as new bool tensors; a time-out is no truncation in finite-horizon tasks."""
        terminated, time_outs = terminated.to(th.bool), time_outs.to(th.bool)
        if self.finite_horizon:
            return terminated | time_outs, th.zeros_like(terminated)
        return terminated.clone(), time_outs & ~terminated

    def _final_obs(self, extras: dict[str, Any], next_obs: TorchObs, dones: th.Tensor) -> TorchObs:
        """The published final observation where an episode ended, ``next_obs`` elsewhere."""
        final = extras.get(FINAL_OBS_KEY)
        if final is None:
            # Without resets there is nothing to publish; with resets the environment must have published it
            if not self._final_obs_seen and bool(dones.any()):
                raise RuntimeError(MISSING_FINAL_OBS)
            return next_obs
        self._final_obs_seen = True
        if isinstance(next_obs, th.Tensor):
            return _where(dones, final["policy"], next_obs)
        return {group: _where(dones, final[group], value) for group, value in next_obs.items()}


def _where(dones: th.Tensor, final: th.Tensor, next_obs: th.Tensor) -> th.Tensor:
    """``final`` for the envs that are done, ``next_obs`` for the others (a new tensor)."""
    mask = dones.view(-1, *([1] * (next_obs.dim() - 1)))
    return th.where(mask, final.to(device=next_obs.device, dtype=next_obs.dtype), next_obs)


def _check_autoreset_mode(unwrapped: Any) -> None:
    """Only Same-Step autoreset (Isaac Lab's default) is supported."""
    mode = getattr(unwrapped, "metadata", {}).get("autoreset_mode")
    if mode is not None and mode != AutoresetMode.SAME_STEP:
        raise ValueError(f"IsaacLabVecEnv needs Same-Step autoreset (Isaac Lab's default), the environment uses {mode}.")


def _observation_groups(observation_space: spaces.Dict) -> tuple[str, ...]:
    """``("policy",)`` or ``("policy", "critic")``, each a concatenated ``Box`` group."""
    if "policy" not in observation_space.spaces:
        raise ValueError(f"The Isaac Lab environment has no 'policy' observation group: {list(observation_space.spaces)}")
    groups = tuple(group for group in ("policy", "critic") if group in observation_space.spaces)
    for group in groups:
        if not isinstance(observation_space[group], spaces.Box):
            raise ValueError(
                f"The '{group}' observation group must be one vector (a Box space), got {observation_space[group]}: "
                "set `concatenate_terms=True` on that group in the environment config."
            )
    return groups


def _action_space(action_space: spaces.Space, clip_actions: float | None) -> spaces.Box:
    """The action space the agent sees: ``[-clip_actions, clip_actions]``, or the environment's own bounded one."""
    if not isinstance(action_space, spaces.Box):
        raise ValueError(f"IsaacLabVecEnv needs a continuous (Box) action space, got {action_space}.")
    if clip_actions is None:
        if not action_space.is_bounded("both"):
            raise ValueError(
                f"The Isaac Lab action space {action_space} is unbounded: pass `clip_actions` "
                "(e.g. clip_actions=1.0) to clamp the actions to [-clip_actions, clip_actions]."
            )
        return spaces.Box(action_space.low, action_space.high, dtype=np.float32)
    if not (np.isfinite(clip_actions) and clip_actions > 0):
        raise ValueError(f"`clip_actions` must be a finite positive number, got {clip_actions}.")
    return spaces.Box(-clip_actions, clip_actions, shape=action_space.shape, dtype=np.float32)
