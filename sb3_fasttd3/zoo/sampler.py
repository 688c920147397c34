"""Optuna search space of FastTD3 for the RL Zoo (``python -m rl_zoo3.train --algo fasttd3 -optimize``)."""

from typing import TYPE_CHECKING, Any

import torch as th

if TYPE_CHECKING:
    import optuna

# Actor and critic hidden sizes by name; "large" is the paper's GPU setting
NET_ARCHS = {
    "small": dict(pi=[64, 64], qf=[128, 128]),
    "medium": dict(pi=[256, 256], qf=[256, 256]),
    "large": dict(pi=[512, 256, 128], qf=[1024, 512, 256]),
}
# The discounts searched, from short horizons (0.9) to very long ones (0.9999)
GAMMAS = [0.9, 0.95, 0.98, 0.99, 0.995, 0.999, 0.9999]
# Steps over which the exploration noise is correlated (None: white noise, drawn anew at every step)
NOISE_CORRELATIONS = [None, 5.0, 20.0, 50.0]


def sample_fasttd3_params(trial: "optuna.Trial", n_actions: int, n_envs: int, additional_args: dict) -> dict[str, Any]:
    """
    Sample FastTD3 hyperparameters (the Zoo's ``HYPERPARAMS_SAMPLER`` signature).

    The critic's support is sampled as its upper end ``v_max`` and the share of it below zero
    (``v_min = -v_min_ratio * v_max``). Exploration noise is FastTD3's own mixed noise
    (``std_min``, ``std_max``, ``noise_correlation``): an SB3 ``action_noise`` of the entry is dropped, as the Zoo's
    TD3 sampler replaces it with its own. The critics may take LayerNorm (``critic_layer_norm``), as the
    ``terminating`` Zoo setting does. With a ``HerReplayBuffer`` the returns are one-step and HER's own
    parameters are searched as for the Zoo's TD3.

    :param trial: the Optuna trial
    :param n_actions: action dimension (unused: the noise is per env, not per action)
    :param n_envs: number of environments (unused: counts are in transitions, over all envs)
    :param additional_args: the Zoo's extra arguments (``using_her_replay_buffer``, ``her_kwargs``)
    :return: keyword arguments for :class:`~sb3_fasttd3.FastTD3`
    """
    using_her = additional_args.get("using_her_replay_buffer", False)
    # Each model compiles its own code (no recompile limit across trials); drop the graphs of the finished trials
    th._dynamo.reset()
    trial.suggest_categorical("gamma", GAMMAS)
    trial.suggest_float("learning_rate", 1e-4, 1e-3, log=True)
    trial.suggest_int("batch_size_pow", 7, 12)
    trial.suggest_int("gradient_steps", 1, 8)
    trial.suggest_int("policy_delay", 1, 4)
    trial.suggest_float("tau", 0.002, 0.2, log=True)
    if not using_her:  # HER relabels one-step transitions
        trial.suggest_int("n_steps", 1, 5)
    trial.suggest_categorical("num_atoms", [51, 101, 251])
    trial.suggest_float("v_max", 10.0, 3000.0, log=True)
    trial.suggest_categorical("v_min_ratio", [0.1, 1.0])
    trial.suggest_float("std_min", 0.001, 0.1, log=True)
    trial.suggest_float("std_max", 0.1, 0.8)
    trial.suggest_categorical("noise_correlation", NOISE_CORRELATIONS)
    trial.suggest_categorical("net_arch", list(NET_ARCHS))
    trial.suggest_categorical("critic_layer_norm", [False, True])
    trial.set_user_attr("batch_size", 2 ** trial.params["batch_size_pow"])
    her = {}
    if using_her:
        from rl_zoo3.hyperparams_opt import sample_her_params

        her = sample_her_params(trial, {}, additional_args["her_kwargs"])  # the entry's HER arguments, two searched
    return {**convert_fasttd3_params(trial.params), **her}


def convert_fasttd3_params(sampled_params: dict[str, Any]) -> dict[str, Any]:
    """
    Turn the sampled values (``trial.params``) into FastTD3 keyword arguments (``HYPERPARAMS_CONVERTER``).

    :param sampled_params: values named as in :func:`sample_fasttd3_params`
    :return: keyword arguments for :class:`~sb3_fasttd3.FastTD3`
    """
    hyperparams = dict(sampled_params)
    hyperparams["batch_size"] = 2 ** hyperparams.pop("batch_size_pow")
    hyperparams["v_min"] = -hyperparams.pop("v_min_ratio") * hyperparams["v_max"]
    net_arch = NET_ARCHS[hyperparams.pop("net_arch")]
    # Trials of a study begun before the space had LayerNorm critics did not sample it: plain MLP critics
    hyperparams["policy_kwargs"] = dict(net_arch=net_arch, layer_norm=hyperparams.pop("critic_layer_norm", False))
    # The sampled learning_rate is both networks' (an entry's own actor or critic rate would override it), and the
    # mixed noise searched acts only without an SB3 action_noise
    hyperparams.update(actor_learning_rate=None, critic_learning_rate=None, action_noise=None)
    # HER's arguments, searched by the Zoo's own HER sampler; HER relabels one-step transitions
    her = {key: hyperparams.pop(key) for key in ("n_sampled_goal", "goal_selection_strategy") if key in hyperparams}
    if her:
        hyperparams.update(replay_buffer_kwargs=her, n_steps=1)
    return hyperparams
