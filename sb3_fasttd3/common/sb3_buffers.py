"""
SB3's own replay buffers (``ReplayBuffer``, ``DictReplayBuffer``, ``NStepReplayBuffer``, ``HerReplayBuffer``) in
FastTD3's loop, beside :class:`~sb3_fasttd3.common.buffers.DeviceNStepReplayBuffer`: the arguments each takes from
the algorithm, how a vector step is stored in one, and how one is ended or put back after a load.
"""

import warnings
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.her.her_replay_buffer import HerReplayBuffer

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer

AnyReplayBuffer = ReplayBuffer | DeviceNStepReplayBuffer
# The buffers of n-step returns, which take the algorithm's n_steps and gamma
N_STEP_BUFFERS = (DeviceNStepReplayBuffer, NStepReplayBuffer)
ACCEPTED_CLASSES = (
    "DeviceNStepReplayBuffer (the default), or SB3's ReplayBuffer, DictReplayBuffer, NStepReplayBuffer or HerReplayBuffer"
)
# What HerReplayBuffer says when it ends an episode, written for a buffer loaded while its episode goes on
HER_TRUNCATION_WARNING = "The last trajectory in the replay buffer will be truncated"


def buffer_arguments(buffer_class: Any, n_steps: int, gamma: float, env: VecEnv | None) -> dict[str, Any]:
    """
    The arguments FastTD3 gives ``buffer_class`` beside SB3's common ones: ``n_steps`` and ``gamma`` to buffers of
    n-step returns, the env to ``HerReplayBuffer`` (which relabels goals with ``env.compute_reward``).

    :param buffer_class: the ``replay_buffer_class`` to check
    :param n_steps: the algorithm's ``n_steps``: other buffers store one-step transitions, so it must be 1 for them
    :param gamma: the algorithm's discount
    :param env: the algorithm's env
    :raises ValueError: a class that is no replay buffer, ``n_steps > 1`` with a one-step buffer, HER without env
    """
    if not (isinstance(buffer_class, type) and issubclass(buffer_class, (ReplayBuffer, DeviceNStepReplayBuffer))):
        raise ValueError(f"replay_buffer_class must be {ACCEPTED_CLASSES} (or a subclass), got {buffer_class!r}")
    if issubclass(buffer_class, N_STEP_BUFFERS):
        return dict(n_steps=n_steps, gamma=gamma)
    name = buffer_class.__name__
    if n_steps != 1:
        raise ValueError(
            f"n_steps={n_steps} needs a replay buffer of n-step returns, and replay_buffer_class={name} stores one-step "
            "transitions: give n_steps=1, or a DeviceNStepReplayBuffer (the default) or SB3's NStepReplayBuffer"
        )
    if issubclass(buffer_class, HerReplayBuffer):
        if env is None:
            raise ValueError(
                f"replay_buffer_class={name} relabels goals with the env's compute_reward: pass env (to load a model, "
                "FastTD3.load(path, env=env))"
            )
        return dict(env=env)
    return {}


def _to_numpy(value: th.Tensor | dict[str, th.Tensor]) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(value, dict):
        return {key: part.cpu().numpy() for key, part in value.items()}
    return value.cpu().numpy()


def add_step(
    buffer: AnyReplayBuffer,
    obs: th.Tensor | dict[str, th.Tensor],
    next_obs: th.Tensor | dict[str, th.Tensor],
    actions: th.Tensor,
    rewards: np.ndarray,
    dones: np.ndarray,
    infos: list[dict[str, Any]],
    truncated: np.ndarray,
) -> None:
    """
    Store one vector step: as tensors in FastTD3's buffer, with the truncations read from the infos; as NumPy
    arrays in SB3's, which live on the host and read the truncations from the infos themselves.
    """
    if isinstance(buffer, DeviceNStepReplayBuffer):
        buffer.add(obs, next_obs, actions, rewards, dones, infos, truncated=truncated)  # type: ignore[arg-type]
    else:
        buffer.add(_to_numpy(obs), _to_numpy(next_obs), _to_numpy(actions), rewards, dones, infos)  # type: ignore[arg-type]


def end_open_episodes(buffer: AnyReplayBuffer, quiet: bool = False) -> None:
    """
    End the episodes the newest stored transitions belong to, as truncated: the envs are reset (or were, since the
    buffer was saved), so the transitions stored next do not follow them. FastTD3's buffer closes its n-step
    windows; SB3's ``NStepReplayBuffer`` marks its newest unfinished rows truncated, so that their windows stop
    there and bootstrap from their own next observation (as it does while sampling); ``HerReplayBuffer`` ends its
    episodes, so that no relabelled goal comes from another one; SB3's memory-lean ``ReplayBuffer`` marks its
    newest row done, as SB3 does, since its next observation will be overwritten by a reset one.

    :param quiet: silence ``HerReplayBuffer``'s warning, written for a buffer loaded while its episode goes on
    """
    if isinstance(buffer, DeviceNStepReplayBuffer):
        buffer.close_windows()
    elif isinstance(buffer, NStepReplayBuffer):
        if buffer.full or buffer.pos > 0:
            newest = (buffer.pos - 1) % buffer.buffer_size
            buffer.timeouts[newest] = np.logical_or(buffer.timeouts[newest], np.logical_not(buffer.dones[newest]))
    elif isinstance(buffer, HerReplayBuffer):
        with warnings.catch_warnings():
            if quiet:
                warnings.filterwarnings("ignore", message=HER_TRUNCATION_WARNING)
            buffer.truncate_last_trajectory()
    elif buffer.optimize_memory_usage and (buffer.full or buffer.pos > 0):
        buffer.dones[(buffer.pos - 1) % buffer.buffer_size] = True


def attach(buffer: AnyReplayBuffer, env: VecEnv | None, device: th.device) -> None:
    """
    Make a buffer the model's: on its device (SB3's buffers keep their arrays on the host and only sample to it)
    and, for ``HerReplayBuffer``, bound to the model's env, which a pickled one does not hold and ``set_env``
    replaces (HER computes the relabelled rewards with it).
    """
    if isinstance(buffer, DeviceNStepReplayBuffer):
        buffer.to(device)
        return
    if isinstance(buffer, HerReplayBuffer):
        if env is None:
            raise ValueError(f"A {type(buffer).__name__} needs the env it relabels goals with: load the model with env=...")
        buffer.env = None  # HER's set_env refuses to replace an env
        buffer.set_env(env)
    buffer.device = device


def saved_returns(buffer: AnyReplayBuffer, gamma: float) -> tuple[int, float]:
    """The ``(n_steps, gamma)`` of the returns ``buffer`` samples; a one-step buffer's do not depend on ``gamma``."""
    if isinstance(buffer, N_STEP_BUFFERS):
        return buffer.n_steps, buffer.gamma
    return 1, gamma
