"""Mixed per-environment exploration noise (as in Parallel Q-Learning)."""

import torch as th


def check_noise_scales(std_min: float, std_max: float) -> None:
    """
    Raise a ``ValueError`` naming the parameter unless ``0 <= std_min <= std_max``.

    :param std_min: smallest noise scale
    :param std_max: largest noise scale
    """
    if not std_min >= 0.0:
        raise ValueError(f"std_min must be a float >= 0, got {std_min!r}")
    if not std_min <= std_max:
        raise ValueError(f"std_min must be <= std_max, got std_min={std_min}, std_max={std_max}")


class MixedGaussianNoise:
    """
    Gaussian exploration noise whose scale differs from one environment to the next.

    Each environment ``i`` keeps its own ``sigma_i ~ U[std_min, std_max]``; a new sigma is drawn for an
    environment only when its episode ends (:meth:`reset` with its index). The noisy action is
    ``clip(action + N(0, 1) * sigma_i, -1, 1)`` in the policy's [-1, 1] action scale.

    The sigmas are per-run state, not policy parameters: they are not saved with the model, so a model
    can be loaded with any number of environments.

    :param n_envs: number of environments
    :param std_min: smallest noise scale
    :param std_max: largest noise scale
    :param device: device of the sigmas (that of the actions)
    """

    def __init__(self, n_envs: int, std_min: float, std_max: float, device: th.device | str = "cpu"):
        check_noise_scales(std_min, std_max)
        self.n_envs = n_envs
        self.std_min = std_min
        self.std_max = std_max
        self.sigmas = th.empty(n_envs, 1, device=device)
        self.reset()

    def _draw(self, n: int) -> th.Tensor:
        return th.rand(n, 1, device=self.sigmas.device) * (self.std_max - self.std_min) + self.std_min

    def reset(self, dones: th.Tensor | None = None) -> None:
        """
        Draw new sigmas for the environments whose episode ended.

        :param dones: boolean mask of shape (n_envs,); ``None`` redraws every sigma
        """
        if dones is None:
            self.sigmas.copy_(self._draw(self.n_envs))
        else:
            # Draw for every env and keep the old sigma where the episode goes on: no host sync
            mask = th.as_tensor(dones, device=self.sigmas.device, dtype=th.bool).reshape(-1, 1)
            self.sigmas.copy_(th.where(mask, self._draw(self.n_envs), self.sigmas))

    def __call__(self, actions: th.Tensor) -> th.Tensor:
        """
        :param actions: deterministic actions in [-1, 1], shape (n_envs, action_dim)
        :return: noisy actions clipped to [-1, 1]
        """
        return (actions + th.randn_like(actions) * self.sigmas).clamp(-1.0, 1.0)

    def __repr__(self) -> str:
        return f"MixedGaussianNoise(n_envs={self.n_envs}, std_min={self.std_min}, std_max={self.std_max})"
