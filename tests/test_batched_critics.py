"""Batched critics (``batched_critics=True``) compute what the plain twin critic computes, in another layout."""

import pytest
import torch as th
from stable_baselines3.common.utils import set_random_seed
from torch import nn

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.batched_mlp import BatchedLinear, BatchedMLP
from tests.test_fasttd3 import TINY, counting_env, make_model, observations

LEARNING_RATE = 3e-4


def tiny(**policy_kwargs) -> dict:
    """The tiny test networks with ``policy_kwargs``."""
    return {**TINY["policy_kwargs"], **policy_kwargs}


def plain_layers(q_networks: nn.ModuleList, kind: type[nn.Module]) -> list[list[nn.Module]]:
    """Per layer, the modules of ``kind`` of each plain Q-network."""
    per_network = [[module for module in net if isinstance(module, kind)] for net in q_networks]
    return [list(layer) for layer in zip(*per_network, strict=True)]


def plain_and_batched_pairs(plain: nn.ModuleList, batched: BatchedMLP) -> list[tuple[th.Tensor, th.Tensor]]:
    """(plain parameters stacked over the networks, the batched parameter), for every parameter."""
    pairs = []
    for linears, layer in zip(plain_layers(plain, nn.Linear), batched.linears, strict=True):
        pairs.append((th.stack([linear.weight for linear in linears]), layer.weight))
        pairs.append((th.stack([linear.bias for linear in linears]).unsqueeze(1), layer.bias))
    for norms, layer in zip(plain_layers(plain, nn.LayerNorm), batched.norms or [], strict=True):
        pairs.append((th.stack([norm.weight for norm in norms]).unsqueeze(1), layer.weight))
        pairs.append((th.stack([norm.bias for norm in norms]).unsqueeze(1), layer.bias))
    return pairs


def paired_models(layer_norm: bool = False, **kwargs) -> tuple[FastTD3, FastTD3]:
    """A plain and a batched model from one seed, before any update, sharing one replay buffer."""
    models = [
        make_model(2, learning_starts=40, policy_kwargs=tiny(layer_norm=layer_norm, batched_critics=batched), **kwargs)
        for batched in (False, True)
    ]
    plain, batched = models
    plain.learn(40)  # fills the buffer up to learning_starts: no update yet
    batched.replay_buffer = plain.replay_buffer
    batched._last_obs, batched.num_timesteps = plain._last_obs, plain.num_timesteps
    batched.set_logger(plain.logger)
    batched.policy.obs_normalizer.load_state_dict(plain.policy.obs_normalizer.state_dict())
    return plain, batched


@pytest.mark.parametrize("layer_norm", [False, True])
def test_a_seed_gives_the_plain_critics_parameters(layer_norm):
    plain, batched = paired_models(layer_norm)
    assert plain._n_updates == 0
    for critic, batched_critic in ((plain.critic, batched.critic), (plain.critic_target, batched.critic_target)):
        for stacked, parameter in plain_and_batched_pairs(critic.q_networks, batched_critic.q_networks):
            assert th.equal(stacked, parameter)
    for a, b in zip(plain.actor.parameters(), batched.actor.parameters(), strict=True):
        assert th.equal(a, b)


