"""What an SB3 TD3 script relies on keeps working with FastTD3: arguments, action noise, VecNormalize, callbacks."""

import inspect

import numpy as np
import pytest
import torch as th
from stable_baselines3 import TD3
from stable_baselines3.common.callbacks import BaseCallback, StopTrainingOnMaxEpisodes
from stable_baselines3.common.noise import ActionNoise, VectorizedActionNoise
from stable_baselines3.common.preprocessing import get_flattened_obs_dim
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecNormalize

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.vec_env import NumpyVecEnv
from tests.envs import CountingTorchVecEnv
from tests.test_fasttd3 import TINY, counting_env, make_model, stored_transitions


def test_the_arguments_shared_with_td3_come_in_td3s_order():
    positional = [
        name
        for name, parameter in inspect.signature(FastTD3).parameters.items()
        if parameter.kind == inspect.Parameter.POSITIONAL_OR_KEYWORD
    ]
    td3 = [name for name in inspect.signature(TD3).parameters if name != "_init_setup_model"]
    assert positional == td3


class ConstantNoise(ActionNoise):
    """A noise of ``value`` everywhere, counting its resets."""

    def __init__(self, value: float, action_dim: int = 1):
        super().__init__()
        self.value, self.action_dim, self.resets = value, action_dim, 0

    def __call__(self) -> np.ndarray:
        return np.full(self.action_dim, self.value, dtype=np.float32)

    def reset(self) -> None:
        self.resets += 1


def episodes_per_env(model: FastTD3) -> np.ndarray:
    """Episodes that ended in each env, read from the replay buffer."""
    stored = model.replay_buffer.size()
    return model.replay_buffer.dones[:, :stored].sum(dim=1).numpy()


@pytest.mark.parametrize("value", [3.0, -3.0])
@pytest.mark.parametrize("torch_env", [False, True])
def test_action_noise_replaces_the_mixed_noise_and_is_reset_per_env(value, torch_env):
    n_envs = 3
    env = CountingTorchVecEnv(n_envs) if torch_env else counting_env(n_envs)
    model = FastTD3("MlpPolicy", env, action_noise=ConstantNoise(value), seed=0, **{**TINY, "learning_starts": 30})
    model.learn(120)
    assert model.exploration_noise is None
    assert isinstance(model.action_noise, VectorizedActionNoise)  # SB3 vectorizes it per env
    # Added to warm-up and actor actions alike, then clipped: every stored action is at the bound
    stored = model.replay_buffer.actions[:, : model.replay_buffer.size()]
    assert th.all(stored == np.sign(value))
    # Reset once at the start of learn() (SB3 resets every noise there) and once per finished episode of its env
    resets = np.array([noise.resets for noise in model.action_noise.noises])
    episodes = episodes_per_env(model)
    assert episodes.sum() > 0
    np.testing.assert_array_equal(resets - resets.min() + episodes.min(), episodes)


@pytest.mark.parametrize("torch_env", [False, True])
def test_action_noise_of_one_env_is_reset_without_indices_once_per_episode(torch_env):
    env = CountingTorchVecEnv(1) if torch_env else counting_env(1)
    model = FastTD3("MlpPolicy", env, action_noise=ConstantNoise(0.1), seed=0, **{**TINY, "learning_starts": 0})
    model.learn(40)
    assert episodes_per_env(model)[0] > 0
    assert model.action_noise.resets == 1 + episodes_per_env(model)[0]  # at the start of learn(), then per episode


@pytest.mark.parametrize("new_n_envs", [1, 3])
def test_action_noise_of_a_model_loaded_with_another_number_of_envs(tmp_path, new_n_envs):
    model = make_model(2, action_noise=ConstantNoise(3.0), learning_starts=0)
    model.learn(20)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model", env=counting_env(new_n_envs))
    loaded.learn(20, reset_num_timesteps=False)
    noise = loaded.action_noise
    assert (noise.n_envs if isinstance(noise, VectorizedActionNoise) else 1) == new_n_envs
    stored = loaded.replay_buffer.actions[:, : loaded.replay_buffer.size()]
    assert stored.numel() > 0 and th.all(stored == 1.0)  # the noise, added to every action, clipped to the bound


