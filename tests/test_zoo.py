"""RL Zoo integration in-process: registration, default config, the Optuna sampler, the fallback CLI."""

import inspect
import pickle
import sys
from argparse import Namespace
from functools import partial

import gymnasium as gym
import numpy as np
import pytest
import torch as th
import yaml
from stable_baselines3 import HerReplayBuffer
from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.noise import NormalActionNoise
from stable_baselines3.common.type_aliases import TrainFrequencyUnit

pytest.importorskip("rl_zoo3")

import optuna  # a dependency of rl_zoo3: skipped with it where the zoo extra is not installed
from rl_zoo3 import exp_manager, hyperparams_opt, utils

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import HYPERPARAMS_FILE, load_hyperparams, zoo_entry
from sb3_fasttd3.zoo import NET_ARCHS, convert_fasttd3_params, register, sample_fasttd3_params
from sb3_fasttd3.zoo.__main__ import main as zoo_main

MUJOCO_TASKS = [
    "HalfCheetah",
    "Hopper",
    "Walker2d",
    "Ant",
    "Humanoid",
    "HumanoidStandup",
    "Swimmer",
    "Reacher",
    "Pusher",
    "InvertedPendulum",
    "InvertedDoublePendulum",
]


def test_registered_into_the_zoo():
    register()
    register()  # idempotent
    assert utils.ALGOS["fasttd3"] is FastTD3
    assert hyperparams_opt.HYPERPARAMS_SAMPLER["fasttd3"] is sample_fasttd3_params
    assert hyperparams_opt.HYPERPARAMS_CONVERTER["fasttd3"] is convert_fasttd3_params
    # Wrapped once only, and still the Zoo's own signature
    init = exp_manager.ExperimentManager.__init__
    assert not getattr(init.__wrapped__, "_sb3_fasttd3_patched", False)
    assert "config" in inspect.signature(init).parameters


def test_hook_watches_the_patched_modules():
    """The start-up hook cannot import the package: its own list of Zoo modules must match the patches."""
    import _sb3_fasttd3_zoo_hook
    from sb3_fasttd3.zoo.registration import PATCHES

    assert set(PATCHES) == _sb3_fasttd3_zoo_hook.PATCHED_MODULES


@pytest.mark.parametrize(
    "algo, config, expected",
    [("fasttd3", None, str(HYPERPARAMS_FILE)), ("fasttd3", "mine.yml", "mine.yml"), ("td3", None, "hyperparams/td3.yml")],
)
def test_default_config(tmp_path, algo, config, expected):
    register()
    manager = exp_manager.ExperimentManager(Namespace(), algo, "Pendulum-v1", str(tmp_path), config=config)
    assert manager.config.endswith(expected)


def test_packaged_config_has_every_task_and_each_entry_makes_its_env():
    entries = yaml.safe_load(HYPERPARAMS_FILE.read_text())
    for task in MUJOCO_TASKS:
        entry = entries[f"{task}-v5"]
        assert entry != entries["default"] and entry["v_min"] < entry["v_max"], task
        assert entries.get(f"{task}-v4", entry) == entry, f"{task}-v4 should share the v5 entry"
    assert zoo_entry("Pendulum-v1")["num_atoms"] == 51
    for env_id in set(entries) - {"default"}:  # an entry the installed gymnasium and mujoco cannot run is dead
        gym.make(env_id).close()


