"""The checks of FastTD3's hyperparameters, run before any component is built: each error names the parameter."""

import warnings
from typing import TYPE_CHECKING

import torch as th
from stable_baselines3.common.noise import ActionNoise

from sb3_fasttd3.common.buffers import check_return_parameters
from sb3_fasttd3.common.distributional import check_support
from sb3_fasttd3.common.noise import check_noise_correlation, check_noise_scales
from sb3_fasttd3.common.utils import is_integer, is_number
from sb3_fasttd3.fasttd3.checks import warn_if_bf16_is_emulated

if TYPE_CHECKING:
    from sb3_fasttd3.fasttd3.fasttd3 import FastTD3

# Mixed precision: the name accepted by ``amp_dtype`` and the torch dtype of the autocast regions
# ("auto" resolves to "bf16" or None per device, see ``_setup_fast_path``)
AMP_DTYPES = {None: None, "bf16": th.bfloat16, "fp16": th.float16}
AMP_CHOICES = [*AMP_DTYPES, "auto"]
# How FastTD3 acts before learning_starts: uniform random actions (SB3), or the initial actor with its noise
WARMUP_ACTIONS = ["uniform", "actor"]
# Which critics the actor's loss reads: all of them (the reference), or the first only (SB3's TD3)
ACTOR_Q = ["all", "q1"]
# Hyperparameters compared as numbers; checked to be numbers first, so that a string fails with a ValueError naming it
NUMERIC_HYPERPARAMETERS = (
    "gamma",
    "tau",
    "learning_starts",
    "target_policy_noise",
    "target_noise_clip",
    "std_min",
    "std_max",
    "v_min",
    "v_max",
    "epsilon",
)
# Hyperparameters that must be integers (NumPy's accepted, made Python ints for torch's shape arguments)
INTEGER_HYPERPARAMETERS = ("batch_size", "policy_delay", "gradient_steps", "n_step_start", "n_steps")
# YAML 1.1 (PyYAML, the RL Zoo's files) reads a float written without a dot, such as 1e-3, as a string
YAML_FLOAT_HINT = " (a string: YAML reads a float without a dot, such as 1e-3, as one; write 1.0e-3 or !!float 1e-3)"


def check_action_noise(model: "FastTD3") -> None:
    """
    Raise a ``ValueError`` unless ``model.action_noise`` is None or an SB3 ``ActionNoise`` that no setting of the
    mixed exploration noise (which it replaces) is given beside; run again by ``learn()``, as SB3 lets the
    attribute be set after construction.

    :param model: a FastTD3 model
    """
    action_noise = model.action_noise
    if action_noise is None:
        return
    if not isinstance(action_noise, ActionNoise):
        raise ValueError(
            f"action_noise must be None (FastTD3's mixed noise) or an SB3 ActionNoise, e.g. "
            f"NormalActionNoise(mean=np.zeros(n), sigma=0.1 * np.ones(n)), got {action_noise!r}"
        )
    if model.noise_correlation is not None:
        raise ValueError(
            "noise_correlation shapes the mixed exploration noise, which action_noise replaces: give one of them "
            "(an SB3 OrnsteinUhlenbeckActionNoise as action_noise is the SB3 way to correlated noise)"
        )
    if model.stratified_noise:
        raise ValueError("stratified_noise shapes the mixed exploration noise, which action_noise replaces: give one of them")
    if model.n_step_max_noise is not None:
        raise ValueError(
            "n_step_max_noise reads the scales of the mixed exploration noise, which action_noise replaces: give one of them"
        )