@pytest.mark.parametrize("norm_obs", [False, True])
def test_vec_normalize_stores_the_original_observations_and_rewards(norm_obs):
    env = VecNormalize(counting_env(2), norm_obs=norm_obs, norm_reward=True)
    # No update: only what is stored is checked here (sampling through VecNormalize is the buffer's to test)
    model = FastTD3("MlpPolicy", env, **{**TINY, "learning_starts": 1000})
    model.learn(60)
    buffer = model.replay_buffer
    size = buffer.size()
    obs, next_obs = buffer.observations[:, :size], buffer.next_observations[:, :size]
    # CountingEnv observes [t, episode, x]: t and the episode are integers only before normalization. A final
    # observation comes back from VecNormalize normalized, and is unnormalized again (to float rounding), as in SB3
    assert th.equal(obs[..., :2], obs[..., :2].round())
    th.testing.assert_close(next_obs[..., :2], next_obs[..., :2].round(), rtol=0, atol=1e-4)
    assert obs[..., 0].max() > 1 and next_obs[..., 0].max() == 10
    # The reward is -|x| of the step's next observation, before any scaling
    th.testing.assert_close(buffer.rewards[:, :size], -next_obs[..., 2].abs())
    # The normalizer used for acting is FastTD3's own only where VecNormalize leaves observations alone
    assert (model.policy.obs_normalizer is None) is norm_obs


def test_a_callback_that_stops_training_keeps_the_last_step_and_resumes_in_the_next_episode():
    # One env, episodes truncated after 10 steps, 3-step returns: the callback stops at the end of episode 0
    model = make_model(1, n_steps=3, learning_starts=1000)
    model.learn(1000, callback=StopTrainingOnMaxEpisodes(max_episodes=1))
    buffer = model.replay_buffer
    end = buffer.size()
    assert model.num_timesteps == end >= 3 and buffer.dones[0, end - 1] and not buffer.dones[0, : end - 1].any()
    model.learn(5, reset_num_timesteps=False)
    # Windows ending on the done step do not run into the next episode
    gamma = model.gamma
    th.testing.assert_close(buffer.discounts[0, end - 3 : end], th.tensor([gamma**3, gamma**2, gamma]))
    # The first transition of the resumed run starts episode 1 (observation [t=0, episode=1, x])
    assert buffer.observations[0, end, :2].tolist() == [0.0, 1.0]


@pytest.mark.parametrize("torch_env", [False, True])
def test_stop_training_on_max_episodes_counts_the_episodes_of_every_env(torch_env):
    # SB3's callback sums the step's dones with NumPy: on the device loop too, where they are tensors
    env = CountingTorchVecEnv(3, bound=1e9) if torch_env else counting_env(3, bound=1e9)
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 1000})
    callback = StopTrainingOnMaxEpisodes(max_episodes=2)
    model.learn(1000, callback=callback)
    # Episodes of 10 steps in each of 3 envs: the sixth episode ends on the 20th vector step
    assert callback.n_episodes == 6 and model.num_timesteps == 60


def test_the_device_loops_callback_locals_read_as_numpy_and_keep_their_tensors():
    seen = {}

    class Record(BaseCallback):
        def _on_step(self) -> bool:
            dones, rewards = self.locals["dones"], self.locals["rewards"]
            seen.setdefault("sums", []).append(np.sum(dones).item())
            seen["rewards"] = (np.asarray(rewards), rewards.tensor, rewards.shape, len(dones), dones[0])
            return True

    model = FastTD3("MlpPolicy", CountingTorchVecEnv(2, bound=1e9), **{**TINY, "learning_starts": 1000})
    model.learn(20, callback=Record())
    assert seen["sums"] == [0] * 9 + [2]  # both envs truncated at the 10th step
    array, tensor, shape, length, first = seen["rewards"]
    assert isinstance(array, np.ndarray) and isinstance(tensor, th.Tensor) and np.array_equal(array, tensor.numpy())
    assert shape == (2,) and length == 2 and first == True  # noqa: E712 (a NumPy bool)