@pytest.mark.parametrize("layer_norm", [False, True])
@pytest.mark.parametrize("n_critics", [None, 1])
def test_logits_and_gradients_match_the_plain_critic(layer_norm, n_critics):
    plain, batched = paired_models(layer_norm)
    obs, actions = th.randn(16, 3), th.rand(16, 1) * 2 - 1
    outputs = []
    for critic in (plain.critic, batched.critic):
        critic.zero_grad()
        logits = critic(obs, actions, n_critics)
        (logits.logsumexp(dim=-1).mean() + logits[..., 0].square().mean()).backward()
        outputs.append(logits)
    assert outputs[1].shape == (1 if n_critics else 2, 16, plain.num_atoms)
    th.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
    # The same gradients up to float32 rounding (the kernels sum in other orders); none for networks not evaluated
    for linears, layer in zip(
        plain_layers(plain.critic.q_networks, nn.Linear), batched.critic.q_networks.linears, strict=True
    ):
        for index, linear in enumerate(linears):
            if n_critics == 1 and index > 0:
                assert linear.weight.grad is None and th.count_nonzero(layer.weight.grad[index]) == 0
                continue
            th.testing.assert_close(layer.weight.grad[index], linear.weight.grad, rtol=1e-5, atol=1e-7)
            th.testing.assert_close(layer.bias.grad[index, 0], linear.bias.grad, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("layer_norm", [False, True])
def test_train_calls_follow_the_plain_ones(layer_norm):
    plain, batched = paired_models(layer_norm, policy_delay=2)
    n_calls = 3
    for seed in range(n_calls):  # each call: one critic-only and one critic+actor update
        for model in (plain, batched):
            set_random_seed(seed)
            model.train(gradient_steps=2, batch_size=16)
    th.testing.assert_close(batched._update_statistics.sums, plain._update_statistics.sums, rtol=1e-4, atol=1e-4)
    # Adam's step is at most about lr per parameter and update: where a gradient is ~0 its sign is rounding noise
    bound = 2 * LEARNING_RATE * 2 * n_calls + 1e-6
    for critic, batched_critic in ((plain.critic, batched.critic), (plain.critic_target, batched.critic_target)):
        for stacked, parameter in plain_and_batched_pairs(critic.q_networks, batched_critic.q_networks):
            assert (stacked - parameter).abs().max() <= bound
    for a, b in zip(plain.actor.parameters(), batched.actor.parameters(), strict=True):
        assert (a - b).abs().max() <= bound


def test_compiled_bf16_batched_critics_train_and_save_load(tmp_path):
    model = make_model(2, learning_starts=40, compile=True, amp_dtype="bf16", policy_kwargs=tiny(batched_critics=True))
    model.learn(60)
    assert model._n_updates > 0
    assert isinstance(model.critic.q_networks, BatchedMLP)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model", env=counting_env(2))
    assert loaded.policy.batched_critics is True and isinstance(loaded.critic.q_networks, BatchedMLP)
    obs = observations(model.get_env())
    th.testing.assert_close(
        th.as_tensor(loaded.predict(obs, deterministic=True)[0]), th.as_tensor(model.predict(obs, deterministic=True)[0])
    )
    obs_tensor, actions = th.randn(8, 3), th.rand(8, 1) * 2 - 1
    th.testing.assert_close(loaded.critic(obs_tensor, actions), model.critic(obs_tensor, actions))
    loaded.learn(20)  # the optimizer state loaded with the batched layout


def test_batched_linear_initializes_each_layer_as_nn_linear():
    th.manual_seed(0)
    batched = BatchedLinear(3, 5, 4)
    th.manual_seed(0)
    linears = [nn.Linear(5, 4) for _ in range(3)]
    for index, linear in enumerate(linears):
        assert th.equal(batched.weight[index], linear.weight) and th.equal(batched.bias[index, 0], linear.bias)


def test_batched_critics_need_mlp_critics():
    with pytest.raises(ValueError, match="batched_critics=True applies to architecture='mlp' only"):
        make_model(1, policy_kwargs=dict(architecture="simbav2", net_arch=[16], batched_critics=True))


def test_mlp_critics_are_batched_unless_told_otherwise():
    model = make_model(1)
    assert model.policy.batched_critics is True and isinstance(model.critic.q_networks, BatchedMLP)
    assert "batched_critics" not in model.policy_kwargs  # SB3's load compares them with the ones it is given
    plain = make_model(1, policy_kwargs=tiny(batched_critics=False))
    assert plain.policy.batched_critics is False and isinstance(plain.critic.q_networks, nn.ModuleList)
    simba = make_model(1, policy_kwargs=dict(architecture="simbav2", net_arch=[16]))
    assert simba.policy.batched_critics is False


@pytest.mark.parametrize("activation_fn", [nn.ReLU, nn.PReLU])
def test_a_step_on_one_critics_loss_leaves_the_other_critic_unchanged(activation_fn):
    # One batched activation module with parameters (PReLU) would serve every critic and tie them together
    model = make_model(1, policy_kwargs=tiny(activation_fn=activation_fn))
    assert model.policy.batched_critics is (activation_fn is nn.ReLU)
    obs, actions = th.randn(8, 3), th.rand(8, 1) * 2 - 1
    q0_before, q1_before = model.critic(obs, actions).detach().clone()
    sgd = th.optim.SGD(model.critic.parameters(), lr=0.1)  # no weight decay: only gradients move parameters
    model.critic(obs, actions)[0].sum().backward()
    sgd.step()
    q0_after, q1_after = model.critic(obs, actions).detach()
    assert not th.allclose(q0_after, q0_before)
    th.testing.assert_close(q1_after, q1_before, rtol=0, atol=0)


def older_model(tmp_path) -> tuple[FastTD3, str]:
    """A model with one module per Q-network, saved as before batched critics (no key in its policy_kwargs)."""
    older = make_model(2, policy_kwargs=tiny(batched_critics=False))
    older.policy_kwargs = dict(TINY["policy_kwargs"])
    older.learn(60)
    older.save(tmp_path / "older")
    return older, str(tmp_path / "older.zip")


def assert_same_critic(model: FastTD3, other: FastTD3) -> None:
    obs, actions = th.randn(8, 3), th.rand(8, 1) * 2 - 1
    th.testing.assert_close(model.critic(obs, actions), other.critic(obs, actions))


def test_a_model_saved_before_batched_critics_loads_with_its_layout(tmp_path):
    older, path = older_model(tmp_path)
    for kwargs in ({}, dict(policy_kwargs=dict(TINY["policy_kwargs"]))):  # SB3 and the RL Zoo pass them again
        loaded = FastTD3.load(path, env=counting_env(2), **kwargs)
        assert isinstance(loaded.critic.q_networks, nn.ModuleList) and loaded.critic is loaded.policy.critic
        assert_same_critic(loaded, older)
        th.testing.assert_close(
            loaded.critic.optimizer.state_dict()["state"][0]["exp_avg"],
            older.critic.optimizer.state_dict()["state"][0]["exp_avg"],
        )
        loaded.learn(20)
        loaded.save(tmp_path / "again")
        assert isinstance(FastTD3.load(tmp_path / "again").critic.q_networks, nn.ModuleList)


def test_set_parameters_of_the_other_layout_keeps_what_was_collected(tmp_path):
    older, path = older_model(tmp_path)
    model = make_model(2)
    model.learn(60)
    stored = model.replay_buffer.size()
    model.set_parameters(path)
    assert isinstance(model.critic.q_networks, nn.ModuleList) and model.policy.batched_critics is False
    assert_same_critic(model, older)
    assert model.replay_buffer.size() == stored
    model.learn(20)
    assert model.replay_buffer.size() > stored
    model.set_parameters(make_model(2).get_parameters())
    assert isinstance(model.critic.q_networks, BatchedMLP)


def test_a_policy_saved_alone_before_batched_critics_loads_with_its_layout(tmp_path):
    older, _ = older_model(tmp_path)
    older.policy.save(tmp_path / "policy.pt")
    saved = th.load(tmp_path / "policy.pt", weights_only=False)
    del saved["data"]["batched_critics"]  # as saved before the option
    th.save(saved, tmp_path / "policy.pt")
    loaded = type(older.policy).load(str(tmp_path / "policy.pt"))
    assert loaded.batched_critics is False
    obs, actions = th.randn(8, 3), th.rand(8, 1) * 2 - 1
    th.testing.assert_close(loaded.critic(obs, actions), older.critic(obs, actions))
