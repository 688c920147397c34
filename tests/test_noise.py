"""Tests of the mixed per-env exploration noise."""

import pytest
import torch as th

from sb3_fasttd3.common.noise import MixedGaussianNoise


def test_sigmas_lie_in_range_and_differ_between_envs():
    th.manual_seed(0)
    noise = MixedGaussianNoise(1000, std_min=0.2, std_max=0.3)
    assert noise.sigmas.min() >= 0.2 and noise.sigmas.max() <= 0.3
    assert noise.sigmas.std() > 0.02  # spread over the range, one sigma per env


def test_sigmas_redrawn_only_for_finished_episodes():
    th.manual_seed(0)
    noise = MixedGaussianNoise(6, std_min=0.0, std_max=1.0)
    before = noise.sigmas.clone()
    dones = th.tensor([True, False, False, True, False, False])
    noise.reset(dones)
    assert th.equal(noise.sigmas[~dones], before[~dones])
    assert (noise.sigmas[dones] != before[dones]).all()


def test_noise_scale_follows_sigma_and_is_clipped():
    th.manual_seed(0)
    noise = MixedGaussianNoise(2, std_min=0.05, std_max=0.5)
    noise.sigmas.copy_(th.tensor([[0.05], [0.25]]))
    actions = th.zeros(2, 20_000)
    noisy = noise(actions)
    th.testing.assert_close(noisy.std(dim=1), th.tensor([0.05, 0.25]), atol=0.01, rtol=0)
    assert noise(th.ones(2, 1000)).max() <= 1.0 and noise(-th.ones(2, 1000)).min() >= -1.0


@pytest.mark.parametrize(("std_min", "std_max"), [(-0.1, 0.5), (0.6, 0.5)])
def test_bad_range(std_min, std_max):
    with pytest.raises(ValueError, match="std_min"):
        MixedGaussianNoise(2, std_min, std_max)


def test_correlated_noise_keeps_each_scale_and_decays_its_correlation():
    th.manual_seed(0)
    noise = MixedGaussianNoise(2, std_min=0.1, std_max=0.1, correlation=10.0, action_dim=3)
    noise.sigmas.copy_(th.tensor([[0.1], [0.3]]))
    steps = []
    for _ in range(40_000):
        noise.advance()
        steps.append(noise(th.zeros(2, 3)))
    noisy = th.stack(steps)  # (steps, envs, actions)
    th.testing.assert_close(noisy.std(dim=(0, 2)), th.tensor([0.1, 0.3]), atol=0.015, rtol=0)
    lag = 10  # one correlation length: exp(-1)
    lagged = th.corrcoef(th.stack([noisy[:-lag, 1, 0], noisy[lag:, 1, 0]]))[0, 1]
    assert lagged.item() == pytest.approx(th.e**-1, abs=0.06)
    # Within a step the noise does not change until advanced; white noise has no memory
    assert th.equal(noise(th.zeros(2, 3)), noise(th.zeros(2, 3)))
    white = MixedGaussianNoise(1, 0.3, 0.3)
    samples = th.stack([white(th.zeros(1, 1)).flatten() for _ in range(20_000)]).flatten()
    assert abs(th.corrcoef(th.stack([samples[:-1], samples[1:]]))[0, 1].item()) < 0.05


def test_correlated_noise_restarts_only_for_finished_episodes():
    th.manual_seed(0)
    noise = MixedGaussianNoise(4, 0.1, 0.5, correlation=50.0, action_dim=2)
    before = noise.unit.clone()
    dones = th.tensor([False, True, False, True])
    noise.reset(dones)
    assert th.equal(noise.unit[~dones], before[~dones])
    assert (noise.unit[dones] != before[dones]).all()


@pytest.mark.parametrize("correlation", [0.0, -5.0, "20", True])
def test_bad_correlation(correlation):
    with pytest.raises(ValueError, match="noise_correlation"):
        MixedGaussianNoise(2, 0.1, 0.2, correlation=correlation)


def test_stratified_sigmas_keep_env_i_in_its_slice_through_resets():
    th.manual_seed(0)
    noise = MixedGaussianNoise(4, std_min=0.0, std_max=0.4, stratified=True)
    slices = th.tensor([[0.0, 0.1], [0.1, 0.2], [0.2, 0.3], [0.3, 0.4]])
    draws = []
    for _ in range(500):
        noise.reset(th.tensor([True, True, False, True]))
        assert ((noise.sigmas >= slices[:, :1]) & (noise.sigmas < slices[:, 1:])).all()
        draws.append(noise.sigmas.clone())
    draws = th.stack(draws)
    assert (draws[:, 2] == draws[0, 2]).all()  # env 2's episode never ended
    # Uniform within each slice: the redrawn envs' means sit at the slices' middles
    th.testing.assert_close(draws[:, [0, 1, 3]].mean(0).flatten(), th.tensor([0.05, 0.15, 0.35]), atol=0.006, rtol=0)


def test_stratified_sigmas_always_span_the_range_where_independent_ones_may_not():
    def spans(stratified: bool) -> list[float]:
        th.manual_seed(0)
        noise = MixedGaussianNoise(4, std_min=0.0, std_max=1.0, stratified=stratified)
        widths = []
        for _ in range(2000):
            noise.reset()
            widths.append((noise.sigmas.max() - noise.sigmas.min()).item())
        return widths

    assert min(spans(stratified=True)) > 0.5  # slices 0 and 3 are at least 0.5 apart
    assert min(spans(stratified=False)) < 0.1  # four independent draws sometimes all land close together
