"""Bad input is refused early, with the parameter's name and the accepted values."""

from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.type_aliases import TrainFrequencyUnit
from stable_baselines3.common.vec_env import VecEnvWrapper, VecMonitor, VecNormalize, VecTransposeImage

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import parse_schedule
from tests.envs import BrightnessTargetEnv, CountingEnv, CountingTorchVecEnv
from tests.test_fasttd3 import TINY, counting_env, make_model


class SpaceEnv(gym.Env):
    def __init__(self, action_space: spaces.Space, observation_space: spaces.Space | None = None):
        self.action_space = action_space
        self.observation_space = observation_space or spaces.Box(-1, 1, (2,), np.float32)

    def reset(self, *, seed=None, options=None):
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


@pytest.mark.parametrize(
    ("action_space", "error", "match"),
    [
        (spaces.Discrete(3), TypeError, "Box"),
        (spaces.MultiDiscrete([2, 3]), TypeError, "Box"),
        (spaces.Box(-np.inf, np.inf, (2,), np.float32), ValueError, "bounded"),
    ],
)
def test_unsupported_action_spaces(action_space, error, match):
    with pytest.raises(error, match=match):
        FastTD3("MlpPolicy", make_vec_env(lambda: SpaceEnv(action_space)))


def test_unsupported_action_space_of_an_env_id():
    with pytest.raises(TypeError, match="Box"):
        FastTD3("MlpPolicy", "CartPole-v1")


def test_unsupported_observation_space():
    obs_space = spaces.Dict({"a": spaces.Tuple([spaces.Discrete(3), spaces.Discrete(2)])})
    with pytest.raises(TypeError, match="observation spaces Box, Discrete, MultiDiscrete, MultiBinary"):
        FastTD3("MultiInputPolicy", SpaceEnv(spaces.Box(-1, 1, (1,)), obs_space))


@pytest.mark.parametrize("dict_obs", [False, True])
def test_a_box_observation_of_shape_nothing_is_refused(dict_obs):
    scalar = spaces.Box(-1, 1, (), np.float32)
    obs_space = spaces.Dict({"scalar": scalar, "vector": spaces.Box(-1, 1, (2,), np.float32)}) if dict_obs else scalar
    with pytest.raises(ValueError, match=r"Box observations of at least one dimension, got a Box of shape \(\)"):
        FastTD3("MultiInputPolicy" if dict_obs else "MlpPolicy", SpaceEnv(spaces.Box(-1, 1, (1,)), obs_space))


