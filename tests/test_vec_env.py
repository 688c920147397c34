"""The torch VecEnv contract, FastTD3's on-device rollout loop and the NumPy adapter."""

import gc
import sys
from collections import Counter

import numpy as np
import pytest
import torch as th
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3 import SAC
from stable_baselines3.common.callbacks import EvalCallback
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.fasttd3.rollouts import DEVICE_SYNC_STEPS
from sb3_fasttd3.vec_env import EpisodeTracker, NumpyVecEnv
from sb3_fasttd3.vec_env.base import TorchStep
from tests.buffer_data import sample_columns, stored_samples
from tests.envs import CountingTorchVecEnv

TINY = dict(policy_kwargs=dict(net_arch=[16]), batch_size=16, learning_starts=20, num_atoms=11, v_min=-50.0, v_max=10.0)


def tiny_model(env, **kwargs) -> FastTD3:
    policy = "MultiInputPolicy" if env.dict_obs else "MlpPolicy"
    return FastTD3(policy, env, seed=0, **{**TINY, **kwargs})


STEP = st.lists(st.tuples(st.floats(-10, 10), st.booleans()), min_size=3, max_size=3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(STEP, st.sampled_from(["drain", "reset"])), max_size=60), st.sampled_from([1, 4, 64]))
def test_episode_tracker_matches_python(events, block):
    """
    Returns and lengths of finished episodes, in order, the latest ``capacity`` kept between drains, whatever
    the block size and wherever the drains and env resets fall.
    """
    capacity = 5
    tracker = EpisodeTracker(3, "cpu", capacity=capacity, block=block)
    returns, lengths, finished = [0.0] * 3, [0] * 3, []

    def check_drain() -> None:
        episodes, count = tracker.drain()
        assert count == len(finished)
        expected = finished[-capacity:]
        assert [episode["l"] for episode in episodes] == [length for _, length in expected]
        assert [episode["r"] for episode in episodes] == pytest.approx([ret for ret, _ in expected])
        finished.clear()

    for event in [*events, "drain"]:
        if event == "drain":
            check_drain()
        elif event == "reset":  # running episodes are forgotten, finished ones kept
            tracker.reset()
            returns, lengths = [0.0] * 3, [0] * 3
        else:
            tracker.update(th.tensor([reward for reward, _ in event]), th.tensor([done for _, done in event]))
            for i, (reward, done) in enumerate(event):
                returns[i] += float(np.float32(reward))  # the tracker is given float32 rewards
                lengths[i] += 1
                if done:
                    finished.append((returns[i], lengths[i]))
                    returns[i], lengths[i] = 0.0, 0
    assert tracker.drain() == ([], 0)


@pytest.mark.parametrize("dict_obs", [False, True])
def test_device_loop_stores_true_final_observations(dict_obs):
    env = CountingTorchVecEnv(num_envs=3, max_steps=8, dict_obs=dict_obs, bound=2.5)
    model = tiny_model(env, n_steps=1)
    model.learn(150)
    buffer = model.replay_buffer
    rows = buffer.size()
    next_obs = buffer.next_observations["state"] if dict_obs else buffer.next_observations
    obs = buffer.observations["state"] if dict_obs else buffer.observations
    truncated, done = buffer.timeouts[:, :rows], buffer.dones[:, :rows]
    assert truncated.any() and (done & ~truncated).any(), "both kinds of episode ends must occur"
    # A truncated transition's next observation is the final one (t = max_steps), never the reset one (t = 0)
    assert (next_obs[:, :rows, 0][truncated] == 8).all()
    # Not done: the next observation is the next step's observation
    same_episode = ~done[:, : rows - 1]
    assert th.equal(next_obs[:, : rows - 1][same_episode], obs[:, 1:rows][same_episode])
    # Terminated: x left [-5, 5]
    assert (next_obs[:, :rows, 2][done & ~truncated].abs() > 2.5).all()


