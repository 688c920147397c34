"""What the ranks of a data-parallel ``learn()`` must agree on, checked on every rank before the first collective."""

from typing import TYPE_CHECKING, Any

import torch as th
from stable_baselines3.common.type_aliases import TrainFreq, TrainFrequencyUnit

from sb3_fasttd3.common.distributed import DataParallel

if TYPE_CHECKING:
    from sb3_fasttd3.fasttd3.fasttd3 import FastTD3

# A rank that differs in one of these runs another number of collectives (a hang or an abort) or other updates
RANK_HYPERPARAMETERS = (
    "batch_size",
    "gradient_steps",
    "policy_delay",
    "learning_starts",
    "gamma",
    "tau",
    "n_steps",
    "target_policy_noise",
    "target_noise_clip",
    "use_cdq",
    "actor_q",
    "n_step_start",
    "n_step_max_noise",
    "max_grad_norm",
    "amp_dtype",
    "_n_updates",
)
# Longer values are named, not shown, in the error
SHOWN_LENGTH = 80


def rank_settings(model: "FastTD3", total_timesteps: int, reset_num_timesteps: bool) -> dict[str, Any]:
    """The settings of ``model.learn(total_timesteps, reset_num_timesteps=...)`` that every rank must share."""
    optimizers = (model.actor.optimizer, model.critic.optimizer)
    return {
        **{name: getattr(model, name) for name in RANK_HYPERPARAMETERS},
        "train_freq": tuple(model.train_freq),  # type: ignore[arg-type]  # a TrainFreq by now
        "total_timesteps": total_timesteps,
        "num_timesteps": 0 if reset_num_timesteps else model.num_timesteps,
        "learning rates": [schedule(progress) for schedule in model._learning_rate_schedules() for progress in (1, 0.5, 0)],
        "the policy's parameters and buffers": [
            (name, tuple(t.shape), t.dtype) for name, t in model.policy.state_dict().items()
        ],
        "the optimizers' settings": [
            {key: value for key, value in group.items() if key != "params"} for opt in optimizers for group in opt.param_groups
        ],
        "the optimizers' states": [
            (key, tuple(value.shape))
            for optimizer in optimizers
            for state in optimizer.state.values()
            for key, value in state.items()
            if isinstance(value, th.Tensor)
        ],
    }


def check_ranks(model: "FastTD3", data_parallel: DataParallel, total_timesteps: int, reset_num_timesteps: bool) -> None:
    """
    Refuse, on every rank alike, a data-parallel ``learn()`` whose ranks would fall out of step: episodes counted
    by ``train_freq``, another ``n_envs`` or any other of :func:`rank_settings` on some rank, or a ``VecNormalize``
    that updates its own statistics.
    """
    assert isinstance(model.train_freq, TrainFreq)  # converted by _setup_model
    if model.train_freq.unit != TrainFrequencyUnit.STEP:
        raise ValueError(
            f"train_freq={tuple(model.train_freq)} counts episodes, which end at different steps on each rank: "
            "distributed training needs a number of steps, e.g. train_freq=1"
        )
    if not data_parallel.all_equal(model.n_envs):
        raise ValueError(
            f"Every rank must step the same number of envs (this rank, {data_parallel.rank}, has n_envs="
            f"{model.n_envs}): the ranks update together, once per vector step"
        )
    settings = rank_settings(model, total_timesteps, reset_num_timesteps)
    differing = data_parallel.differing(settings)
    if differing:
        values = {name: repr(settings[name]) for name in differing}
        shown = ", ".join(f"{name}={value}" for name, value in values.items() if len(value) <= SHOWN_LENGTH)
        raise ValueError(
            f"The ranks disagree on {', '.join(differing)} (this rank, {data_parallel.rank}: {shown or 'not shown'}): "
            "every rank must build the same model (the same hyperparameters, or the same saved model loaded) and call "
            "learn() with the same arguments, since the ranks update together, once per vector step"
        )
    vec_normalize = model.get_vec_normalize_env()
    updating = vec_normalize is not None and vec_normalize.training and (vec_normalize.norm_obs or vec_normalize.norm_reward)
    if not data_parallel.all_true(not updating):
        raise ValueError(
            "A VecNormalize that updates its statistics (training=True) would normalize differently on each rank, "
            "each from its own envs: remove it (normalize_observations=True merges every rank's observations) or "
            "freeze the same statistics on every rank (VecNormalize.load(...), then training=False)"
        )
