"""Tests of the empirical observation normalizer."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

from sb3_fasttd3.common.normalization import DictNormalization, EmpiricalNormalization, make_normalizer


def test_statistics_equal_numpy_over_everything_seen():
    rng = np.random.default_rng(0)
    normalizer = EmpiricalNormalization((3,))
    batches = [rng.normal(loc=[1, -5, 20], scale=[0.1, 3, 7], size=(n, 3)) for n in (1, 7, 64, 3, 200)]
    for batch in batches:
        normalizer.update(th.as_tensor(batch, dtype=th.float32))
    everything = np.concatenate(batches)
    assert normalizer.count.item() == len(everything)
    np.testing.assert_allclose(normalizer.mean.numpy(), everything.mean(axis=0), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(normalizer.var.numpy(), everything.var(axis=0), rtol=1e-4)


def test_an_empty_batch_changes_nothing():
    fresh, updated = EmpiricalNormalization((2,)), EmpiricalNormalization((2,))
    updated.update(th.tensor([[0.0, 10.0], [2.0, 30.0]]))
    for normalizer in (fresh, updated):
        state = {key: value.clone() for key, value in normalizer.state_dict().items()}
        normalizer.update(th.zeros(0, 2))
        for key, value in normalizer.state_dict().items():
            assert th.equal(value, state[key]), key


def test_forward_normalizes_clips_and_never_updates():
    normalizer = EmpiricalNormalization((2,), epsilon=1e-8, clip_obs=3.0)
    normalizer.update(th.tensor([[0.0, 10.0], [2.0, 30.0]]))  # mean (1, 20), var (1, 100)
    state = {key: value.clone() for key, value in normalizer.state_dict().items()}
    out = normalizer(th.tensor([[2.0, 30.0], [1.0, 1000.0]]))
    th.testing.assert_close(out, th.tensor([[1.0, 1.0], [0.0, 3.0]]))
    normalizer.train()
    normalizer(th.randn(5, 2))
    for key, value in normalizer.state_dict().items():
        assert th.equal(value, state[key]), key


def test_epsilon_on_the_standard_deviation_without_clipping():
    reference = EmpiricalNormalization((3,), epsilon=0.01, clip_obs=None, epsilon_on_std=True)
    ours = EmpiricalNormalization((3,))
    batch = th.tensor([[0.0, 10.0, 5.0], [2.0, 30.0, 5.0]])  # mean (1, 20, 5), var (1, 100, 0): one constant feature
    for normalizer in (reference, ours):
        normalizer.update(batch)
    obs = th.tensor([[2.0, 1020.0, 5.5]])
    th.testing.assert_close(reference(obs), th.tensor([[1.0 / 1.01, 1000.0 / 10.01, 0.5 / 0.01]]))
    # sqrt(var + 1e-8) blows the constant feature's first move up to the clip
    th.testing.assert_close(ours(obs), th.tensor([[1.0, 10.0, 10.0]]))


@pytest.mark.parametrize("dtype", [th.bool, th.uint8, th.int64])
def test_integer_and_bool_observations_are_normalized_as_floats(dtype):
    normalizer = EmpiricalNormalization((3,))
    batch = th.tensor([[0, 1, 1], [1, 1, 0]], dtype=dtype)
    normalizer.update(batch)
    th.testing.assert_close(normalizer(batch), normalizer(batch.float()))


def test_identity_before_any_update():
    normalizer = EmpiricalNormalization((4,))
    x = th.randn(3, 4)
    th.testing.assert_close(normalizer(x), x)


def test_dict_normalization_per_key():
    space = spaces.Dict({"a": spaces.Box(-1, 1, (2,)), "b": spaces.Box(-1, 1, (3,))})
    normalizer = DictNormalization(space)
    a, b = th.randn(50, 2) * 4 + 1, th.randn(50, 3) * 0.5 - 2
    normalizer.update({"a": a, "b": b})
    out = normalizer({"a": a, "b": b})
    for key in ("a", "b"):
        th.testing.assert_close(out[key].mean(0), th.zeros(out[key].shape[1]), atol=1e-5, rtol=0)
        th.testing.assert_close(out[key].var(0, unbiased=False), th.ones(out[key].shape[1]), atol=1e-4, rtol=0)
    assert set(normalizer.state_dict()) == {f"normalizers.{k}.{s}" for k in "ab" for s in ("count", "mean", "var")}
    reference = DictNormalization(space, epsilon=0.01, clip_obs=None, epsilon_on_std=True)
    assert all(child.extra_repr().endswith("clip_obs=None, epsilon_on_std=True") for child in reference.normalizers.values())


def test_only_vector_keys_are_normalized():
    space = spaces.Dict(
        {
            "pixels": spaces.Box(0, 255, (1, 8, 8), dtype=np.uint8),
            "state": spaces.Box(-np.inf, np.inf, (2,)),
            "mode": spaces.Discrete(3),
            "flags": spaces.MultiDiscrete([2, 2]),
            "bits": spaces.MultiBinary(3),
        }
    )
    normalizer = make_normalizer(space)
    assert isinstance(normalizer, DictNormalization) and set(normalizer.normalizers) == {"state"}
    batch = {key: th.as_tensor(np.stack([space[key].sample() for _ in range(6)])) for key in space.spaces}
    batch["state"] = th.randn(6, 2) * 3 + 1
    normalizer.update(batch)  # uint8 images and integer values are accepted and left alone
    assert normalizer.normalizers["state"].count.item() == 6
    out = normalizer(batch)
    for key in ("pixels", "mode", "flags", "bits"):
        assert out[key] is batch[key]
    th.testing.assert_close(out["state"].mean(0), th.zeros(2), atol=1e-5, rtol=0)
    # Nothing to normalize: no normalizer at all
    assert make_normalizer(space["pixels"]) is None and make_normalizer(space["mode"]) is None
    assert make_normalizer(spaces.Dict({"pixels": space["pixels"], "mode": space["mode"]})) is None
    # A float Box of image shape is not an image for SB3 (not uint8 in [0, 255]): it is normalized
    assert isinstance(make_normalizer(spaces.Box(0, 1, (1, 8, 8))), EmpiricalNormalization)