@pytest.mark.parametrize("wrap", [VecMonitor, partial(VecNormalize, norm_obs=False)])
def test_a_torch_vec_env_inside_sb3s_wrappers_is_refused(wrap):
    with pytest.raises(TypeError, match=r"env is a CountingTorchVecEnv inside Vec(Monitor|Normalize): .*NumpyVecEnv\(env\)"):
        FastTD3("MlpPolicy", wrap(CountingTorchVecEnv(2)), **TINY)
    model = make_model()
    with pytest.raises(TypeError, match="CountingTorchVecEnv inside"):
        model.set_env(wrap(CountingTorchVecEnv(1)))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(v_min=10.0, v_max=10.0), "v_min must be smaller than v_max"),
        (dict(v_min=5.0, v_max=-5.0), "v_min must be smaller than v_max"),
        (dict(num_atoms=1), "num_atoms must be an integer >= 2"),
        (dict(n_steps=0), "n_steps must be an integer >= 1"),
        (dict(n_step_start=-1), "n_step_start must be an integer >= 0"),
        (dict(n_step_start=2e4), "n_step_start must be an integer >= 0"),
        (dict(n_steps=2, n_step_start=10, replay_buffer_class=NStepReplayBuffer), "n_step_start needs a replay buffer"),
        (dict(n_step_max_noise=-0.1), "n_step_max_noise must be None or a float >= 0"),
        (dict(n_step_max_noise="0.2"), "n_step_max_noise must be None or a float >= 0"),
        (
            dict(n_steps=2, n_step_max_noise=0.2, replay_buffer_class=NStepReplayBuffer),
            "n_step_max_noise needs a replay buffer .* give n_step_max_noise=None",
        ),
        (dict(std_min=0.5, std_max=0.1), "std_min must be <= std_max"),
        (dict(std_min=-0.1), "std_min must be a float >= 0"),
        (dict(tau=-0.1), r"tau must be in \[0, 1\]"),
        (dict(tau=1.5), r"tau must be in \[0, 1\]"),
        (dict(actor_average_tau=0.0), r"actor_average_tau must be None or a float in \(0, 1\], got 0.0"),
        (dict(actor_average_tau=1.5), r"actor_average_tau must be None or a float in \(0, 1\]"),
        (dict(actor_average_tau="1e-3"), r"actor_average_tau must be None .* YAML reads a float without a dot"),
        (dict(policy_kwargs=dict(average_actor=True)), r"policy_kwargs must not contain \['average_actor'\]"),
        (dict(replay_buffer_kwargs=dict(optimize_memory_usage=True)), r"replay_buffer_kwargs must not contain"),
        (dict(replay_buffer_class=dict), "replay_buffer_class must be DeviceNStepReplayBuffer .*HerReplayBuffer"),
        (dict(n_steps=3, replay_buffer_class=ReplayBuffer), "n_steps=3 needs a replay buffer of n-step returns"),
        (dict(policy_kwargs=dict(num_atoms=51)), r"policy_kwargs must not contain \['num_atoms'\]: pass them to FastTD3"),
        (dict(policy_kwargs=dict(v_min=-1, use_target_actor=True)), r"\['use_target_actor', 'v_min'\]"),
        (dict(gamma=0.0), r"gamma must be in \(0, 1\]"),
        (dict(gamma=1.01), r"gamma must be in \(0, 1\]"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(policy_delay=0), "policy_delay must be an integer >= 1"),
        (dict(buffer_size=7, n_steps=3), r"buffer_size=7 is too small.* at least n_envs \* \(n_steps \+ 1\) = 8"),
        (dict(max_grad_norm=0.0), "max_grad_norm must be None or a float > 0"),
        (dict(target_policy_noise=-1.0), "target_policy_noise must be a float >= 0"),
        (dict(clip_obs=0.0), "clip_obs must be None or a float > 0"),
        (dict(epsilon_on_std="yes"), "epsilon_on_std must be True or False"),
        (dict(actor_q="q2"), r"actor_q must be one of \['all', 'q1'\], got 'q2'"),
        (dict(warmup_actions="random"), r"warmup_actions must be one of \['uniform', 'actor'\], got 'random'"),
        (dict(train_freq=0), r"train_freq must be an integer >= 1 or a tuple \(n >= 1, 'step' \| 'episode'\), got 0"),
        (dict(train_freq=(-1, "step")), r"train_freq must be an integer >= 1 .*got \(-1, 'step'\)"),
        (dict(policy_delay=True), "policy_delay must be an integer >= 1, got True"),
        (dict(use_cdq="no"), "use_cdq must be True or False, got 'no'"),
        (dict(use_target_actor="False"), "use_target_actor must be True or False"),
        (dict(compile="no"), "compile must be True or False"),
        (dict(std_max=float("inf")), "std_max must be a finite float, got inf"),
        (dict(action_noise="normal"), r"action_noise must be None .* or an SB3 ActionNoise, e.g. NormalActionNoise"),
        (dict(action_noise=NormalActionNoise), r"action_noise must be None .* or an SB3 ActionNoise"),
        (dict(policy_kwargs=dict(n_critics=0)), "n_critics must be an integer >= 1, got 0"),
        (dict(policy_kwargs=dict(net_arch=dict(pi=[8]))), "net_arch as a dict must have the keys 'pi' .* and 'qf'"),
        (
            dict(policy_kwargs=dict(activation_fn=th.nn.PReLU, batched_critics=True)),
            "batched_critics=True needs an activation_fn without parameters .* got PReLU",
        ),
    ],
)
def test_bad_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_model(2, **kwargs)