def test_the_device_loops_callback_locals_take_numpys_operators():
    counts = {"numpy": [], "device": []}

    class Count(BaseCallback):
        def __init__(self, loop: str):
            super().__init__()
            self.loop = loop

        def _on_step(self) -> bool:
            dones, rewards = self.locals["dones"], self.locals["rewards"]
            ops = (dones == True, dones == 1, ~dones, rewards < -0.5, rewards * 0 + 1)  # noqa: E712
            counts[self.loop].append([int(np.sum(value)) for value in ops])
            return True

    for loop, env in (
        ("numpy", NumpyVecEnv(CountingTorchVecEnv(3, max_steps=4))),
        ("device", CountingTorchVecEnv(3, max_steps=4)),
    ):
        FastTD3("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 1000}).learn(24, callback=Count(loop))
    assert counts["device"] == counts["numpy"] and sum(count[0] for count in counts["numpy"]) == 6


def test_tau_zero_freezes_the_targets():
    model = make_model(2, tau=0.0, learning_starts=20)
    model.learn(60)
    assert model._n_updates > 0
    for online, target in zip(model.critic.parameters(), model.critic_target.parameters(), strict=True):
        assert not th.equal(online, target)
    fresh = make_model(2, tau=0.0)
    for initial, target in zip(fresh.critic_target.parameters(), model.critic_target.parameters(), strict=True):
        assert th.equal(initial, target)


def test_a_replaced_lr_schedule_applies_at_the_next_train_call():
    # SB3's algorithms read lr_schedule at each train() call: setting it to zero freezes the networks
    model = make_model(2, learning_starts=20)
    model.learn(60)
    model.lr_schedule = lambda _: 0.0
    trained = [*model.actor.parameters(), *model.critic.parameters()]
    before = [p.clone() for p in trained]
    model.train(gradient_steps=4, batch_size=16)
    assert all(th.equal(b, p) for b, p in zip(before, trained, strict=True))
    # An explicit actor or critic rate overrides it
    model.critic_learning_rate = 1e-3
    model.critic_lr_schedule = lambda _: 1e-3
    model.train(gradient_steps=4, batch_size=16)
    assert not all(th.equal(b, p) for b, p in zip(before, trained, strict=True))


def test_train_has_td3s_default_batch_size():
    assert inspect.signature(FastTD3.train).parameters["batch_size"].default == 100
    assert inspect.signature(TD3.train).parameters["batch_size"].default == 100


@pytest.mark.parametrize("dict_obs", [False, True])
def test_the_actor_alone_predicts_as_the_policy_and_survives_save_load(tmp_path, dict_obs):
    # The actor applies the policy's normalizer in predict(): a saved actor acts as the whole policy does
    model = make_model(2, dict_obs=dict_obs, use_target_actor=True)
    model.learn(60)
    obs = model.env.reset()
    actions, _ = model.predict(obs, deterministic=True)
    assert np.array_equal(model.actor.predict(obs, deterministic=True)[0], actions)
    model.actor.save(tmp_path / "actor.pkl")
    loaded = type(model.actor).load(tmp_path / "actor.pkl")
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], actions)
    assert model.actor.obs_normalizer is model.policy.obs_normalizer is model.actor_target.obs_normalizer


def test_q_values_read_as_documented_are_those_the_actor_follows():
    # docs/guide/sb3_td3.md: the critic returns logits over normalized observations; q_values gives TD3's Q-values
    model = make_model(2)
    model.learn(200)
    obs = model.env.reset()
    env_actions, _ = model.predict(obs, deterministic=True)
    obs_tensor, _ = model.policy.obs_to_tensor(obs)
    actions = th.as_tensor(model.policy.scale_action(env_actions), device=model.device)
    with th.no_grad():
        q_values = model.policy.q_values(model.critic, model.policy.critic_input(obs_tensor), actions)
        actor_loss = model._actor_loss(obs_tensor)
    assert q_values.shape == (2, 2)
    assert th.allclose(q_values.min(dim=0).values.mean(), -actor_loss, atol=1e-5)


class ExportablePolicy(th.nn.Module):
    """SB3's export recipe: the policy called deterministically."""

    def __init__(self, policy: th.nn.Module):
        super().__init__()
        self.policy = policy

    def forward(self, observation: th.Tensor) -> th.Tensor:
        return self.policy(observation, deterministic=True)


def test_the_exported_policy_normalizes_and_acts_with_the_average_as_predict_does():
    model = make_model(2, actor_average_tau=0.05)
    model.learn(200)
    obs = th.as_tensor(model.env.reset())
    model.policy.set_training_mode(False)
    exported = th.export.export(ExportablePolicy(model.policy), (obs,)).module()
    policy = model.policy
    with th.no_grad():
        expected = policy.actor_average(policy.obs_normalizer(obs))
        th.testing.assert_close(exported(obs), expected)
        assert not th.allclose(policy.actor(obs), expected, atol=1e-3)  # the actor alone: raw input, not averaged
    actions, _ = model.predict(obs.numpy(), deterministic=True)
    np.testing.assert_allclose(actions, policy.unscale_action(expected.numpy()), rtol=1e-5, atol=1e-6)


def test_a_policy_state_dict_with_the_normalizer_under_the_policy_only_still_loads():
    model = make_model(2)
    model.learn(60)
    state = {k: v for k, v in model.policy.state_dict().items() if not k.startswith("actor.obs_normalizer.")}
    fresh = make_model(2)
    fresh.policy.load_state_dict(state)
    assert th.equal(fresh.actor.obs_normalizer.mean, model.policy.obs_normalizer.mean)
    assert fresh.actor.obs_normalizer.count.item() == 60