@pytest.mark.parametrize("seed", range(4))
def test_sampler_builds_a_model(seed, monkeypatch):
    resets = []
    monkeypatch.setattr(th._dynamo, "reset", lambda: resets.append(1))
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
    kwargs = sample_fasttd3_params(trial, n_actions=1, n_envs=4, additional_args={})
    assert resets == [1]
    # The converter turns the stored parameters (what -optimize saves) into the same arguments
    assert convert_fasttd3_params(trial.params) == kwargs
    assert kwargs["v_min"] < 0 < kwargs["v_max"]
    assert kwargs["batch_size"] == trial.user_attrs["batch_size"] == 2 ** trial.params["batch_size_pow"]
    assert kwargs["policy_kwargs"]["net_arch"] in NET_ARCHS.values()
    assert set(kwargs) <= set(inspect.signature(FastTD3).parameters)
    model = FastTD3("MlpPolicy", "Pendulum-v1", **kwargs)
    assert model.num_atoms == kwargs["num_atoms"] and model.std_max == kwargs["std_max"]
    assert model.gamma == kwargs["gamma"] and model.noise_correlation == kwargs["noise_correlation"]
    assert model.policy.layer_norm is trial.params["critic_layer_norm"]


def test_sampled_values_replace_the_entrys_rates_and_action_noise():
    # Hopper-v5's entry sets the actor's and the critic's rates, which would override the sampled learning_rate
    entry, _ = load_hyperparams("Hopper-v5")
    noise = dict(action_noise=NormalActionNoise(np.zeros(1), 0.1 * np.ones(1)))  # as the Zoo makes of noise_type
    for seed in range(6):  # some trials sample noise_correlation, which an action_noise would refuse
        trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=seed)).ask()
        kwargs = {**entry, **noise, **sample_fasttd3_params(trial, n_actions=1, n_envs=4, additional_args={})}
        kwargs.update(compile=False, amp_dtype=None, learning_starts=0)
        model = FastTD3(env="Pendulum-v1", **kwargs)
        assert model._current_learning_rates() == (trial.params["learning_rate"],) * 2
        assert model.action_noise is None


def test_sampler_with_her_searches_hers_arguments_and_one_step_returns():
    her_kwargs = dict(goal_selection_strategy="future", n_sampled_goal=4, copy_info_dict=True)
    trial = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0)).ask()
    args = dict(using_her_replay_buffer=True, her_kwargs=her_kwargs)
    kwargs = sample_fasttd3_params(trial, n_actions=1, n_envs=1, additional_args=args)
    assert "n_steps" not in trial.params and kwargs["n_steps"] == 1
    buffer_kwargs = kwargs["replay_buffer_kwargs"]
    assert buffer_kwargs["copy_info_dict"] is True  # the entry's other HER arguments are kept
    assert buffer_kwargs["n_sampled_goal"] == trial.params["n_sampled_goal"]
    # The converter (--trial-id) gives the searched ones
    converted = convert_fasttd3_params(trial.params)
    assert converted["n_steps"] == 1 and converted["replay_buffer_kwargs"]["n_sampled_goal"] == trial.params["n_sampled_goal"]
    env = BitFlippingEnv(n_bits=4, continuous=True, max_steps=4)
    kwargs.update(compile=False, amp_dtype=None, learning_starts=16, buffer_size=1000)
    model = FastTD3("MultiInputPolicy", env, replay_buffer_class=HerReplayBuffer, **kwargs)
    model.learn(40)
    assert model.replay_buffer.n_sampled_goal == trial.params["n_sampled_goal"]


