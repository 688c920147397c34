"""SB3's features extractors in FastTD3's policy: CnnPolicy, MultiInputPolicy, custom and shared extractors."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.preprocessing import get_flattened_obs_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor, CombinedExtractor, NatureCNN
from stable_baselines3.common.vec_env import VecTransposeImage, is_vecenv_wrapped
from torch import nn
from torch._dynamo.utils import counters
from torch.nn import functional as F

from sb3_fasttd3 import CnnPolicy, FastTD3, MlpPolicy
from tests.envs import BrightnessTargetEnv, CountingEnv, MixedDictEnv

TINY = dict(batch_size=16, learning_starts=20, num_atoms=11, v_min=-5.0, v_max=5.0, buffer_size=1000, seed=0)
CNN_KWARGS = dict(net_arch=[16], features_extractor_kwargs=dict(features_dim=8))
MULTI_KWARGS = dict(net_arch=[16], features_extractor_kwargs=dict(cnn_output_dim=8))


def image_model(n_envs: int = 2, channel_last: bool = False, **kwargs) -> FastTD3:
    env = make_vec_env(BrightnessTargetEnv, n_envs=n_envs, seed=0, env_kwargs=dict(channel_last=channel_last))
    policy_kwargs = {**CNN_KWARGS, **kwargs.pop("policy_kwargs", {})}
    return FastTD3("CnnPolicy", env, policy_kwargs=policy_kwargs, **{**TINY, **kwargs})


def mixed_model(privileged: bool = False, **kwargs) -> FastTD3:
    env = make_vec_env(MixedDictEnv, n_envs=2, seed=0, env_kwargs=dict(privileged=privileged))
    policy_kwargs = {**MULTI_KWARGS, **kwargs.pop("policy_kwargs", {})}
    return FastTD3("MultiInputPolicy", env, policy_kwargs=policy_kwargs, **{**TINY, **kwargs})


def batch_of(env, n: int = 8):
    """``n`` observations of a (non-vector) env, stacked as a VecEnv would."""
    samples = [env.reset(seed=i)[0] for i in range(n)]
    if isinstance(samples[0], dict):
        return {key: np.stack([sample[key] for sample in samples]) for key in samples[0]}
    return np.stack(samples)


def as_tensors(obs):
    if isinstance(obs, dict):
        return {key: th.as_tensor(value) for key, value in obs.items()}
    return th.as_tensor(obs)


def extractor_params(module: nn.Module) -> list[th.Tensor]:
    return [param.detach().clone() for param in module.features_extractor.parameters()]


@pytest.mark.parametrize("channel_last", [False, True])
def test_cnn_policy_learns_saves_loads_and_predicts(tmp_path, channel_last):
    model = image_model(channel_last=channel_last).learn(60)
    assert model._n_updates > 0
    # As in SB3: channel-last images are transposed by a VecTransposeImage wrapper
    assert is_vecenv_wrapped(model.get_env(), VecTransposeImage) == channel_last
    assert isinstance(model.actor.features_extractor, NatureCNN) and isinstance(model.critic.features_extractor, NatureCNN)
    assert model.actor.features_extractor is not model.critic.features_extractor
    assert model.actor.mu[0].in_features == 8 and model.policy.obs_normalizer is None

    obs = batch_of(BrightnessTargetEnv(channel_last=channel_last))
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    assert isinstance(loaded.policy, CnnPolicy)
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("normalize_images", [True, False])
def test_images_preprocessed_as_sb3_from_uint8_or_float32(normalize_images):
    policy = image_model(policy_kwargs=dict(normalize_images=normalize_images)).policy
    images = as_tensors(batch_of(BrightnessTargetEnv()))
    assert images.dtype == th.uint8
    # Rollouts give uint8 images, the replay buffer may give float32 ones: same features, actions and values
    for network in (policy.actor, policy.critic):
        th.testing.assert_close(network.features(images), network.features(images.float()), rtol=0, atol=0)
    actions = policy.actor(policy.actor_input(images))
    th.testing.assert_close(actions, policy.actor(policy.actor_input(images.float())), rtol=0, atol=0)
    logits = policy.critic(policy.critic_input(images), actions)
    th.testing.assert_close(logits, policy.critic(policy.critic_input(images.float()), actions), rtol=0, atol=0)
    scale = 255.0 if normalize_images else 1.0
    th.testing.assert_close(policy.actor.features(images), policy.actor.features_extractor(images.float() / scale))


def test_multi_input_policy_with_image_vector_and_discrete_keys(tmp_path):
    model = mixed_model().learn(60)
    extractor = model.actor.features_extractor
    assert isinstance(extractor, CombinedExtractor) and isinstance(extractor.extractors["pixels"], NatureCNN)
    assert extractor.features_dim == 8 + 3 + 4 + (2 + 3)  # CNN, vector, one-hot Discrete(4), MultiDiscrete([2, 3])
    assert model.critic.features_extractor is not extractor
    # Only the vector key is normalized; it counted every collected observation
    normalizers = model.policy.obs_normalizer.normalizers
    assert set(normalizers) == {"state"} and normalizers["state"].count.item() == 60
    assert th.allclose(normalizers["state"].mean, th.full((3,), 5.0), atol=1.0)

    obs = batch_of(MixedDictEnv())
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)


def test_multi_input_features_follow_sb3_preprocessing():
    policy = mixed_model().policy
    obs = as_tensors(batch_of(MixedDictEnv()))
    actor = policy.actor
    normalized = policy.actor_input(obs)
    assert normalized["pixels"] is obs["pixels"] and normalized["mode"] is obs["mode"]  # untouched by the normalizer
    flags = obs["flags"].long()
    expected = th.cat(
        [
            F.one_hot(flags[:, 0], 2).float(),
            F.one_hot(flags[:, 1], 3).float(),
            F.one_hot(obs["mode"].long(), 4).float(),
            actor.features_extractor.extractors["pixels"](obs["pixels"].float() / 255.0),
            policy.obs_normalizer.normalizers["state"](obs["state"]),
        ],
        dim=1,
    )
    th.testing.assert_close(actor.features(normalized), expected)
    # The replay buffer's layout: every key as float32, a Discrete value with shape (batch, 1)
    stored = {key: value.float() for key, value in normalized.items()}
    stored["mode"] = stored["mode"].unsqueeze(1)
    th.testing.assert_close(actor.features(stored), expected, rtol=0, atol=0)


class SquashExtractor(BaseFeaturesExtractor):
    """A custom extractor with an argument: flatten (every key of a Dict), then Linear(hidden) and tanh."""

    def __init__(self, observation_space: spaces.Space, hidden: int = 4):
        super().__init__(observation_space, hidden)
        self.space = observation_space
        self.linear = nn.Linear(get_flattened_obs_dim(observation_space), hidden)

    def forward(self, obs) -> th.Tensor:
        if isinstance(obs, dict):
            obs = th.cat([obs[key].flatten(start_dim=1) for key in self.space.spaces], dim=1)
        return th.tanh(self.linear(obs.flatten(start_dim=1)))


@pytest.mark.parametrize("dict_obs", [False, True])
def test_custom_features_extractor_with_kwargs(dict_obs):
    env = make_vec_env(CountingEnv, n_envs=2, seed=0, env_kwargs=dict(dict_obs=dict_obs))
    policy_kwargs = dict(net_arch=[16], features_extractor_class=SquashExtractor, features_extractor_kwargs=dict(hidden=5))
    model = FastTD3("MultiInputPolicy" if dict_obs else "MlpPolicy", env, policy_kwargs=policy_kwargs, **TINY)
    actor_extractor, critic_extractor = model.actor.features_extractor, model.critic.features_extractor
    assert isinstance(actor_extractor, SquashExtractor) and actor_extractor.linear.out_features == 5
    assert model.actor.mu[0].in_features == 5 and model.critic.q_networks.linears[0].in_features == 5 + 1
    if dict_obs:
        # Each extractor is built over the keys its network reads (asymmetric by default here)
        assert list(actor_extractor.space.spaces) == ["state"] and actor_extractor.linear.in_features == 3
        assert list(critic_extractor.space.spaces) == ["privileged_state"] and critic_extractor.linear.in_features == 4
    before = [extractor_params(module) for module in (model.actor, model.critic)]
    model.learn(60)
    # Each extractor is trained with its network
    for params_before, module in zip(before, (model.actor, model.critic), strict=True):
        for param_before, param in zip(params_before, module.features_extractor.parameters(), strict=True):
            assert not th.allclose(param_before, param)


@pytest.mark.parametrize("share", [True, False])
def test_shared_or_separate_extractors(share):
    model = image_model(policy_kwargs=dict(share_features_extractor=share), policy_delay=1).learn(40)
    actor, critic, target = model.actor, model.critic, model.critic_target
    assert (actor.features_extractor is critic.features_extractor) == share
    assert target.features_extractor is not critic.features_extractor
    # The critic's optimizer leaves a shared extractor to the actor's
    extractor_ids = {id(param) for param in critic.features_extractor.parameters()}
    critic_ids = {id(param) for group in critic.optimizer.param_groups for param in group["params"]}
    actor_ids = {id(param) for group in actor.optimizer.param_groups for param in group["params"]}
    assert extractor_ids.isdisjoint(critic_ids) == share and extractor_ids <= (actor_ids if share else critic_ids)
    # The soft update pairs every target parameter with the online one of the same shape
    assert [p.shape for p in model._critic_polyak_params] == [p.shape for p in target.parameters()]

    # Gradients: the critic's loss reaches a separate extractor only, the actor's loss reaches the actor's
    obs = model.replay_buffer.sample(8).observations
    model.policy.zero_grad(set_to_none=True)
    critic(model.policy.critic_input(obs), th.zeros(8, 1)).sum().backward()
    assert all((param.grad is None) == share for param in critic.features_extractor.parameters())
    assert all(param.grad is not None for param in critic.q_networks.parameters())
    actor(model.policy.actor_input(obs)).sum().backward()
    assert all(param.grad is not None for param in actor.features_extractor.parameters())

    # One update with the actor: the target's extractor copy moves towards the online extractor by tau
    target_before = extractor_params(target)
    model.train(gradient_steps=1, batch_size=16)
    online_params = critic.features_extractor.parameters()
    for old, new, online in zip(target_before, target.features_extractor.parameters(), online_params, strict=True):
        th.testing.assert_close(new, old + model.tau * (online - old))
        assert not th.allclose(new, old)


def test_critic_update_leaves_a_shared_extractor_unchanged():
    model = image_model(policy_kwargs=dict(share_features_extractor=True), policy_delay=1000).learn(40)
    model._n_updates = 0  # the next update is a critic update only
    before = extractor_params(model.critic)
    q_net_before = [param.detach().clone() for param in model.critic.q_networks.parameters()]
    model.train(gradient_steps=1, batch_size=16)
    for old, new in zip(before, model.critic.features_extractor.parameters(), strict=True):
        assert th.equal(old, new)
    q_net_after = model.critic.q_networks.parameters()
    assert not all(th.equal(old, new) for old, new in zip(q_net_before, q_net_after, strict=True))


def test_asymmetric_keys_with_an_image_key(tmp_path):
    keys = dict(actor_keys=["pixels", "state"], critic_keys=["privileged_state"])
    model = mixed_model(privileged=True, policy_kwargs=keys).learn(60)
    actor_extractor, critic_extractor = model.actor.features_extractor, model.critic.features_extractor
    assert list(actor_extractor.extractors) == ["pixels", "state"] and actor_extractor.features_dim == 8 + 3
    assert list(critic_extractor.extractors) == ["privileged_state"] and critic_extractor.features_dim == 3
    normalizers = model.policy.obs_normalizer.normalizers
    assert set(normalizers) == {"state", "privileged_state"} and normalizers["privileged_state"].count.item() == 60
    obs = batch_of(MixedDictEnv(privileged=True))
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    assert (loaded.policy.actor_keys, loaded.policy.critic_keys) == (keys["actor_keys"], keys["critic_keys"])
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)


def test_errors():
    asymmetric = make_vec_env(CountingEnv, n_envs=1, env_kwargs=dict(dict_obs=True))
    with pytest.raises(ValueError, match="share_features_extractor=True needs the actor and the critic to read the same"):
        FastTD3("MultiInputPolicy", asymmetric, policy_kwargs=dict(share_features_extractor=True), **TINY)
    same_keys = dict(share_features_extractor=True, actor_keys=["state"], critic_keys=["state"])
    model = FastTD3("MultiInputPolicy", asymmetric, policy_kwargs=same_keys, **TINY)
    assert model.actor.features_extractor is model.critic.features_extractor
    # SB3's own checks: NatureCNN reads images only, and a Dict space needs MultiInputPolicy
    with pytest.raises(AssertionError, match="NatureCNN"):
        FastTD3("CnnPolicy", make_vec_env(CountingEnv, n_envs=1), **TINY)
    with pytest.raises(ValueError, match="MultiInputPolicy"):
        FastTD3("MlpPolicy", asymmetric, **TINY)


class BatchNormDropoutExtractor(BaseFeaturesExtractor):
    """Flatten, BatchNorm and Dropout: a layer whose running statistics move in train mode only."""

    def __init__(self, observation_space: spaces.Space):
        super().__init__(observation_space, get_flattened_obs_dim(observation_space))
        self.batch_norm = nn.BatchNorm1d(self.features_dim)
        self.dropout = nn.Dropout(0.5)

    def forward(self, obs: th.Tensor) -> th.Tensor:
        return self.dropout(self.batch_norm(obs.flatten(start_dim=1)))


def test_extractors_train_only_during_updates():
    policy_kwargs = dict(net_arch=[16], features_extractor_class=BatchNormDropoutExtractor)
    model = FastTD3("MlpPolicy", make_vec_env(CountingEnv, n_envs=2, seed=0), policy_kwargs=policy_kwargs, **TINY)
    networks = (model.actor, model.critic, model.critic_target)

    def running_means() -> list[th.Tensor]:
        return [network.features_extractor.batch_norm.running_mean.clone() for network in networks]

    initial = running_means()
    model.gradient_steps = 0  # rollouts only
    model.learn(60)
    obs = batch_of(CountingEnv())
    first, _ = model.predict(obs, deterministic=True)
    for _ in range(3):
        np.testing.assert_array_equal(model.predict(obs, deterministic=True)[0], first)  # dropout off
    for before, after in zip(initial, running_means(), strict=True):
        assert th.equal(before, after)

    model.policy.set_training_mode(True)
    assert model.actor.features_extractor.training and model.critic.features_extractor.training
    assert not model.critic_target.training and not model.critic_target.features_extractor.training
    model.train(gradient_steps=2, batch_size=16)
    assert not model.policy.training and not model.actor.features_extractor.training
    actor_after, critic_after, target_after = running_means()
    assert not th.equal(actor_after, initial[0]) and not th.equal(critic_after, initial[1])
    # The target critic stays in eval mode; its statistics are the critic's, copied at the soft update (as SB3's TD3)
    assert th.equal(target_after, critic_after)


def test_policy_saved_before_features_extractors_loads(tmp_path):
    model = FastTD3("MlpPolicy", make_vec_env(CountingEnv, n_envs=2, seed=0), **TINY).learn(60)
    obs = batch_of(CountingEnv())
    actions, _ = model.policy.predict(obs, deterministic=True)
    model.policy.save(tmp_path / "policy.pth")
    # The constructor parameters such a policy file held: no extractor arguments, normalize_images=False
    saved = th.load(tmp_path / "policy.pth", weights_only=False)
    for name in ("features_extractor_class", "features_extractor_kwargs", "share_features_extractor"):
        del saved["data"][name]
    saved["data"]["normalize_images"] = False
    th.save(saved, tmp_path / "old_policy.pth")
    loaded = MlpPolicy.load(tmp_path / "old_policy.pth")
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-6)


def test_cnn_policy_learns_from_pixels():
    # A random policy scores -2/3 and the zero action -1/2; seeds 0, 1 and 2 reached -0.036 to -0.059 (~23 s, 1 core)
    env = make_vec_env(BrightnessTargetEnv, n_envs=4, seed=0)
    model = FastTD3(
        "CnnPolicy",
        env,
        seed=0,
        learning_starts=1000,
        batch_size=64,
        actor_learning_rate=1e-4,
        critic_learning_rate=1e-3,
        num_atoms=21,
        v_min=-2.0,
        v_max=0.5,
        buffer_size=10_000,
        policy_kwargs=dict(net_arch=[64], features_extractor_kwargs=dict(features_dim=32)),
    )
    model.learn(4000)
    mean_reward, _ = evaluate_policy(model, make_vec_env(BrightnessTargetEnv, n_envs=1, seed=100), n_eval_episodes=100)
    assert mean_reward >= -0.25


def test_compiled_updates_trace_preprocessing_without_graph_breaks():
    # Image scaling and one-hot encoding are decided when the policy is built: nothing inspects spaces while tracing
    counters.clear()
    model = mixed_model(compile=True).learn(60)
    assert model._n_updates > 0 and sum(counters["graph_break"].values()) == 0
