"""Mixed per-environment exploration noise (as in Parallel Q-Learning), white or correlated in time."""

import math

import torch as th

from sb3_fasttd3.common.utils import is_number


def check_noise_scales(std_min: float, std_max: float) -> None:
    """
    Raise a ``ValueError`` naming the parameter unless ``0 <= std_min <= std_max < inf``.

    :param std_min: smallest noise scale
    :param std_max: largest noise scale
    """
    if not std_min >= 0.0:
        raise ValueError(f"std_min must be a float >= 0, got {std_min!r}")
    if not std_min <= std_max:
        raise ValueError(f"std_min must be <= std_max, got std_min={std_min}, std_max={std_max}")
    if not math.isfinite(std_max):
        raise ValueError(f"std_max must be a finite float, got {std_max!r}")


def check_noise_correlation(correlation: float | None) -> None:
    """
    Raise a ``ValueError`` naming the parameter unless ``correlation`` is ``None`` or a number of steps > 0.

    :param correlation: steps over which the exploration noise's correlation decays to 1/e
    """
    is_steps = is_number(correlation) and correlation > 0
    if correlation is not None and not is_steps:
        raise ValueError(f"noise_correlation must be None (white noise) or a number of steps > 0, got {correlation!r}")


class MixedGaussianNoise:
    """
    Gaussian exploration noise whose scale differs from one environment to the next.

    Each environment ``i`` keeps its own ``sigma_i ~ U[std_min, std_max]``; a new sigma is drawn for an
    environment only when its episode ends (:meth:`reset` with its index). With ``stratified``, environment ``i``
    draws from the ``i``-th of ``n_envs`` equal slices of [std_min, std_max] instead: every step then mixes small and
    large scales, where a few envs drawing independently may all explore little (or much) for whole episodes.

    The noisy action is ``clip(action + z * sigma_i, -1, 1)`` in the policy's [-1, 1] action scale, where
    ``z ~ N(0, 1)`` is drawn anew at every step (white noise, the reference's) or, with ``correlation``, follows an
    AR(1) process ``z_t = d * z_{t-1} + sqrt(1 - d^2) * N(0, 1)`` with ``d = exp(-1 / correlation)``: still
    ``N(0, 1)`` at every step, but correlated over about ``correlation`` steps (a discretized Ornstein-Uhlenbeck
    process), which moves the actions in longer excursions. :meth:`advance` steps it, outside any compiled graph.

    The sigmas are per-run state, not policy parameters: they are not saved with the model, so a model
    can be loaded with any number of environments.

    :param n_envs: number of environments
    :param std_min: smallest noise scale
    :param std_max: largest noise scale
    :param device: device of the sigmas (that of the actions)
    :param correlation: steps over which the noise's correlation decays to 1/e; ``None``: white noise
    :param action_dim: size of the actions (needed with ``correlation``, whose state has the actions' shape)
    :param stratified: draw environment ``i``'s sigma from the ``i``-th of ``n_envs`` equal slices of the range
    """

    def __init__(
        self,
        n_envs: int,
        std_min: float,
        std_max: float,
        device: th.device | str = "cpu",
        correlation: float | None = None,
        action_dim: int = 1,
        stratified: bool = False,
    ):
        check_noise_scales(std_min, std_max)
        check_noise_correlation(correlation)
        self.n_envs = n_envs
        self.std_min = std_min
        self.std_max = std_max
        self.correlation = correlation
        self.stratified = stratified
        self.decay = 0.0 if correlation is None else math.exp(-1.0 / correlation)
        self.sigmas = th.empty(n_envs, 1, device=device)
        # Where env i's slice starts, in units of the range over n_envs (stratified only), made once for every draw
        self._slice_starts = th.arange(n_envs, device=device).reshape(-1, 1) if stratified else None
        # The AR(1) state, N(0, 1) at every step; None for white noise
        self.unit = None if correlation is None else th.empty(n_envs, action_dim, device=device)
        self.reset()

    def _draw(self) -> th.Tensor:
        """A new sigma for every env."""
        unit = th.rand(self.n_envs, 1, device=self.sigmas.device)
        if self._slice_starts is not None:  # env i's draw from [i / n, (i + 1) / n)
            unit = (unit + self._slice_starts) / self.n_envs
        return unit * (self.std_max - self.std_min) + self.std_min

    def reset(self, dones: th.Tensor | None = None) -> None:
        """
        Draw new sigmas for the environments whose episode ended.

        :param dones: boolean mask of shape (n_envs,); ``None`` redraws every sigma
        """
        if dones is None:
            self.sigmas.copy_(self._draw())
            if self.unit is not None:
                self.unit.normal_()
        else:
            # Draw for every env and keep the old sigma where the episode goes on: no host sync
            mask = th.as_tensor(dones, device=self.sigmas.device, dtype=th.bool).reshape(-1, 1)
            self.sigmas.copy_(th.where(mask, self._draw(), self.sigmas))
            if self.unit is not None:  # a new episode starts from the stationary distribution
                self.unit.copy_(th.where(mask, th.randn_like(self.unit), self.unit))

    def advance(self) -> None:
        """One step of the correlated noise's AR(1) process (nothing for white noise); call it once per step."""
        if self.unit is not None:
            self.unit.mul_(self.decay).add_(th.randn_like(self.unit), alpha=math.sqrt(1.0 - self.decay**2))

    def __call__(self, actions: th.Tensor) -> th.Tensor:
        """
        :param actions: deterministic actions in [-1, 1], shape (n_envs, action_dim)
        :return: noisy actions clipped to [-1, 1]
        """
        unit = th.randn_like(actions) if self.unit is None else self.unit
        return (actions + unit * self.sigmas).clamp(-1.0, 1.0)

    @property
    def settings(self) -> tuple[int, float, float, float | None, bool]:
        """The arguments this noise was made with: ``n_envs``, ``std_min``, ``std_max``, ``correlation``, ``stratified``."""
        return self.n_envs, self.std_min, self.std_max, self.correlation, self.stratified

    def __repr__(self) -> str:
        correlation = "" if self.correlation is None else f", correlation={self.correlation}"
        stratified = ", stratified=True" if self.stratified else ""
        return (
            f"MixedGaussianNoise(n_envs={self.n_envs}, std_min={self.std_min}, std_max={self.std_max}"
            f"{correlation}{stratified})"
        )
