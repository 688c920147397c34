"""
``VecNormalize``'s normalization of replay samples, in torch on the samples' device: the buffer stores original
observations and rewards, and each sample is normalized with the env's current statistics (SB3's off-policy
semantics). Computed in float64 where the device has it, as ``VecNormalize`` does with NumPy, then cast to float32.
"""

import numpy as np
import torch as th
from stable_baselines3.common.running_mean_std import RunningMeanStd
from stable_baselines3.common.vec_env import VecNormalize

from sb3_fasttd3.common.replay_layout import TensorObs


def _compute_dtype(device: th.device) -> th.dtype:
    # MPS has no float64: there the normalization is computed in float32
    return th.float32 if device.type == "mps" else th.float64


def _statistic(value: np.ndarray | float, device: th.device) -> th.Tensor:
    # Statistics are small host arrays: copied without waiting for the device
    return th.as_tensor(np.asarray(value), dtype=_compute_dtype(device)).to(device, non_blocking=True)


def _normalize(values: th.Tensor, rms: RunningMeanStd, epsilon: float, clip: float) -> th.Tensor:
    device = values.device
    mean, std = _statistic(rms.mean, device), th.sqrt(_statistic(rms.var, device) + epsilon)
    return ((values.to(mean.dtype) - mean) / std).clamp(-clip, clip).float()


def normalize_observations(obs: TensorObs, env: VecNormalize) -> TensorObs:
    """
    :param obs: Observations (a dict of those for a ``Dict`` space), leading dimension the batch
    :param env: The ``VecNormalize`` whose current statistics apply
    :return: ``VecNormalize.normalize_obs`` of ``obs``: the normalized keys (``norm_obs_keys``) as float32, the others
        unchanged
    """
    if not env.norm_obs:
        return obs
    if isinstance(obs, dict):
        assert isinstance(env.obs_rms, dict) and env.norm_obs_keys is not None
        normalized = dict(obs)
        for key in env.norm_obs_keys:
            normalized[key] = _normalize(obs[key], env.obs_rms[key], env.epsilon, env.clip_obs)
        return normalized
    assert isinstance(env.obs_rms, RunningMeanStd)
    return _normalize(obs, env.obs_rms, env.epsilon, env.clip_obs)


def normalize_rewards(rewards: th.Tensor, env: VecNormalize) -> th.Tensor:
    """
    :param rewards: One-step rewards, any shape
    :param env: The ``VecNormalize`` whose current statistics apply
    :return: ``VecNormalize.normalize_reward`` of ``rewards``, as float32
    """
    if not env.norm_reward:
        return rewards.float()
    scale = th.sqrt(_statistic(env.ret_rms.var, rewards.device) + env.epsilon)
    return (rewards.to(scale.dtype) / scale).clamp(-env.clip_reward, env.clip_reward).float()
