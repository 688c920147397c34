"""Property tests of the categorical projection (``sb3_fasttd3.common.distributional``)."""

import numpy as np
import pytest
import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st

from sb3_fasttd3.common.distributional import categorical_projection, expected_value, make_support

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def projection_inputs(draw):
    num_atoms = draw(st.integers(2, 61))
    v_min = draw(st.floats(-300, 50))
    v_max = v_min + draw(st.floats(0.5, 400))
    batch = draw(st.integers(1, 16))
    seed = draw(st.integers(0, 2**31 - 1))
    generator = th.Generator().manual_seed(seed)
    logits = th.randn(batch, num_atoms, generator=generator) * draw(st.floats(0.1, 8))
    span = v_max - v_min
    rewards = th.rand(batch, generator=generator) * 2 * span - span + v_min / 2
    bootstrap = (th.rand(batch, generator=generator) < 0.8).float()
    discounts = draw(st.one_of(st.floats(0.0, 1.0), st.just(None)))
    if discounts is None:
        discounts = th.rand(batch, 1, generator=generator)
    return th.softmax(logits, dim=-1), rewards, bootstrap, discounts, make_support(v_min, v_max, num_atoms)


@SETTINGS
@given(projection_inputs())
def test_projection_is_a_distribution(inputs):
    projected = categorical_projection(*inputs)
    assert projected.shape == inputs[0].shape
    assert (projected >= 0).all()
    th.testing.assert_close(projected.sum(dim=-1), th.ones(projected.shape[0]), atol=1e-5, rtol=0)


@SETTINGS
@given(projection_inputs())
def test_projection_preserves_mean_inside_support(inputs):
    next_probs, rewards, bootstrap, discounts, support = inputs
    # Targets inside the support: shrink the rewards and the discount so that r + d * z stays in range
    v_min, v_max = support[0].item(), support[-1].item()
    mid, half = (v_min + v_max) / 2, (v_max - v_min) / 2
    rewards = mid + 0.5 * half * th.tanh(rewards)
    discounts = th.as_tensor(discounts, dtype=th.float32) * 0.5
    scale = discounts * half / max(abs(v_min), abs(v_max))
    projected = categorical_projection(next_probs, rewards, bootstrap, scale, support)
    target_atoms = rewards[:, None] + bootstrap[:, None] * th.as_tensor(scale).reshape(-1, 1) * support
    assert ((target_atoms >= v_min - 1e-4) & (target_atoms <= v_max + 1e-4)).all()
    expected_mean = (next_probs * target_atoms).sum(-1)
    th.testing.assert_close((projected * support).sum(-1), expected_mean, atol=1e-3 * (v_max - v_min), rtol=0)


def test_projection_on_atoms_and_outside_support():
    support = make_support(-2.0, 2.0, 5)  # atoms -2, -1, 0, 1, 2
    probs = th.full((4, 5), 0.2)
    rewards = th.tensor([1.0, 100.0, -100.0, 0.5])
    # Row 0: discount 1 and shift 1 lands exactly on atoms; row 1/2 beyond v_max / v_min; row 3 between atoms
    bootstrap = th.tensor([1.0, 1.0, 1.0, 0.0])
    projected = categorical_projection(probs, rewards, bootstrap, 1.0, support)
    th.testing.assert_close(projected[0], th.tensor([0.0, 0.2, 0.2, 0.2, 0.4]))
    th.testing.assert_close(projected[1], th.tensor([0.0, 0.0, 0.0, 0.0, 1.0]))
    th.testing.assert_close(projected[2], th.tensor([1.0, 0.0, 0.0, 0.0, 0.0]))
    # Termination: every atom collapses to the reward 0.5, split between atoms 0 and 1
    th.testing.assert_close(projected[3], th.tensor([0.0, 0.0, 0.5, 0.5, 0.0]))


def test_projection_accepts_column_shapes_and_low_precision():
    support = make_support(-10, 10, 11)
    probs = th.softmax(th.randn(6, 11), dim=-1)
    rewards, bootstrap, discounts = th.randn(6), th.ones(6), th.full((6,), 0.9)
    flat = categorical_projection(probs, rewards, bootstrap, discounts, support)
    column = categorical_projection(probs, rewards[:, None], bootstrap[:, None], discounts[:, None], support)
    th.testing.assert_close(flat, column)
    half = categorical_projection(probs.bfloat16(), rewards, bootstrap, 0.9, support)
    assert half.dtype == th.float32
    # Rows sum to the (rounded) input mass: the projection adds no error of its own
    th.testing.assert_close(half.sum(-1), probs.bfloat16().float().sum(-1))


def test_expected_value():
    support = make_support(-1.0, 1.0, 3)
    logits = th.log(th.tensor([[0.25, 0.25, 0.5], [1.0, 1e-12, 1e-12]]))
    th.testing.assert_close(expected_value(logits, support), th.tensor([0.25, -1.0]))


@pytest.mark.parametrize(("v_min", "v_max", "num_atoms"), [(1.0, 1.0, 5), (2.0, -2.0, 5), (-1.0, 1.0, 1)])
def test_make_support_rejects_bad_input(v_min, v_max, num_atoms):
    with pytest.raises(ValueError, match=r"num_atoms|v_min"):
        make_support(v_min, v_max, num_atoms)


def test_support_is_evenly_spaced():
    support = make_support(-250.0, 250.0, 101).numpy()
    np.testing.assert_allclose(np.diff(support), 5.0, rtol=1e-5)