def test_bad_observation_keys():
    with pytest.raises(ValueError, match="actor_keys must be a non-empty list of observation keys"):
        make_model(dict_obs=True, policy_kwargs=dict(actor_keys=["missing"]))
    with pytest.raises(ValueError, match="only accepted with a Dict observation space"):
        make_model(policy_kwargs=dict(critic_keys=["state"]))


def test_vec_normalize_normalizing_observations_twice_is_refused():
    with pytest.raises(ValueError, match="normalize_observations"):
        FastTD3("MlpPolicy", VecNormalize(counting_env(1)), normalize_observations=True)
    model = make_model()
    env = model.get_env()
    with pytest.raises(ValueError, match="VecNormalize"):
        model.set_env(VecNormalize(counting_env(1)))
    assert model.get_env() is env  # the model keeps its env
    with pytest.raises(ValueError, match="normalize_observations must be True, False or 'auto', got 'yes'"):
        make_model(normalize_observations="yes")


@pytest.mark.parametrize("norm_obs", [False, True])
def test_vec_normalize_is_accepted_where_it_cannot_normalize_twice(norm_obs):
    # "auto" leaves observations to a VecNormalize that normalizes them, and normalizes them itself otherwise
    model = FastTD3("MlpPolicy", VecNormalize(counting_env(1), norm_obs=norm_obs), **TINY)
    assert model.normalize_observations is not norm_obs
    assert (model.policy.obs_normalizer is None) is norm_obs
    # A model without its own normalizer accepts any VecNormalize
    FastTD3("MlpPolicy", VecNormalize(counting_env(1)), normalize_observations=False, **TINY)


def test_vec_normalize_inside_the_image_transpose_is_refused():
    venv = make_vec_env(BrightnessTargetEnv, n_envs=1, env_kwargs=dict(channel_last=True))
    with pytest.raises(ValueError, match="VecNormalize inside a VecTransposeImage"):
        FastTD3("CnnPolicy", VecTransposeImage(VecNormalize(venv, norm_obs=False)), **TINY)
    FastTD3("CnnPolicy", VecNormalize(VecTransposeImage(venv), norm_obs=False), **TINY)  # transposed first: accepted


@pytest.mark.parametrize("dict_obs", [False, True])
def test_non_finite_observation_fails_with_env_and_step_and_stores_nothing(tmp_path, dict_obs):
    # Env 1 returns NaN at its 7th step (global steps start at 1)
    env = make_vec_env(CountingEnv, n_envs=2, seed=0, env_kwargs=dict(dict_obs=dict_obs, max_steps=100))
    env.envs[1].unwrapped.nan_at = 7
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    model = FastTD3(policy, env, seed=0, **TINY)
    with pytest.raises(ValueError, match=r"Env 1 returned a non-finite .*observation.* at timestep 14"):
        model.learn(100)
    # The six good steps are in the buffer, nothing of the bad one
    assert model.replay_buffer.size() == 6
    storage = model.replay_buffer.next_observations
    for tensor in storage.values() if dict_obs else [storage]:
        assert th.isfinite(tensor[:, :6]).all()
    model.save(tmp_path / "model")  # the model is intact
    FastTD3.load(tmp_path / "model")


def test_non_finite_reward_fails():
    class NanRewardEnv(CountingEnv):
        def step(self, action):
            obs, reward, terminated, truncated, info = super().step(action)
            return obs, (np.inf if self.global_step == 3 else reward), terminated, truncated, info

    model = FastTD3("MlpPolicy", make_vec_env(NanRewardEnv, n_envs=1), **TINY)
    with pytest.raises(ValueError, match=r"Env 0 returned a non-finite .*reward at timestep 3"):
        model.learn(50)


