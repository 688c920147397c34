"""Checks of what FastTD3 is given: environments, their spaces and the data they return."""

import warnings
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from gymnasium.vector import VectorEnv
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import VecEnv, VecEnvWrapper, VecNormalize, VecTransposeImage, unwrap_vec_normalize

from sb3_fasttd3.common.buffers import STORABLE_SPACES
from sb3_fasttd3.vec_env.base import TorchVecEnv


def _named_parts(name: str, obs: Any) -> dict[str, Any]:
    """``{name: obs}`` for an array, ``{name[key]: obs[key]}`` for a dict observation (None: nothing)."""
    if obs is None:
        return {}
    if isinstance(obs, dict):
        return {f"{name}[{key}]": value for key, value in obs.items()}
    return {name: obs}


VEC_NORMALIZE_ERROR = (
    "FastTD3 normalizes observations itself (normalize_observations=True, statistics saved inside the model): "
    "remove the VecNormalize wrapper (with the RL Zoo: drop `normalize` from the hyperparameters). "
    "Wrapping would normalize twice and is not supported. A VecNormalize that only normalizes rewards "
    "(norm_obs=False) is accepted, and so is any VecNormalize with normalize_observations=False or 'auto'."
)


def check_spaces(observation_space: spaces.Space, action_space: spaces.Space) -> None:
    """
    Raise if FastTD3 cannot use these spaces, naming the space and what is accepted.

    :param observation_space: a ``Box`` (vector or image), ``Discrete``, ``MultiDiscrete`` or ``MultiBinary``
        space, or a ``Dict`` of those
    :param action_space: must be a ``Box`` with finite bounds
    """
    if not isinstance(action_space, spaces.Box):
        raise TypeError(
            f"FastTD3 supports only continuous (gymnasium.spaces.Box) action spaces, got {action_space} "
            "for parameter env: use DQN/QR-DQN for Discrete or MultiDiscrete actions"
        )
    if not (np.all(np.isfinite(action_space.low)) and np.all(np.isfinite(action_space.high))):
        raise ValueError(
            f"FastTD3 needs a bounded Box action space (finite low and high), got {action_space}: "
            "give the Box finite bounds or wrap the env with gymnasium.wrappers.RescaleAction"
        )
    subspaces = observation_space.spaces.values() if isinstance(observation_space, spaces.Dict) else [observation_space]
    if not all(isinstance(space, STORABLE_SPACES) for space in subspaces):
        accepted = ", ".join(space.__name__ for space in STORABLE_SPACES)
        raise TypeError(
            f"FastTD3 supports observation spaces {accepted} and Dict spaces of those (not nested), got {observation_space}"
        )
    if any(isinstance(space, spaces.Box) and space.shape == () for space in subspaces):
        raise ValueError(
            f"FastTD3 needs Box observations of at least one dimension, got a Box of shape () in {observation_space}: "
            "give it shape (1,) (e.g. gymnasium.wrappers.ReshapeObservation(env, (1,)) around a gymnasium env)"
        )


def check_env_spaces(env: GymEnv | str | None) -> None:
    """
    Raise if FastTD3 cannot learn from the spaces of ``env`` (an env id is checked once SB3 has made it).

    :param env: the environment given to FastTD3
    """
    if isinstance(env, VectorEnv):  # wrapped in a GymnasiumVecEnv by FastTD3
        check_spaces(env.single_observation_space, env.single_action_space)
    elif env is not None and not isinstance(env, str):
        _check_torch_vec_env_unwrapped(env)
        _check_vec_normalize_inside_transpose(env)
        check_spaces(env.observation_space, env.action_space)


def _check_vec_normalize_inside_transpose(env: GymEnv) -> None:
    """
    Refuse a ``VecNormalize`` inside SB3's ``VecTransposeImage``: its original observations, which the replay buffer
    stores, keep the channel-last images that the transpose outside it turns channel-first.
    """
    transposed, inner = False, env
    while isinstance(inner, VecEnvWrapper):
        transposed = transposed or isinstance(inner, VecTransposeImage)
        if transposed and isinstance(inner, VecNormalize):
            raise ValueError(
                "env has a VecNormalize inside a VecTransposeImage (which SB3 adds around channel-last images): the "
                "original observations the replay buffer stores would be channel-last. Transpose the images first: "
                "VecNormalize(VecTransposeImage(venv), ...), or give the env channel-first images"
            )
        inner = inner.venv


