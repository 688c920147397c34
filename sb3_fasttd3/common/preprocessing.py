"""SB3's observation preprocessing, decided once per space so that ``torch.compile`` traces it without breaks."""

from collections.abc import Callable
from functools import partial

import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import is_image_space
from stable_baselines3.common.type_aliases import PyTorchObs

Preprocessor = Callable[[PyTorchObs], PyTorchObs]


def _to_float(obs: th.Tensor) -> th.Tensor:
    return obs.float()


def _scale_image(obs: th.Tensor) -> th.Tensor:
    return obs.float() / 255.0


def _one_hot(obs: th.Tensor, num_classes: int, start: int = 0) -> th.Tensor:
    # Equal to F.one_hot(obs.long() - start, num_classes).float() on valid values, without its data-dependent check
    return ((obs.long() - start).unsqueeze(-1) == th.arange(num_classes, device=obs.device)).float()


def _multi_one_hot(obs: th.Tensor, nvec: tuple[int, ...], starts: tuple[int, ...]) -> th.Tensor:
    return th.cat([_one_hot(obs[:, i], n, start) for i, (n, start) in enumerate(zip(nvec, starts, strict=True))], dim=-1)


def _each_key(obs: dict[str, th.Tensor], preprocessors: dict[str, Preprocessor]) -> dict[str, th.Tensor]:
    return {key: preprocessors[key](value) for key, value in obs.items()}  # type: ignore[misc]


def make_preprocessor(observation_space: spaces.Space, normalize_images: bool = True) -> Preprocessor:
    """
    The function SB3's ``preprocess_obs`` applies to observations of ``observation_space``: images divided by 255
    (when ``normalize_images``), other ``Box`` and ``MultiBinary`` values as floats, ``Discrete`` and
    ``MultiDiscrete`` values one-hot encoded (counted from the space's ``start``, which SB3 refuses unless 0); a
    ``Dict`` per key.

    :param observation_space: the observation space
    :param normalize_images: divide images (SB3's ``is_image_space``) by 255
    :return: the preprocessing function (same results as ``preprocess_obs`` on the observations it accepts)
    """
    if isinstance(observation_space, spaces.Dict):
        preprocessors = {key: make_preprocessor(space, normalize_images) for key, space in observation_space.spaces.items()}
        return partial(_each_key, preprocessors=preprocessors)  # type: ignore[return-value]
    if isinstance(observation_space, spaces.Box):
        return _scale_image if normalize_images and is_image_space(observation_space) else _to_float  # type: ignore[return-value]
    if isinstance(observation_space, spaces.Discrete):
        return partial(_one_hot, num_classes=int(observation_space.n), start=int(observation_space.start))  # type: ignore[return-value]
    if isinstance(observation_space, spaces.MultiDiscrete):
        nvec, starts = (tuple(int(n) for n in values) for values in (observation_space.nvec, observation_space.start))
        return partial(_multi_one_hot, nvec=nvec, starts=starts)  # type: ignore[return-value]
    if isinstance(observation_space, spaces.MultiBinary):
        return _to_float  # type: ignore[return-value]
    raise NotImplementedError(f"No preprocessing for observation space {observation_space}")