@pytest.mark.parametrize("torch_env", [False, True])
def test_a_non_finite_observation_from_reset_leaves_the_normalizer_unchanged(torch_env):
    if torch_env:
        env = CountingTorchVecEnv(num_envs=2, nan_at=0)
    else:
        env = make_vec_env(CountingEnv, n_envs=2, seed=0, env_kwargs=dict(nan_at=0))  # NaN before the first step
    model = FastTD3("MlpPolicy", env, seed=0, **TINY)
    with pytest.raises(ValueError, match=r"Env 0 returned a non-finite \(NaN or inf\) observation from reset\(\)"):
        model.learn(10)
    normalizer = model.policy.obs_normalizer
    assert normalizer.count.item() == 0 and th.isfinite(normalizer.mean).all() and th.isfinite(normalizer.var).all()


class DropsFinalObservations(VecEnvWrapper):
    """A VecEnv whose infos lack ``terminal_observation``."""

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        obs, rewards, dones, infos = self.venv.step_wait()
        for info in infos:
            info.pop("terminal_observation", None)
        return obs, rewards, dones, infos


def test_an_episode_end_without_its_final_observation_fails_and_stores_nothing_of_the_step():
    env = DropsFinalObservations(make_vec_env(CountingEnv, n_envs=2, seed=0, env_kwargs=dict(max_steps=5)))
    model = FastTD3("MlpPolicy", env, seed=0, **TINY)
    with pytest.raises(ValueError, match=r"Env 0 ended an episode at timestep 10 without info\['terminal_observation'\]"):
        model.learn(100)
    assert model.replay_buffer.size() == 4  # the four steps before, nothing of the fifth


@pytest.mark.parametrize(
    ("name", "accepted"),
    [
        ("learning_rate", "a float >= 0 or a schedule"),
        ("critic_learning_rate", "a float >= 0 or a schedule"),
        ("gamma", "a number"),
        ("tau", "a number"),
        ("v_max", "a number"),
        ("learning_starts", "a number"),
        ("max_grad_norm", "None or a float > 0"),
    ],
)
def test_a_number_given_as_a_string_names_the_parameter_and_the_yaml_fix(name, accepted):
    # PyYAML, which reads the RL Zoo's files, loads `1e-3` (no dot) as the string '1e-3'
    with pytest.raises(ValueError, match=rf"{name} must be {accepted}.*, got '1e-3' \(a string: YAML .* write 1.0e-3"):
        make_model(**{name: "1e-3"})


def test_numpy_scalars_are_numbers():
    model = make_model(tau=np.float32(0.01), gamma=np.float64(0.98), learning_starts=np.int64(10), v_max=np.float32(10))
    model.learn(30)  # the updates use them
    assert model.num_timesteps >= 30


def test_numpy_integers_are_integers():
    integers = dict(batch_size=np.int64(8), policy_delay=np.int32(2), gradient_steps=np.int64(2), n_step_start=np.int64(0))
    model = make_model(**integers, n_steps=np.int64(3))
    model.learn(40)
    assert model._n_updates == 2 * (40 - TINY["learning_starts"])  # two updates per step after warm-up
    for train_freq in (np.int64(2), (np.int32(2), "step")):  # SB3's own conversion refuses NumPy integers
        assert tuple(make_model(train_freq=train_freq).train_freq) == (2, TrainFrequencyUnit.STEP)


@pytest.mark.parametrize("name", ["learning_rate", "actor_learning_rate", "critic_learning_rate"])
def test_learning_rates_must_be_non_negative_or_schedules(name):
    with pytest.raises(ValueError, match=rf"{name} must be a float >= 0 or a schedule"):
        make_model(**{name: -1e-3})
    make_model(**{name: 0.0})  # frozen, as the RL Zoo's enjoy loads models
    make_model(**{name: lambda progress: 1e-3 * progress})  # a schedule is accepted


@pytest.mark.parametrize("value", ["lin_fast", "LinearSchedule(0.001)", "print(1)", "0.001 * 2"])
def test_a_bad_schedule_string_names_the_parameter_and_the_accepted_forms(value):
    accepted = r"actor_learning_rate takes a float, lin_<rate>, LinearSchedule\(start, end, end_fraction\) or Delayed"
    with pytest.raises(ValueError, match=accepted):
        parse_schedule("actor_learning_rate", value)


