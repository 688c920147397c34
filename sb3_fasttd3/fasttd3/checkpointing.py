"""Checkpoints of a whole training run, to resume it exactly: FastTD3's ``save_checkpoint`` and ``load_checkpoint``."""

import io
import os
import pathlib
import pickle
from collections.abc import Callable
from functools import partial
from typing import Any, TypeVar

import torch as th
from stable_baselines3.common.off_policy_algorithm import OffPolicyAlgorithm
from stable_baselines3.common.save_util import load_from_pkl
from stable_baselines3.common.type_aliases import GymEnv
from stable_baselines3.common.vec_env import DummyVecEnv

from sb3_fasttd3.common import checkpoints as ckpt
from sb3_fasttd3.common import sb3_buffers
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.noise import MixedGaussianNoise

SelfCheckpointing = TypeVar("SelfCheckpointing", bound="Checkpointing")


def _identity(env: Any) -> Any:
    return env


class Checkpointing(OffPolicyAlgorithm):
    """
    Save and load everything a run needs to go on exactly: the model, the replay buffer, the exploration noise,
    every RNG and, where they pickle, the envs (the file format is :mod:`sb3_fasttd3.common.checkpoints`'); and
    load a replay buffer saved alone, checked and re-laid for the model.
    """

    # The state a checkpoint holds beyond SB3's, set up by the algorithm
    replay_buffer: DeviceNStepReplayBuffer  # type: ignore[assignment]
    exploration_noise: MixedGaussianNoise | None
    _make_exploration_noise: Callable[..., MixedGaussianNoise]

    def save_checkpoint(self, path: str | os.PathLike) -> str:
        """
        Save everything training needs to resume exactly (see ``docs/checkpoints.md``) into one file, atomically:
        a crash during the save leaves any previous file at ``path`` intact. Resume with :meth:`load_checkpoint`.

        :param path: the checkpoint file (a zip; no extension is added)
        :return: the path written
        :raises NotImplementedError: in data-parallel training, whose replay buffers are one per rank
        """
        if getattr(self, "_data_parallel", None) is not None:
            raise NotImplementedError(
                "save_checkpoint does not support data-parallel training yet (each rank holds its own replay buffer): "
                "save the model with model.save() (rank 0 writes it) and resume from it"
            )
        model = io.BytesIO()
        self.save(model)
        envs, env_rngs = ckpt.capture_envs(self.env)
        noise = self.exploration_noise
        state = {
            "rngs": ckpt.capture_global_rngs(),
            "action_space_rng": ckpt.generator_state(self.action_space.np_random),
            "env_rngs": env_rngs,
            "exploration_sigmas": None if noise is None else noise.sigmas.detach().cpu().clone(),
            "exploration_unit": None if noise is None or noise.unit is None else noise.unit.detach().cpu().clone(),
        }
        members = {ckpt.MODEL: model.getvalue(), ckpt.STATE: ckpt.tensors_to_bytes(state)}
        members[ckpt.BUFFER] = pickle.dumps(self.replay_buffer, protocol=pickle.HIGHEST_PROTOCOL)
        if envs is not None:
            members[ckpt.ENVS] = envs
        manifest = {"num_timesteps": self.num_timesteps, "envs": "full" if envs else "rng" if env_rngs else "none"}
        return str(ckpt.write_checkpoint(path, members, manifest))

    @classmethod
    def load_checkpoint(
        cls: type[SelfCheckpointing],
        path: str | os.PathLike,
        env: GymEnv | None = None,
        device: th.device | str = "auto",
        **kwargs: Any,
    ) -> SelfCheckpointing:
        """
        Load a checkpoint written by :meth:`save_checkpoint` (or ``FastTD3CheckpointCallback``), ready to go on with
        ``model.learn(total_timesteps - model.num_timesteps, reset_num_timesteps=False)``.

        When the checkpoint holds the envs (in-process ``DummyVecEnv`` envs that pickle), they are put into ``env``
        (or, with ``env=None``, into a new ``DummyVecEnv``) and training continues from the very step it was saved
        at. Otherwise the envs' ``np_random`` states are restored where captured and the envs are reset when
        training resumes (the newest n-step windows are closed, as after ``load_replay_buffer``).

        :param path: the checkpoint file
        :param env: the env to train on, with the checkpoint's spaces; with another number of envs, the replay
            buffer is re-laid for it (as by :meth:`load_replay_buffer`) and the envs are reset
        :param device: device of the model
        :param kwargs: passed to :meth:`load`; they may not change what the replay buffer holds (``n_steps``,
            ``gamma``, ``handle_timeout_termination``)
        :return: the model, its replay buffer, exploration noise, RNGs and envs restored
        :raises CheckpointError: (a ``ValueError``) the file is missing, truncated, corrupted or not a checkpoint
        :raises ValueError: ``env`` or ``kwargs`` disagree with the checkpoint's replay buffer, or ``env=None`` with
            envs saved in VecEnv wrappers
        :raises NotImplementedError: in data-parallel training
        """
        _, members = ckpt.read_checkpoint(path)
        envs_bytes = members.get(ckpt.ENVS)
        saved_envs = None if env is not None or envs_bytes is None else ckpt.load_envs(envs_bytes)
        if saved_envs is not None and saved_envs["wrappers"]:
            raise ValueError(
                f"The checkpoint's envs were wrapped in {[name for name, _ in saved_envs['wrappers']]}, which env=None "
                "cannot rebuild: pass env= new envs in VecEnv wrappers of the same types, in the same order (their "
                "state is restored into them). The checkpoint was not loaded."
            )
        try:
            state = ckpt.tensors_from_bytes(members[ckpt.STATE])
            if saved_envs is not None:
                env = DummyVecEnv([partial(_identity, saved) for saved in saved_envs["envs"]])
            model = cls.load(io.BytesIO(members[ckpt.MODEL]), env=env, device=device, force_reset=False, **kwargs)
            replay_buffer = pickle.loads(members[ckpt.BUFFER])
        except Exception as error:
            raise ckpt.CheckpointError(f"Cannot load the checkpoint {path}: {type(error).__name__}: {error}") from error
        if getattr(model, "_data_parallel", None) is not None:
            raise NotImplementedError(
                "load_checkpoint does not support data-parallel training yet: a checkpoint holds one process's replay "
                "buffer, envs and random states, so every rank would collect the same data. Load the model with "
                "FastTD3.load(path, env=env) on every rank and resume from it"
            )
        # Checked (and re-laid for another number of envs) before anything of the given env is replaced
        source, kept = f"The replay buffer of the checkpoint {path}", "The checkpoint was not loaded."
        model._adopt_replay_buffer(replay_buffer, source, end_episodes=False, kept=kept)
        exact = model.env is not None and ckpt.restore_envs(model.env, envs_bytes, state["env_rngs"])
        if not exact:
            model._last_obs = None  # type: ignore[assignment]  # learn() resets the envs
            sb3_buffers.end_open_episodes(model.replay_buffer, quiet=True)
        if state["exploration_sigmas"] is not None:
            noise = model._make_exploration_noise(n_envs=len(state["exploration_sigmas"]))
            noise.sigmas.copy_(state["exploration_sigmas"])
            if noise.unit is not None and state.get("exploration_unit") is not None:
                noise.unit.copy_(state["exploration_unit"])
            model.exploration_noise = noise
        model.action_space._np_random = ckpt.make_generator(state["action_space_rng"])
        # Last: building the model above draws from the global RNGs
        ckpt.restore_global_rngs(state["rngs"])
        return model

    def save_replay_buffer(self, path: str | pathlib.Path | io.BufferedIOBase) -> None:
        """
        Save the replay buffer (see SB3's ``save_replay_buffer``). In data-parallel training each rank holds its own:
        rank 0 writes its buffer to a path and the other ranks return without writing, as ``save()`` does (a file
        object is still written); :meth:`load_replay_buffer` on every rank then starts each from rank 0's.
        """
        data_parallel = getattr(self, "_data_parallel", None)
        if data_parallel is not None and data_parallel.rank != 0 and isinstance(path, (str, pathlib.Path)):
            return
        super().save_replay_buffer(path)

    def load_replay_buffer(self, path: Any, truncate_last_traj: bool = True) -> None:
        """
        Load a replay buffer saved with :meth:`save_replay_buffer`, moving it to this model's device. A
        :class:`DeviceNStepReplayBuffer` saved with another number of envs, or in the other layout
        (``optimize_memory_usage``), is re-laid for this model
        (:meth:`~sb3_fasttd3.common.buffers.DeviceNStepReplayBuffer.relaid`): every stored transition is kept, in
        storage for at least this model's ``buffer_size``, and its windows are closed. SB3's buffers load as in SB3
        (``HerReplayBuffer`` with this model's env), with this model's number of envs only. The observation and
        action spaces, ``handle_timeout_termination``, ``n_steps`` and ``gamma`` must be the model's; on any error
        the model keeps its current buffer.

        :param path: path to the pickled replay buffer
        :param truncate_last_traj: End the episodes (and n-step windows) of the newest transitions there, as if
            they were truncated (as SB3 does), so that nothing reaches into the transitions collected next. Leave it
            True unless training resumes from the very env state the buffer was saved with.
        """
        replay_buffer = load_from_pkl(path, self.verbose)
        if not isinstance(replay_buffer, sb3_buffers.AnyReplayBuffer):
            raise TypeError(f"Expected a replay buffer in {path}, got {type(replay_buffer).__name__}")
        self._adopt_replay_buffer(replay_buffer, f"The replay buffer in {path}", truncate_last_traj)

    def _adopt_replay_buffer(
        self,
        replay_buffer: Any,
        source: str,
        end_episodes: bool,
        kept: str = "The model's current buffer was kept.",
    ) -> None:
        """
        Make a saved replay buffer this model's: check that it holds what the model learns from, re-lay it for the
        model's number of envs and layout where it can be, move it to the model's device.

        :param replay_buffer: the unpickled buffer
        :param source: where it comes from, for the errors (e.g. ``"The replay buffer in path"``)
        :param end_episodes: end the episodes of its newest transitions (the envs do not go on from them)
        :param kept: what the errors say was left as it was
        :raises ValueError: a buffer of other spaces, timeout handling, returns, or (SB3's) number of envs
        """
        handle_timeout = self.replay_buffer_kwargs.get("handle_timeout_termination", True)
        for name, saved, ours in (
            ("observation_space", replay_buffer.observation_space, self.observation_space),
            ("action_space", replay_buffer.action_space, self.action_space),
            ("handle_timeout_termination", replay_buffer.handle_timeout_termination, handle_timeout),
        ):
            if saved != ours:
                raise ValueError(
                    f"{source} has {name}={saved} but the model has {name}={ours}: load it into a "
                    f"model with the same {name}. {kept}"
                )
        n_steps, gamma = sb3_buffers.saved_returns(replay_buffer, self.gamma)
        if (n_steps, gamma) != (self.n_steps, self.gamma):
            raise ValueError(
                f"{source} holds returns over n_steps={n_steps} with gamma={gamma}, but the model "
                f"has n_steps={self.n_steps}, gamma={self.gamma}: load it into a model with the same n_steps and gamma. "
                f"{kept}"
            )
        lean = self.optimize_memory_usage
        if not isinstance(replay_buffer, DeviceNStepReplayBuffer):
            if replay_buffer.n_envs != self.n_envs:
                raise ValueError(
                    f"{source} was saved with n_envs={replay_buffer.n_envs}, but the model has "
                    f"n_envs={self.n_envs}: SB3's {type(replay_buffer).__name__} cannot be re-laid for another number "
                    f"of envs (a DeviceNStepReplayBuffer can). {kept}"
                )
        elif (replay_buffer.n_envs, replay_buffer.optimize_memory_usage, replay_buffer.buffer_size) != (
            self.n_envs,
            lean,
            max(self.buffer_size // self.n_envs, 1),  # the rows of a buffer of the model's buffer_size
        ):
            replay_buffer = replay_buffer.relaid(self.n_envs, buffer_size=self.buffer_size, optimize_memory_usage=lean)
        sb3_buffers.attach(replay_buffer, self.env, self.device)
        if end_episodes:
            sb3_buffers.end_open_episodes(replay_buffer)
        self.replay_buffer = replay_buffer  # type: ignore[assignment]
