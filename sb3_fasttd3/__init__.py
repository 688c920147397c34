"""FastTD3 for Stable-Baselines3."""

from sb3_fasttd3.fasttd3 import CnnPolicy, FastTD3, FastTD3Policy, MlpPolicy, MultiInputPolicy
from sb3_fasttd3.version import __version__

__all__ = ["CnnPolicy", "FastTD3", "FastTD3Policy", "MlpPolicy", "MultiInputPolicy", "__version__"]