def test_truncation_bootstraps_termination_does_not():
    env = CountingTorchVecEnv(num_envs=2, max_steps=8, bound=2.5)
    model = tiny_model(env, n_steps=1)
    model.learn(200)
    samples = model.replay_buffer.sample(2000)
    final_t = samples.next_observations[:, 0]
    truncations = (final_t == 8) & (samples.next_observations[:, 2].abs() <= 2.5)
    terminations = samples.next_observations[:, 2].abs() > 2.5
    assert truncations.any() and terminations.any()
    assert (samples.dones[truncations] == 0).all()
    assert (samples.dones[terminations] == 1).all()


def test_no_host_transfer_in_the_loop(monkeypatch):
    """
    Collecting and training on a TorchVecEnv never turns a tensor into NumPy or a Python value, but for the
    finite check: one scalar ``item()`` per vector step.
    """
    env = CountingTorchVecEnv(num_envs=4)
    model = tiny_model(env)
    model.learn(40)  # past learning_starts: the actor acts
    forbidden = ["numpy", "item", "tolist", "cpu", "__bool__", "__int__", "__float__", "__index__", "__array__"]
    calls = Counter()
    for name in forbidden:
        original = getattr(th.Tensor, name)

        def spy(self, *args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(th.Tensor, name, spy)
    steps = DEVICE_SYNC_STEPS - 15  # no sync point in between
    for _ in range(steps):
        model.collect_rollouts(model.env, model._init_callback(None), model.train_freq, model.replay_buffer, None, 20, None)
        model.train(gradient_steps=2, batch_size=16)
    monkeypatch.undo()
    assert calls == {"item": steps}, f"host transfers in the loop: {dict(calls)}"


def python_calls_per_step(num_envs: int) -> int:
    """Python function calls made by 10 vector steps of collection and training."""
    env = CountingTorchVecEnv(num_envs=num_envs)
    model = tiny_model(env)
    model.learn(40 * num_envs)
    callback = model._init_callback(None)

    calls = 0

    def count(frame, event, arg):
        nonlocal calls
        calls += event == "call"

    # A garbage collection inside the window runs finalizers (a few calls) at unpredictable times
    gc.collect()
    gc.disable()
    sys.setprofile(count)
    try:
        for _ in range(10):
            model.collect_rollouts(model.env, callback, model.train_freq, model.replay_buffer, None, 20, None)
            model.train(gradient_steps=1, batch_size=16)
    finally:
        sys.setprofile(None)
        gc.enable()
    return calls


def test_no_per_env_python_loop():
    """The Python work per vector step does not grow with the number of envs."""
    few, many = python_calls_per_step(2), python_calls_per_step(64)
    # A loop over envs would add at least one call per env and vector step: 62 * 10 here
    assert abs(many - few) < 62, (few, many)


def test_episode_statistics_reach_the_logger():
    env = CountingTorchVecEnv(num_envs=4, max_steps=5)
    model = tiny_model(env)
    model.learn(4 * DEVICE_SYNC_STEPS + 4)
    assert model._episode_num == 4 * DEVICE_SYNC_STEPS // 5
    assert len(model.ep_info_buffer) == 80
    assert all(info["l"] <= 5 for info in model.ep_info_buffer)


def test_non_finite_values_are_refused_before_storing():
    model = tiny_model(CountingTorchVecEnv(num_envs=2, nan_at=7))
    with pytest.raises(ValueError, match=r"Env 0 returned a non-finite \(NaN or inf\) observation at timestep 14"):
        model.learn(100)
    assert model.replay_buffer.size() == 6
    assert th.isfinite(model.replay_buffer.next_observations[:, :6]).all()


def test_episode_train_freq_is_refused():
    model = tiny_model(CountingTorchVecEnv(num_envs=2), train_freq=(1, "episode"))
    with pytest.raises(ValueError, match="train_freq"):
        model.learn(10)


def test_numpy_adapter_runs_sb3_sac_with_sb3_infos():
    env = NumpyVecEnv(CountingTorchVecEnv(num_envs=2, max_steps=5))
    obs = env.reset()
    assert isinstance(obs, np.ndarray) and obs.shape == (2, 3)
    infos = []
    for _ in range(5):
        obs, rewards, dones, infos = env.step(np.zeros((2, 1), dtype=np.float32))
    assert dones.all() and rewards.dtype == np.float32
    assert [info["terminal_observation"][0] for info in infos] == [5, 5]
    assert obs[:, 0].tolist() == [0, 0]
    assert all(info["TimeLimit.truncated"] and info["episode"]["l"] == 5 for info in infos)

    model = SAC("MlpPolicy", env, learning_starts=20, batch_size=16, policy_kwargs=dict(net_arch=[16]), seed=0)
    model.learn(100)
    assert len(model.ep_info_buffer) > 0


def test_evaluation_of_a_model_trained_on_device(tmp_path):
    env = CountingTorchVecEnv(num_envs=4, max_steps=5)
    eval_env = NumpyVecEnv(CountingTorchVecEnv(num_envs=1, max_steps=5))
    model = tiny_model(env)
    callback = EvalCallback(
        eval_env, eval_freq=10, n_eval_episodes=2, best_model_save_path=str(tmp_path), log_path=str(tmp_path), verbose=0
    )
    model.learn(80, callback=callback)
    assert len(callback.evaluations_results) == 2 and (tmp_path / "best_model.zip").exists()
    assert all(length == [5, 5] for length in callback.evaluations_length)

    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    mean_reward, _ = evaluate_policy(loaded, eval_env, n_eval_episodes=2, warn=False)
    assert np.isfinite(mean_reward)
    obs = eval_env.reset()
    assert np.array_equal(model.predict(obs, deterministic=True)[0], loaded.predict(obs, deterministic=True)[0])


class BothFlagsTorchVecEnv(CountingTorchVecEnv):
    """A backend that reports ``truncated`` with ``terminated`` when an episode terminates at its time limit."""

    def _step(self, actions: th.Tensor) -> TorchStep:
        step = super()._step(actions)
        return step._replace(truncated=step.truncated | step.terminated)


def test_termination_wins_over_truncation_for_every_backend():
    env = BothFlagsTorchVecEnv(num_envs=2, bound=0.5)
    env.reset()
    for _ in range(20):
        infos = env.step(th.ones(2, 1))[3]
        assert not (infos["terminated"] & infos["truncated"]).any()
    model = FastTD3("MlpPolicy", BothFlagsTorchVecEnv(num_envs=2, bound=0.5), learning_starts=1000, seed=0)
    model.learn(40)
    # Terminations are the steps that left [-0.5, 0.5] (reward below -0.5): stored as done, never as timeouts
    buffer, stored = model.replay_buffer, slice(0, 20)
    ends = buffer.rewards[:, stored] < -0.5
    assert ends.any() and buffer.dones[:, stored][ends].all() and not buffer.timeouts[:, stored][ends].any()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(n_steps=3, dict_obs=True),
        dict(optimize_memory_usage=True, policy_delay=3, use_target_actor=True, actor_average_tau=0.01, max_grad_norm=1.0),
        dict(noise_correlation=5.0, stratified_noise=True, warmup_actions="actor", gradient_steps=3),
    ],
)
def test_the_device_loop_stores_and_learns_what_the_numpy_loop_does(kwargs):
    kwargs = dict(kwargs)
    dict_obs = kwargs.pop("dict_obs", False)
    models = []
    for wrap in (lambda env: env, NumpyVecEnv):
        env = wrap(CountingTorchVecEnv(num_envs=3, max_steps=7, dict_obs=dict_obs, bound=2.5))
        policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
        models.append(FastTD3(policy, env, seed=0, **{**TINY, **kwargs}).learn(120))
    device, host = models
    assert device.replay_buffer.dones.sum() > 5  # episodes ended, by termination and by truncation
    assert th.equal(sample_columns(stored_samples(device.replay_buffer)), sample_columns(stored_samples(host.replay_buffer)))
    for name, value in device.policy.state_dict().items():
        assert th.equal(value, host.policy.state_dict()[name]), name