def _check_torch_vec_env_unwrapped(env: GymEnv) -> None:
    """Refuse a ``TorchVecEnv`` inside SB3's VecEnv wrappers, which work on NumPy arrays and fail on its tensors."""
    wrappers, inner = [], env
    while isinstance(inner, VecEnvWrapper):
        wrappers.append(type(inner).__name__)
        inner = inner.venv
    if wrappers and isinstance(inner, TorchVecEnv):
        hint = " (SB3 adds VecTransposeImage to channel-last images: give channel-first ones)" * (
            "VecTransposeImage" in wrappers
        )
        raise TypeError(
            f"env is a {type(inner).__name__} inside {', '.join(wrappers)}: SB3's VecEnv wrappers work on NumPy "
            "arrays, not on its tensors. Pass the TorchVecEnv itself (FastTD3 tracks its episodes on the device and "
            "normalizes observations with normalize_observations), or NumpyVecEnv(env) to make it a NumPy VecEnv"
            f"{hint}"
        )


def _normalizes_observations(env: GymEnv | str | None) -> bool:
    """Whether ``env`` is wrapped in a ``VecNormalize`` that normalizes observations."""
    vec_normalize = unwrap_vec_normalize(env) if isinstance(env, VecEnv) else None
    return vec_normalize is not None and vec_normalize.norm_obs


def resolve_normalize_observations(env: GymEnv | str | None, normalize_observations: bool | str) -> bool:
    """
    FastTD3's ``normalize_observations`` as a bool: ``"auto"`` normalizes unless a ``VecNormalize`` around ``env``
    already normalizes observations; asking for both is refused (observations would be normalized twice).

    :param env: the environment given to FastTD3
    :param normalize_observations: True, False or ``"auto"``
    :return: whether FastTD3 normalizes observations itself
    """
    if normalize_observations == "auto":
        return not _normalizes_observations(env)
    if not isinstance(normalize_observations, bool):
        raise ValueError(f"normalize_observations must be True, False or 'auto', got {normalize_observations!r}")
    if normalize_observations and _normalizes_observations(env):
        raise ValueError(VEC_NORMALIZE_ERROR)
    return normalize_observations


def check_finite(
    new_obs: np.ndarray | dict[str, np.ndarray], rewards: np.ndarray, final_obs: dict[int, Any], timestep: int
) -> None:
    """
    Refuse NaN or inf coming from the envs, before anything of the step is stored.

    :param new_obs: observations returned by the vector env's step (leading dimension n_envs)
    :param rewards: rewards of the step, shape (n_envs,)
    :param final_obs: true final observation of each env whose episode ended, by env index
    :param timestep: the model's timestep, for the message
    """
    n_envs = len(rewards)
    batched = {"reward": np.asarray(rewards), **_named_parts("observation", new_obs)}
    for name, array in batched.items():
        bad = ~np.isfinite(array.reshape(n_envs, -1)).all(axis=1)
        if bad.any():
            _raise_non_finite(name, int(np.flatnonzero(bad)[0]), timestep)
    for env_idx, terminal in final_obs.items():
        for name, array in _named_parts("terminal_observation", terminal).items():
            if not np.isfinite(array).all():
                _raise_non_finite(name, env_idx, timestep)


def check_device(device: th.device | str) -> None:
    """Refuse a device torch cannot parse, naming the accepted forms."""
    if isinstance(device, th.device) or device == "auto":
        return
    try:
        th.device(device)
    except (RuntimeError, TypeError) as error:
        raise ValueError(
            f"device must be 'auto', a device type ('cpu', 'cuda', 'mps'...), 'cuda:N' or a torch.device, got {device!r}"
        ) from error


def check_final_observations(final_obs: dict[int, Any], timestep: int) -> None:
    """
    Refuse a finished episode without its final observation, before anything of the step is stored: the next
    observation stored would otherwise be the reset observation of the next episode.

    :param final_obs: ``info["terminal_observation"]`` (None where missing) of each env whose episode ended
    :param timestep: the model's timestep, for the message
    """
    missing = [env_idx for env_idx, obs in final_obs.items() if obs is None]
    if missing:
        raise ValueError(
            f"Env {missing[0]} ended an episode at timestep {timestep} without info['terminal_observation']: FastTD3 "
            "stores the true final observation of every episode, which SB3's VecEnvs put there when they reset an "
            "env. Nothing of this step was stored; use a VecEnv that fills it (DummyVecEnv, SubprocVecEnv)."
        )


