"""FastTD3's observation preprocessing computes what SB3's ``preprocess_obs`` computes."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.preprocessing import preprocess_obs

from sb3_fasttd3.common.preprocessing import make_preprocessor

SPACES = {
    "image": spaces.Box(0, 255, (1, 8, 8), dtype=np.uint8),
    "vector": spaces.Box(-np.inf, np.inf, (3,)),
    "float_image": spaces.Box(0, 1, (1, 8, 8)),
    "discrete": spaces.Discrete(5),
    "multi_discrete": spaces.MultiDiscrete([2, 4, 3]),
    "multi_binary": spaces.MultiBinary(4),
}


def batch(space: spaces.Space, n: int = 16) -> th.Tensor:
    space.seed(0)
    return th.as_tensor(np.stack([space.sample() for _ in range(n)]))


@pytest.mark.parametrize("normalize_images", [True, False])
@pytest.mark.parametrize("name", list(SPACES))
def test_same_as_sb3_from_env_and_buffer_layouts(name, normalize_images):
    space = SPACES[name]
    preprocess = make_preprocessor(space, normalize_images)
    obs = batch(space)
    expected = preprocess_obs(obs, space, normalize_images)
    th.testing.assert_close(preprocess(obs), expected, rtol=0, atol=0)
    # The replay buffer stores every value as float32, a Discrete value with shape (batch, 1)
    stored = obs.float().unsqueeze(1) if isinstance(space, spaces.Discrete) else obs.float()
    th.testing.assert_close(preprocess(stored), preprocess_obs(stored, space, normalize_images), rtol=0, atol=0)


def test_dict_space_per_key():
    space = spaces.Dict(SPACES)
    obs = {key: batch(subspace) for key, subspace in SPACES.items()}
    actual, expected = make_preprocessor(space)(obs), preprocess_obs(obs, space)
    assert actual.keys() == expected.keys()
    for key in expected:
        th.testing.assert_close(actual[key], expected[key], rtol=0, atol=0)
    with pytest.raises(NotImplementedError, match="Tuple"):
        make_preprocessor(spaces.Tuple([SPACES["vector"]]))


@pytest.mark.parametrize(
    ("space", "counted_from_zero"),
    [
        (spaces.Discrete(4, start=5), spaces.Discrete(4)),
        (spaces.MultiDiscrete([3, 4], start=[2, -1]), spaces.MultiDiscrete([3, 4])),
    ],
)
def test_discrete_values_are_counted_from_the_spaces_start(space, counted_from_zero):
    # SB3's preprocess_obs refuses such values; their one-hot code is that of the values counted from 0
    obs = batch(space)
    shifted = obs - th.as_tensor(space.start)
    th.testing.assert_close(make_preprocessor(space)(obs), preprocess_obs(shifted, counted_from_zero), rtol=0, atol=0)