def test_sampler_searches_noise_correlation_and_layer_norm():
    """The levers the tuned entries differ by are in the search space: correlated noise, LayerNorm critics, gamma."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = [sample_fasttd3_params(study.ask(), n_actions=1, n_envs=4, additional_args={}) for _ in range(40)]
    assert {kwargs["noise_correlation"] is None for kwargs in seen} == {True, False}
    assert {kwargs["policy_kwargs"]["layer_norm"] for kwargs in seen} == {True, False}
    assert len({kwargs["gamma"] for kwargs in seen}) > 2
    # The parameters of a trial sampled before LayerNorm critics were in the space still convert
    older = {key: value for key, value in study.trials[0].params.items() if key != "critic_layer_norm"}
    assert convert_fasttd3_params(older)["policy_kwargs"]["layer_norm"] is False


def test_fallback_cli_rejects_unknown_script():
    with pytest.raises(SystemExit, match="must be one of"):
        zoo_main(["tain", "--algo", "fasttd3"])


def test_fallback_cli_trains(tmp_path, monkeypatch):
    """``python -m sb3_fasttd3.zoo train``: registration by hand, then the Zoo's own script."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "400", "-f", "logs", "--hyperparams", "learning_starts:200"]
    zoo_main(["train", *args])
    model = FastTD3.load(tmp_path / "logs" / "fasttd3" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    assert model.num_timesteps == 400 and model.batch_size == zoo_entry("Pendulum-v1")["batch_size"]
    assert model.policy.obs_normalizer.count.item() > 0


def test_load_hyperparams_reads_an_entry_as_the_zoo_does(tmp_path):
    zoo_keys = {
        "env_kwargs": {"g": 9.81},
        "vec_env_wrapper": "stable_baselines3.common.vec_env.VecFrameStack",
        "monitor_kwargs": "dict(info_keywords=())",
        "train_freq": [2, "step"],
        "replay_buffer_class": "NStepReplayBuffer",
        "replay_buffer_kwargs": "dict()",
    }
    config = tmp_path / "fasttd3.yml"
    config.write_text(yaml.safe_dump({"Pendulum-v1": {**zoo_entry("Pendulum-v1"), **zoo_keys}}))
    hyperparams, _ = load_hyperparams("Pendulum-v1", config)
    assert not {"env_kwargs", "vec_env_wrapper", "monitor_kwargs"} & set(hyperparams)  # the envs' keys
    model = FastTD3(env="Pendulum-v1", **hyperparams)
    assert model.train_freq == (2, TrainFrequencyUnit.STEP) and isinstance(model.replay_buffer, NStepReplayBuffer)

    for extra, match in [
        ({"noise_type": "normal", "noise_std": 0.1}, "noise_type and noise_std .* make an SB3 action_noise"),
        ({"replay_buffer_class": "PrioritizedBuffer"}, r"replay_buffer_class must be one of \['DeviceNStepReplayBuffer'"),
    ]:
        config.write_text(yaml.safe_dump({"Pendulum-v1": {**zoo_entry("Pendulum-v1"), **extra}}))
        with pytest.raises(ValueError, match=match):
            load_hyperparams("Pendulum-v1", config)


def test_entries_write_learning_rate_schedules(tmp_path, monkeypatch):
    """The actor's and the critic's rates as schedule strings, read alike by the Zoo and by load_hyperparams."""
    schedules = {
        "actor_learning_rate": "DelayedLinearSchedule(0.001, 0.0001, 0.2, 0.5)",
        "critic_learning_rate": "lin_0.0005",
    }
    config = tmp_path / "fasttd3.yml"
    config.write_text(yaml.safe_dump({"Pendulum-v1": {**zoo_entry("Pendulum-v1"), **schedules}}))
    hyperparams, _ = load_hyperparams("Pendulum-v1", config)
    assert [hyperparams[key](0.75) for key in schedules] == pytest.approx([0.00085, 0.000375])

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "400", "-f", "logs", "-conf", str(config)]
    zoo_main(["train", *args, "--hyperparams", "learning_starts:200", "learning_rate:'lin_0.002'"])
    model = FastTD3.load(tmp_path / "logs" / "fasttd3" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    # Past half the run the actor's rate is its schedule's end; the critic's has fallen to 0 with progress
    assert model.actor.optimizer.param_groups[0]["lr"] == pytest.approx(0.0001)
    assert model.critic.optimizer.param_groups[0]["lr"] < 0.0005 * 0.1
    assert model.learning_rate(0.5) == pytest.approx(0.001)  # the Zoo's own lin_ still reads learning_rate


def test_zoo_reads_every_replay_buffer_class_name(tmp_path, monkeypatch):
    config = tmp_path / "fasttd3.yml"
    entry = {**zoo_entry("Pendulum-v1"), "replay_buffer_class": "ReplayBuffer", "n_steps": 1}
    config.write_text(yaml.safe_dump({"Pendulum-v1": entry}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "300", "-f", "logs", "-conf", str(config)]
    zoo_main(["train", *args, "--hyperparams", "learning_starts:200"])
    model = FastTD3.load(tmp_path / "logs" / "fasttd3" / "Pendulum-v1_1" / "Pendulum-v1.zip")
    assert model.replay_buffer_class is ReplayBuffer


def test_zoo_frequencies_count_every_rank_and_optimize_is_refused_under_torchrun(monkeypatch):
    from sb3_fasttd3.zoo.registration import _rank_arguments

    for name, value in dict(RANK="0", WORLD_SIZE="4", LOCAL_RANK="0", MASTER_ADDR="localhost", MASTER_PORT="1").items():
        monkeypatch.setenv(name, value)
    arguments = dict(optimize_hyperparameters=False, eval_freq=10_000, save_freq=-1)
    _rank_arguments(arguments)
    assert arguments == dict(optimize_hyperparameters=False, eval_freq=2500, save_freq=-1)
    with pytest.raises(ValueError, match="-optimize under torchrun would run one Optuna study per process"):
        _rank_arguments(dict(optimize_hyperparameters=True, eval_freq=10_000, save_freq=-1))


def test_zoo_normalize_rewards_only(tmp_path, monkeypatch):
    """The Zoo's ``normalize: "{'norm_obs': False, 'norm_reward': True}"``: a VecNormalize of rewards only."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    normalize = "normalize:\"{'norm_obs': False, 'norm_reward': True}\""
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "400", "-f", "logs", "--hyperparams", "learning_starts:200"]
    zoo_main(["train", *args, normalize])
    run = tmp_path / "logs" / "fasttd3" / "Pendulum-v1_1"
    model = FastTD3.load(run / "Pendulum-v1.zip")
    assert model.num_timesteps == 400 and model.policy.obs_normalizer.count.item() > 0  # FastTD3 normalizes obs
    with open(run / "Pendulum-v1" / "vecnormalize.pkl", "rb") as file:
        vec_normalize = pickle.load(file)
    assert not vec_normalize.norm_obs and vec_normalize.norm_reward and vec_normalize.ret_rms.count > 1


def test_zoo_trains_with_her_from_a_yaml_entry(tmp_path, monkeypatch):
    """A TD3 HER entry of the Zoo (the buffer class and its kwargs as strings) trains FastTD3 on a goal env."""
    env_id = "FastTD3BitFlipping-v0"
    if env_id not in gym.registry:
        gym.register(env_id, entry_point=partial(BitFlippingEnv, n_bits=4, continuous=True, max_steps=4))
    entry = {
        "n_timesteps": 300,
        "policy": "MultiInputPolicy",
        "n_envs": 2,
        "learning_starts": 100,
        "batch_size": 32,
        "v_min": -100,
        "v_max": 0,
        "replay_buffer_class": "HerReplayBuffer",
        "replay_buffer_kwargs": "dict(goal_selection_strategy='future', n_sampled_goal=2)",
        "policy_kwargs": "dict(net_arch=[16])",
    }
    config = tmp_path / "her.yml"
    config.write_text(yaml.safe_dump({env_id: entry}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    zoo_main(["train", "--algo", "fasttd3", "--env", env_id, "-f", "logs", "-conf", str(config), "--save-replay-buffer"])
    run = tmp_path / "logs" / "fasttd3" / f"{env_id}_1"
    model = FastTD3.load(run / f"{env_id}.zip", env=make_vec_env(env_id, n_envs=2))
    model.load_replay_buffer(run / "replay_buffer.pkl")
    assert model.num_timesteps == 300 and isinstance(model.replay_buffer, HerReplayBuffer)
    assert model.replay_buffer.n_sampled_goal == 2 and model.replay_buffer.size() == 150
