"""SimbaV2 networks: hidden vectors on the unit sphere, weights projected back after each update, save/load."""

import pytest
import torch as th
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.simbav2 import HyperLinear, Scaler, SimbaV2Network, hyperspherical_weights
from tests.test_fasttd3 import TINY, counting_env, make_model, observations

SIMBA = dict(TINY, policy_kwargs=dict(net_arch=dict(pi=[16], qf=[32, 32]), architecture="simbav2"))


def row_norms(weights: list[th.Tensor]) -> th.Tensor:
    return th.cat([th.linalg.vector_norm(weight, dim=1) for weight in weights])


def test_scaler_starts_at_init_whatever_its_parametrization():
    scaler = Scaler(3, init=0.5, scale=0.1)
    th.testing.assert_close(scaler(th.ones(2, 3)), th.full((2, 3), 0.5))
    assert th.allclose(scaler.scale, th.full((3,), 0.1))


def test_every_block_output_is_on_the_unit_sphere():
    set_random_seed(0)
    network = SimbaV2Network(in_dim=5, out_dim=7, hidden_dim=16, num_blocks=2, squash_output=True)
    x = th.randn(64, 5) * 100.0
    hidden = x
    for layer in list(network)[:-2]:  # the embedder and the blocks
        hidden = layer(hidden)
        th.testing.assert_close(th.linalg.vector_norm(hidden, dim=-1), th.ones(64))
    out = network(x)
    assert out.shape == (64, 7) and out.abs().max() < 1.0
    th.testing.assert_close(
        row_norms(hyperspherical_weights(network)), th.ones(sum(w.shape[0] for w in hyperspherical_weights(network)))
    )


def test_updates_keep_the_weights_on_the_sphere_and_train_the_scalers():
    model = FastTD3("MlpPolicy", counting_env(2), seed=0, **SIMBA)
    assert isinstance(model.actor.mu[0].linear, HyperLinear)
    assert model.actor.optimizer.defaults["weight_decay"] == 0.0
    before = {name: param.clone() for name, param in model.policy.named_parameters()}
    model.learn(100)
    assert model._n_updates > 0
    for network in (model.actor, model.critic):
        weights = hyperspherical_weights(network)
        th.testing.assert_close(row_norms(weights), th.ones(sum(w.shape[0] for w in weights)), atol=1e-5, rtol=0)
    changed = [name for name, param in model.policy.named_parameters() if not th.equal(param, before[name])]
    assert any(name.endswith("alpha.scale") for name in changed) and any("actor.mu" in name for name in changed)


def test_save_load_predicts_the_same(tmp_path):
    model = FastTD3("MlpPolicy", counting_env(2), seed=0, **SIMBA)
    model.learn(60)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    assert loaded.policy.architecture == "simbav2"
    obs = observations(model.get_env())
    th.testing.assert_close(
        th.as_tensor(loaded.predict(obs, deterministic=True)[0]), th.as_tensor(model.predict(obs, deterministic=True)[0])
    )


@pytest.mark.parametrize(
    ("policy_kwargs", "match"),
    [
        (dict(architecture="resnet"), r"architecture must be one of \['mlp', 'simbav2'\], got 'resnet'"),
        (dict(architecture="simbav2", net_arch=[32, 16]), r"blocks of one width, e.g. \[256, 256\], got \[32, 16\]"),
        (dict(architecture="simbav2", layer_norm=True), "layer_norm=True applies to architecture='mlp' only"),
    ],
)
def test_bad_architectures(policy_kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(1, policy_kwargs=policy_kwargs)
