"""Vector environments that keep their data on a device, their backends, a NumPy adapter, and gymnasium's."""

from sb3_fasttd3.vec_env.base import EpisodeTracker, TorchStep, TorchVecEnv
from sb3_fasttd3.vec_env.gymnasium_vector import GymnasiumVecEnv
from sb3_fasttd3.vec_env.isaaclab import IsaacLabVecEnv
from sb3_fasttd3.vec_env.numpy_adapter import NumpyVecEnv

__all__ = [
    "EnvpoolVecEnv",
    "EpisodeTracker",
    "GymnasiumVecEnv",
    "IsaacLabVecEnv",
    "NumpyVecEnv",
    "TorchStep",
    "TorchVecEnv",
]


def __getattr__(name: str):
    # Backends with heavy optional dependencies are imported on first use
    if name == "EnvpoolVecEnv":
        from sb3_fasttd3.vec_env.envpool import EnvpoolVecEnv

        return EnvpoolVecEnv
    if name == "PlaygroundVecEnv":
        from sb3_fasttd3.vec_env.playground import PlaygroundVecEnv

        return PlaygroundVecEnv
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
