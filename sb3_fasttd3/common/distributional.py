"""Categorical (C51) value distributions on a fixed, evenly spaced support."""

import torch as th


def check_support(v_min: float, v_max: float, num_atoms: int) -> None:
    """
    Raise a ``ValueError`` naming the parameter unless ``num_atoms >= 2`` atoms span ``v_min < v_max``.

    :param v_min: smallest return the critic can represent
    :param v_max: largest return the critic can represent
    :param num_atoms: number of atoms
    """
    if not (isinstance(num_atoms, int) and num_atoms >= 2):
        raise ValueError(f"num_atoms must be an integer >= 2, got {num_atoms!r}")
    if not v_min < v_max:
        raise ValueError(f"v_min must be smaller than v_max, got v_min={v_min}, v_max={v_max}")


def make_support(v_min: float, v_max: float, num_atoms: int, device: th.device | str = "cpu") -> th.Tensor:
    """
    Evenly spaced atoms ``linspace(v_min, v_max, num_atoms)``.

    :param v_min: smallest return the critic can represent
    :param v_max: largest return the critic can represent
    :param num_atoms: number of atoms (at least 2)
    :param device: device of the returned tensor
    :return: the support, shape (num_atoms,)
    """
    check_support(v_min, v_max, num_atoms)
    return th.linspace(v_min, v_max, num_atoms, device=device)


def _as_column(x: th.Tensor | float, like: th.Tensor) -> th.Tensor:
    """Broadcast a scalar, (B,) or (B, 1) value to a float32 column (B, 1)."""
    x = th.as_tensor(x, dtype=th.float32, device=like.device)
    return x.reshape(-1, 1) if x.dim() > 0 else x.expand(like.shape[0], 1)


def categorical_projection(
    next_probs: th.Tensor,
    rewards: th.Tensor,
    bootstrap: th.Tensor,
    discounts: th.Tensor | float,
    support: th.Tensor,
) -> th.Tensor:
    """
    Project the distribution of ``rewards + bootstrap * discounts * Z`` onto ``support``.

    Each atom ``z_j`` of the next-state distribution moves to ``Tz_j = r + bootstrap * discount * z_j``,
    clamped to ``[v_min, v_max]``, and its probability is split between the two neighbouring atoms in
    proportion to the distance. When ``Tz_j`` lands exactly on an atom, the whole mass goes to that atom
    (rows always sum to 1). Computed in float32 whatever the input dtype.

    :param next_probs: target distribution at the next state, shape (B, A), rows summing to 1
    :param rewards: (n-step) returns, shape (B,) or (B, 1)
    :param bootstrap: 1 where the next state's value is used, 0 at a termination, shape (B,) or (B, 1)
    :param discounts: discount of the next value (``gamma ** steps``), shape (B,), (B, 1) or a float
    :param support: evenly spaced atoms, shape (A,)
    :return: projected target distribution, shape (B, A)
    """
    next_probs = next_probs.float()
    support = support.float()
    num_atoms = support.shape[0]
    v_min, v_max = support[0], support[-1]
    delta_z = (v_max - v_min) / (num_atoms - 1)

    rewards = _as_column(rewards, next_probs)
    scale = _as_column(bootstrap, next_probs) * _as_column(discounts, next_probs)
    target_atoms = (rewards + scale * support.unsqueeze(0)).clamp(v_min, v_max)
    # Fractional position of each moved atom on the support, in [0, num_atoms - 1]
    position = ((target_atoms - v_min) / delta_z).clamp(0, num_atoms - 1)
    lower = position.floor()
    upper_weight = position - lower
    lower_idx = lower.long()
    # On the last atom the upper neighbour does not exist: its weight is 0 anyway
    upper_idx = (lower_idx + 1).clamp(max=num_atoms - 1)

    projected = th.zeros_like(next_probs)
    projected.scatter_add_(1, lower_idx, next_probs * (1.0 - upper_weight))
    projected.scatter_add_(1, upper_idx, next_probs * upper_weight)
    return projected


def expected_value(logits: th.Tensor, support: th.Tensor) -> th.Tensor:
    """
    Mean of the categorical distributions given by ``logits`` over ``support``.

    :param logits: unnormalized log-probabilities, shape (..., A)
    :param support: atoms, shape (A,)
    :return: expected values, shape (...)
    """
    return (th.softmax(logits.float(), dim=-1) * support.float()).sum(dim=-1)
