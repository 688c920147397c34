"""Empirical observation normalization that lives inside the policy (saved and loaded with it)."""

from collections.abc import Callable
from typing import Any

import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from torch import nn

# (count, mean, variance) of a batch -> those of a larger batch it is part of
MergeMoments = Callable[[th.Tensor, th.Tensor, th.Tensor], tuple[th.Tensor, th.Tensor, th.Tensor]]


def combine_moments(
    count: th.Tensor,
    mean: th.Tensor,
    var: th.Tensor,
    other_count: int | th.Tensor,
    other_mean: th.Tensor,
    other_var: th.Tensor,
) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
    """
    Count, mean and population variance of two samples together, from each one's (Chan et al.'s parallel algorithm).

    :return: the combined count, mean (``mean``'s dtype) and variance
    """
    total = count + other_count
    # Fraction of the combined sample that comes from the other one (1 when the first is empty, 0 when both are)
    weight = other_count / total.clamp(min=1).to(mean.dtype)
    delta = other_mean - mean
    return total, mean + delta * weight, var * (1 - weight) + other_var * weight + delta.square() * weight * (1 - weight)


def is_normalizable(space: spaces.Space) -> bool:
    """
    Whether running statistics normalize observations of ``space``: vector ``Box`` spaces only. Images (SB3's
    ``is_image_space``) are scaled by the policy's preprocessing and discrete spaces are one-hot encoded there.

    :param space: an observation space (not a ``Dict``)
    """
    return isinstance(space, spaces.Box) and not is_image_space(space)


class EmpiricalNormalization(nn.Module):
    """
    Running mean and variance of observations, used to normalize them.

    The statistics are buffers (``count``, ``mean``, ``var``), so they are part of the policy's
    ``state_dict``: ``model.save`` carries them and ``predict`` on a loaded model normalizes.
    They change only when :meth:`update` is called explicitly (FastTD3 calls it on the observations
    collected in rollouts), never in ``forward``: evaluation and training batches leave them untouched.
    Batches are merged with Chan et al.'s parallel algorithm, so the result equals the mean and
    (population) variance of everything seen.

    :param shape: shape of one observation
    :param epsilon: added to the variance before the square root (or to the standard deviation, see ``epsilon_on_std``)
    :param clip_obs: normalized observations are clipped to ``[-clip_obs, clip_obs]``; ``None``: no clipping
    :param epsilon_on_std: divide by ``std + epsilon`` (the FastTD3 reference, with ``epsilon=0.01``) instead of
        ``sqrt(var + epsilon)`` (SB3's ``VecNormalize``): a feature that barely moved so far is then scaled by at most
        ``1 / epsilon`` rather than ``1 / sqrt(epsilon)``
    """

    count: th.Tensor
    mean: th.Tensor
    var: th.Tensor

    def __init__(
        self, shape: tuple[int, ...], epsilon: float = 1e-8, clip_obs: float | None = 10.0, epsilon_on_std: bool = False
    ):
        super().__init__()
        self.shape = tuple(shape)
        self.epsilon = epsilon
        self.clip_obs = clip_obs
        self.epsilon_on_std = epsilon_on_std
        # float64 like SB3's RunningMeanStd: exact counts up to 2**53, and every saved statistic is a float
        self.register_buffer("count", th.zeros((), dtype=th.float64))
        self.register_buffer("mean", th.zeros(self.shape))
        self.register_buffer("var", th.ones(self.shape))

    @th.no_grad()
    def update(self, batch: th.Tensor, merge_moments: MergeMoments | None = None) -> None:
        """
        Merge a batch of observations into the statistics.

        :param batch: observations, shape ``(n, *shape)``
        :param merge_moments: maps this batch's count, mean and variance to those of a larger batch it is part of
            (data-parallel training: the union of every rank's batch), which is merged instead
        """
        batch = batch.reshape(-1, *self.shape).to(self.mean.dtype)
        batch_count: int | th.Tensor = batch.shape[0]
        # An empty batch has no moments (NaN): zeros, which its zero weight then leaves out
        batch_mean = batch.mean(dim=0) if batch_count else th.zeros_like(self.mean)
        batch_var = batch.var(dim=0, unbiased=False) if batch_count else th.zeros_like(self.var)
        if merge_moments is not None:
            local_count = th.tensor(batch_count, dtype=self.count.dtype, device=batch.device)
            batch_count, batch_mean, batch_var = merge_moments(local_count, batch_mean, batch_var)
        total, mean, var = combine_moments(self.count, self.mean, self.var, batch_count, batch_mean, batch_var)
        self.count.copy_(total)
        self.mean.copy_(mean)
        self.var.copy_(var)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        """
        :param obs: raw observations, shape ``(..., *shape)``
        :return: normalized and clipped observations
        """
        obs = obs.to(self.mean.dtype)  # integer and bool Box observations too, as update() reads them
        if self.epsilon_on_std:
            normalized = (obs - self.mean) / (th.sqrt(self.var) + self.epsilon)
        else:
            normalized = (obs - self.mean) / th.sqrt(self.var + self.epsilon)
        return normalized if self.clip_obs is None else normalized.clamp(-self.clip_obs, self.clip_obs)

    def extra_repr(self) -> str:
        return f"shape={self.shape}, epsilon={self.epsilon}, clip_obs={self.clip_obs}, epsilon_on_std={self.epsilon_on_std}"


class DictNormalization(nn.Module):
    """
    One :class:`EmpiricalNormalization` per vector key of a ``Dict`` observation space (see :func:`is_normalizable`);
    the other keys (images, discrete values) pass through untouched and are never counted.

    :param observation_space: a ``Dict`` observation space
    :param kwargs: ``epsilon``, ``clip_obs`` and ``epsilon_on_std`` of each :class:`EmpiricalNormalization`
    """

    def __init__(self, observation_space: spaces.Dict, **kwargs: Any):
        super().__init__()
        self.normalizers = nn.ModuleDict(
            {
                key: EmpiricalNormalization(space.shape or (), **kwargs)
                for key, space in observation_space.spaces.items()
                if is_normalizable(space)
            }
        )

    @th.no_grad()
    def update(self, batch: dict[str, th.Tensor], merge_moments: MergeMoments | None = None) -> None:
        for key, normalizer in self.normalizers.items():
            normalizer.update(batch[key], merge_moments)  # type: ignore[operator]  # ModuleDict items are Modules

    def forward(self, obs: dict[str, th.Tensor]) -> dict[str, th.Tensor]:
        """
        :param obs: raw observations of some or all keys
        :return: the same keys, the vector ones normalized
        """
        normalizers = self.normalizers
        return {key: normalizers[key](value) if key in normalizers else value for key, value in obs.items()}


def make_normalizer(observation_space: spaces.Space, **kwargs: Any) -> EmpiricalNormalization | DictNormalization | None:
    """
    The normalizer of an observation space, or None when no part of it is normalized (an image, a discrete space,
    or a ``Dict`` without vector keys).

    :param observation_space: the observation space
    :param kwargs: ``epsilon``, ``clip_obs`` and ``epsilon_on_std`` of :class:`EmpiricalNormalization`
    """
    if isinstance(observation_space, spaces.Dict):
        if not any(is_normalizable(space) for space in observation_space.spaces.values()):
            return None
        return DictNormalization(observation_space, **kwargs)
    if is_normalizable(observation_space):
        return EmpiricalNormalization(observation_space.shape or (), **kwargs)
    return None