def test_action_noise_of_another_shape_fails_before_the_first_step():
    model = make_model(2, action_noise=NormalActionNoise(np.zeros(3), np.ones(3)))
    with pytest.raises(ValueError, match=r"action_noise must return noise of the action shape \(1,\).*got \(2, 3\)"):
        model.learn(10)
    assert model.replay_buffer.size() == 0


@pytest.mark.parametrize("correlation", [0.0, "20"])
def test_a_bad_noise_correlation_is_refused_at_construction(correlation):
    with pytest.raises(ValueError, match=r"noise_correlation must be None .* or a number of steps > 0"):
        make_model(noise_correlation=correlation)


def test_noise_correlation_with_action_noise_is_refused():
    with pytest.raises(ValueError, match="noise_correlation shapes the mixed exploration noise, which action_noise"):
        make_model(noise_correlation=20.0, action_noise=NormalActionNoise(np.zeros(1), np.ones(1)))


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_stratified_noise_must_be_a_bool(value):
    with pytest.raises(ValueError, match=r"stratified_noise must be True or False"):
        make_model(stratified_noise=value)


def test_stratified_noise_with_action_noise_is_refused():
    with pytest.raises(ValueError, match="stratified_noise shapes the mixed exploration noise, which action_noise"):
        make_model(stratified_noise=True, action_noise=NormalActionNoise(np.zeros(1), np.ones(1)))


def test_n_step_max_noise_with_action_noise_is_refused():
    with pytest.raises(ValueError, match="n_step_max_noise reads the scales of the mixed exploration noise"):
        make_model(n_step_max_noise=0.2, action_noise=NormalActionNoise(np.zeros(1), np.ones(1)))


@pytest.mark.parametrize(
    ("setting", "match"),
    [
        (dict(noise_correlation=20.0), "noise_correlation shapes the mixed exploration noise"),
        (dict(stratified_noise=True), "stratified_noise shapes the mixed exploration noise"),
        (dict(n_steps=3, n_step_max_noise=0.2), "n_step_max_noise reads the scales of the mixed exploration noise"),
    ],
)
def test_action_noise_set_after_construction_gets_the_same_refusals(setting, match):
    # SB3 lets model.action_noise be set on a built model: learn() checks it again, before anything is collected
    model = make_model(**setting)
    model.action_noise = NormalActionNoise(np.zeros(1), 0.1 * np.ones(1))
    with pytest.raises(ValueError, match=match):
        model.learn(30)
    assert model.num_timesteps == 0


@pytest.mark.parametrize("torch_env", [False, True])
def test_a_diverged_actor_is_named_and_not_the_env(torch_env):
    env = CountingTorchVecEnv(2) if torch_env else counting_env(2)
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 0})
    with th.no_grad():
        model.actor.mu[0].weight.fill_(float("nan"))
    with pytest.raises(ValueError, match=r"The action for env 0 at timestep 2 is non-finite .* the actor's weights"):
        model.learn(10)
    assert model.replay_buffer.size() == 0


def test_a_bad_device_string_is_refused_at_construction():
    with pytest.raises(ValueError, match=r"device must be 'auto', a device type .*'cuda:N'.*got 'gpu0'"):
        make_model(device="gpu0")


def test_loading_with_an_env_of_other_spaces_is_refused(tmp_path):
    make_model(2).save(tmp_path / "model")
    other = make_vec_env(lambda: SpaceEnv(spaces.Box(-1, 1, (1,), np.float32)), n_envs=2)
    with pytest.raises(ValueError, match="Observation spaces do not match"):
        FastTD3.load(tmp_path / "model", env=other)


class RaisingCallback(BaseCallback):
    def _on_step(self) -> bool:
        if self.num_timesteps >= 6:
            raise KeyError("a bug in the callback")
        return True


def test_a_callback_that_raises_propagates_and_leaves_the_model_saveable(tmp_path):
    model = make_model(2)
    with pytest.raises(KeyError, match="a bug in the callback"):
        model.learn(100, callback=RaisingCallback())
    assert model.num_timesteps == 6 and model.replay_buffer.size() == 3  # the step was stored before the callback
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    model.learn(10, reset_num_timesteps=False)