def check_hyperparameters(model: "FastTD3") -> None:
    """
    Raise a ``ValueError`` naming the first hyperparameter of ``model`` out of its accepted values, and those values.

    :param model: a FastTD3 model whose arguments are set and whose components are not built yet
    """

    def require(ok: bool, name: str, accepted: str) -> None:
        if not ok:
            value = getattr(model, name)
            raise ValueError(f"{name} must be {accepted}, got {value!r}" + (YAML_FLOAT_HINT if isinstance(value, str) else ""))

    for name in NUMERIC_HYPERPARAMETERS:
        require(is_number(getattr(model, name)), name, "a number")
    # The components' own rules, checked before any of them is built
    check_support(model.v_min, model.v_max, model.num_atoms)
    check_return_parameters(model.n_steps, model.gamma)
    check_noise_scales(model.std_min, model.std_max)
    check_noise_correlation(model.noise_correlation)
    require(
        model.n_step_max_noise is None or (is_number(model.n_step_max_noise) and model.n_step_max_noise >= 0),
        "n_step_max_noise",
        "None or a float >= 0",
    )
    check_action_noise(model)
    for name in ("learning_rate", "actor_learning_rate", "critic_learning_rate"):
        rate = getattr(model, name)
        # 0 is accepted, as SB3 does: the RL Zoo's enjoy loads models with learning_rate=0.0
        accepted = "a float >= 0 or a schedule (a callable of the remaining progress)" + (
            ", or None (learning_rate)" if name != "learning_rate" else ""
        )
        require(
            callable(rate) or (rate is None and name != "learning_rate") or (is_number(rate) and rate >= 0),
            name,
            accepted,
        )
    require(0.0 <= model.tau <= 1.0, "tau", "in [0, 1]")
    average_tau = model.actor_average_tau
    require(
        average_tau is None or (is_number(average_tau) and 0.0 < average_tau <= 1.0),
        "actor_average_tau",
        "None or a float in (0, 1]",
    )
    require(is_integer(model.batch_size) and model.batch_size >= 1, "batch_size", "an integer >= 1")
    require(is_integer(model.policy_delay) and model.policy_delay >= 1, "policy_delay", "an integer >= 1")
    require(is_integer(model.gradient_steps) and model.gradient_steps >= -1, "gradient_steps", "an integer >= -1")
    frequency = model.train_freq[0] if isinstance(model.train_freq, tuple) else model.train_freq
    require(is_integer(frequency) and frequency >= 1, "train_freq", "an integer >= 1 or a tuple (n >= 1, 'step' | 'episode')")
    require(model.learning_starts >= 0, "learning_starts", "an integer >= 0")
    require(is_integer(model.n_step_start) and model.n_step_start >= 0, "n_step_start", "an integer >= 0")
    require(model.target_policy_noise >= 0.0, "target_policy_noise", "a float >= 0")
    require(model.target_noise_clip >= 0.0, "target_noise_clip", "a float >= 0")
    require(
        model.max_grad_norm is None or (is_number(model.max_grad_norm) and model.max_grad_norm > 0),
        "max_grad_norm",
        "None or a float > 0",
    )
    require(model.clip_obs is None or (is_number(model.clip_obs) and model.clip_obs > 0), "clip_obs", "None or a float > 0")
    require(model.epsilon > 0, "epsilon", "a float > 0")
    for name in ("use_cdq", "use_target_actor", "compile", "epsilon_on_std", "stratified_noise"):
        require(isinstance(getattr(model, name), bool), name, "True or False")
    require(model.actor_q in ACTOR_Q, "actor_q", f"one of {ACTOR_Q}")
    require(model.warmup_actions in WARMUP_ACTIONS, "warmup_actions", f"one of {WARMUP_ACTIONS}")
    require(model.amp_dtype in AMP_CHOICES, "amp_dtype", f"one of {AMP_CHOICES}")
    if model.amp_dtype == "fp16" and model.device.type != "cuda":
        if not model._loading:
            raise ValueError("amp_dtype='fp16' needs a CUDA device; use amp_dtype='bf16' on the CPU")
        # A model trained in fp16 still loads anywhere, to predict, deploy or train on (in fp16 again on CUDA)
        warnings.warn(f"amp_dtype='fp16' needs a CUDA device: the model loaded on {model.device} runs in fp32")
    warn_if_bf16_is_emulated(model.amp_dtype, model.device)
    set_by_the_algorithm = sorted(
        {"optimize_memory_usage", "n_envs", "n_steps", "gamma", "env"} & set(model.replay_buffer_kwargs)
    )
    if set_by_the_algorithm:
        raise ValueError(
            f"replay_buffer_kwargs must not contain {set_by_the_algorithm}: FastTD3 passes these to the buffer from "
            "its own arguments of the same names"
        )
    # buffer_size is checked against n_envs * (n_steps + 1) by the replay buffer, created next