def check_finite_reset(obs: Any) -> None:
    """
    Refuse NaN or inf in the observations that ``reset()`` returned, before they reach the normalizer's statistics
    (which one non-finite value would spoil for good).

    :param obs: the observations of ``reset()`` (array or tensor, or a dict of them, leading dimension n_envs)
    """
    for name, value in _named_parts("observation", obs).items():
        rows = th.as_tensor(value)
        finite = th.isfinite(rows.reshape(rows.shape[0], -1)).all(dim=1)
        if not finite.all():
            raise ValueError(
                f"Env {int(th.nonzero(~finite)[0, 0])} returned a non-finite (NaN or inf) {name} from reset(): "
                "nothing was collected from it and the observation normalizer is unchanged. Fix the environment."
            )


def _raise_non_finite(name: str, env_idx: int, timestep: int) -> None:
    raise ValueError(
        f"Env {env_idx} returned a non-finite (NaN or inf) {name} at timestep {timestep}: "
        "nothing of this step was stored in the replay buffer. Fix the environment (or wrap it, e.g. with "
        "VecCheckNan to find the cause); the model and its buffer are intact and can be saved."
    )


def check_finite_actions(actions: np.ndarray, timestep: int) -> None:
    """
    Refuse NaN or inf in the actions about to be sent to the envs (a diverged actor), before the envs step.

    :param actions: the actions, leading dimension n_envs
    :param timestep: the model's timestep, for the message
    """
    bad = ~np.isfinite(actions.reshape(len(actions), -1)).all(axis=1)
    if bad.any():
        _raise_non_finite_action(int(np.flatnonzero(bad)[0]), timestep)


def _raise_non_finite_action(env_idx: int, timestep: int) -> None:
    raise ValueError(
        f"The action for env {env_idx} at timestep {timestep} is non-finite (NaN or inf): the actor's weights (or "
        "action_noise) diverged, not the environment. Nothing of this step was stored. Lower the learning rates, "
        "set max_grad_norm, or check that v_min/v_max cover the task's discounted returns."
    )


def check_finite_on_device(actions: Any, new_obs: Any, rewards: Any, final_obs: Any, timestep: int) -> None:
    """
    :func:`check_finite` and :func:`check_finite_actions` for tensors: one scalar read from the device when
    everything is finite.

    :param actions: the actions the envs were given (leading dimension n_envs)
    :param new_obs: observations (tensor or dict of tensors, leading dimension n_envs)
    :param rewards: rewards, shape (n_envs,)
    :param final_obs: the observations the step reached before any reset, like ``new_obs``
    :param timestep: the model's timestep, for the message
    """
    parts = {
        "action": actions,
        "reward": rewards,
        **_named_parts("observation", new_obs),
        **_named_parts("terminal_observation", final_obs),
    }
    rows_finite = {name: th.isfinite(value.reshape(value.shape[0], -1)).all(dim=1) for name, value in parts.items()}
    if th.stack([finite.all() for finite in rows_finite.values()]).all().item():
        return
    name, finite = next((name, finite) for name, finite in rows_finite.items() if not finite.all())
    env_idx = int(th.nonzero(~finite)[0, 0])
    if name == "action":  # checked first: NaN actions make the envs' outputs NaN too
        _raise_non_finite_action(env_idx, timestep)
    _raise_non_finite(name, env_idx, timestep)


def cpu_has_native_bf16() -> bool | None:
    """
    Whether this CPU multiplies bf16 natively (AVX512-BF16 or AMX), as PyTorch detects it;
    None when this PyTorch build cannot tell.
    """
    probes = [getattr(th.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    if any(probe is None for probe in probes):
        return None
    return any(probe() for probe in probes)  # type: ignore[misc]


def has_native_bf16(device: th.device) -> bool:
    """
    Whether ``device`` multiplies bf16 natively: a CUDA GPU of compute capability 8.0 or later (Ampere on), or a
    CPU with AVX512-BF16 or AMX. ``amp_dtype="auto"`` uses bf16 exactly there.
    """
    if device.type == "cuda":
        return th.cuda.is_available() and th.cuda.get_device_capability(device)[0] >= 8
    if device.type == "cpu":
        return cpu_has_native_bf16() is True
    return False


def warn_if_bf16_is_emulated(amp_dtype: str | None, device: th.device) -> None:
    """
    Warn when ``amp_dtype="bf16"`` runs on a CPU without native bf16 products: PyTorch then converts to fp32 and
    back, and training is slower than in fp32 (with native bf16 it is faster: benchmarks/results/update_throughput.md).
    """
    if amp_dtype == "bf16" and device.type == "cpu" and cpu_has_native_bf16() is False:
        warnings.warn(
            "amp_dtype='bf16' on a CPU without AVX512-BF16 or AMX: bf16 matrix products are emulated through fp32 "
            "and run slower than fp32 (amp_dtype=None) on this machine",
            UserWarning,
            stacklevel=2,
        )