class BatchNormExtractor(BaseFeaturesExtractor):
    """Flatten then BatchNorm: running statistics that training changes."""

    def __init__(self, observation_space):
        super().__init__(observation_space, get_flattened_obs_dim(observation_space))
        self.norm = th.nn.BatchNorm1d(self.features_dim)

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.norm(observations.flatten(start_dim=1))


def test_batch_norm_statistics_reach_the_targets():
    model = make_model(2, use_target_actor=True, policy_kwargs=dict(features_extractor_class=BatchNormExtractor))
    model.learn(60)
    pairs = [(model.critic, model.critic_target), (model.actor, model.actor_target)]
    for online, target in pairs:
        online_mean = online.features_extractor.norm.running_mean
        assert not th.equal(online_mean, th.zeros_like(online_mean))
        assert th.equal(target.features_extractor.norm.running_mean, online_mean)
        assert th.equal(target.features_extractor.norm.running_var, online.features_extractor.norm.running_var)


def test_a_lean_buffer_keeps_the_last_transition_when_learn_starts_over(recwarn):
    # SB3 marks the lean buffer's last transition done (and warns); here it keeps its next observation instead,
    # so both layouts hold the same transitions after learn() starts over
    transitions = {}
    for lean in (False, True):
        model = make_model(2, optimize_memory_usage=lean, n_steps=1, seed=3)
        model.learn(30)
        model.learn(30)
        transitions[lean] = stored_transitions(model)
    assert transitions[True] == transitions[False]
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_load_replay_buffer_into_a_model_without_one(tmp_path):
    model = make_model(2, buffer_size=200)
    model.learn(40)
    model.save_replay_buffer(tmp_path / "buffer")
    observations = model.replay_buffer.observations.clone()
    model.replay_buffer = None
    model.load_replay_buffer(tmp_path / "buffer")
    assert th.equal(model.replay_buffer.observations, observations)


def test_a_shared_extractor_is_shared_by_the_targets_too_and_soft_updated_once():
    kwargs = dict(features_extractor_class=BatchNormExtractor, share_features_extractor=True)
    model = make_model(2, use_target_actor=True, policy_delay=1, tau=0.5, policy_kwargs=kwargs)
    assert model.actor_target.features_extractor is model.critic_target.features_extractor
    model.learn(40)
    target = list(model.critic_target.features_extractor.parameters())
    before = [param.clone() for param in target]
    model.train(gradient_steps=1, batch_size=16)
    online = list(model.critic.features_extractor.parameters())
    for old, new, param in zip(before, target, online, strict=True):
        th.testing.assert_close(new, old + 0.5 * (param - old))


def test_parameters_copied_from_another_model_leave_its_optimizers_independent():
    source = make_model(2, learning_starts=20)
    source.learn(40)
    copy = make_model(2, learning_starts=20)
    copy.set_parameters(source.get_parameters())
    states = [copy.critic.optimizer.state_dict(), copy.actor.optimizer.state_dict()]
    expected = [{k: v["exp_avg"].clone() for k, v in state["state"].items()} for state in states]
    source.train(gradient_steps=2, batch_size=16)
    for state, before in zip(states, expected, strict=True):
        assert all(th.equal(state["state"][k]["exp_avg"], v) for k, v in before.items())


@pytest.mark.parametrize(
    "optimizer_class, weight_decay, fused",
    [(th.optim.AdamW, 0.1, True), (th.optim.Adam, 0, True), (th.optim.RMSprop, 0, None)],
)
def test_another_optimizer_class_gets_its_own_defaults(optimizer_class, weight_decay, fused):
    # AdamW's weight decay is FastTD3's default, not the others': TD3's Adam keeps torch's defaults
    model = make_model(2, policy_kwargs=dict(TINY["policy_kwargs"], optimizer_class=optimizer_class))
    model.learn(30)
    for optimizer in (model.actor.optimizer, model.critic.optimizer):
        assert type(optimizer) is optimizer_class
        assert (optimizer.defaults["weight_decay"], optimizer.defaults.get("fused")) == (weight_decay, fused)


@pytest.mark.parametrize("layout", [{}, dict(batched_critics=False), dict(architecture="simbav2", net_arch=[16])])
def test_the_critic_counts_its_q_networks_as_td3s_does(layout):
    model = make_model(1, policy_kwargs={**TINY["policy_kwargs"], **layout, "n_critics": 3})
    logits = model.critic(th.zeros(4, 3), th.zeros(4, 1))
    assert model.critic.n_critics == model.critic_target.n_critics == len(logits) == 3
