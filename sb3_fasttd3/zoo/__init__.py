"""RL Baselines3 Zoo integration: registration of ``--algo fasttd3`` and its Optuna sampler."""

from sb3_fasttd3.zoo.registration import ALGO_NAME, patch_module, register
from sb3_fasttd3.zoo.sampler import NET_ARCHS, convert_fasttd3_params, sample_fasttd3_params

__all__ = ["ALGO_NAME", "NET_ARCHS", "convert_fasttd3_params", "patch_module", "register", "sample_fasttd3_params"]
