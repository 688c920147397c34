"""An env that fails mid-step: a clear error, nothing half-stored, a model that saves and trains on after set_env."""

import os

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.fasttd3.rollouts import EnvStepError
from tests.buffer_data import stored_samples
from tests.envs import CountingEnv, CountingTorchVecEnv
from tests.test_fasttd3 import TINY, stored_transitions


class FailingEnv(CountingEnv):
    """CountingEnv that raises (or, with ``hard=True``, kills its process) at its ``fail_at``-th step."""

    def __init__(self, fail_at: int | None = None, hard: bool = False):
        super().__init__(max_steps=6)
        self.fail_at, self.hard = fail_at, hard

    def step(self, action: np.ndarray):
        if self.global_step + 1 == self.fail_at:
            if self.hard:
                os._exit(1)  # a worker that dies without a word
            raise RuntimeError("the simulator diverged")
        return super().step(action)


class FailingTorchVecEnv(CountingTorchVecEnv):
    """CountingTorchVecEnv whose batched step raises at its ``fail_at``-th step."""

    def __init__(self, fail_at: int, **kwargs):
        super().__init__(**kwargs)
        self.fail_at = fail_at

    def _step(self, actions: th.Tensor):
        if self.steps + 1 == self.fail_at:
            raise RuntimeError("the simulator diverged")
        return super()._step(actions)


def failing_env(kind: str):
    """Two envs, the second failing at its 9th step (the model's timestep 18), and the message expected."""
    if kind == "torch":
        return FailingTorchVecEnv(fail_at=9, num_envs=2), r"An environment failed at timestep 18 \(RuntimeError"
    kwargs = [dict(), dict(fail_at=9, hard=kind == "subprocess")]
    makers = [lambda kw=kw: FailingEnv(**kw) for kw in kwargs]
    if kind == "subprocess":
        # SB3's default start method (forkserver on Linux): a dead worker's pipe closes, its parent reads EOF
        return SubprocVecEnv(makers), r"Env 1 failed at timestep 18 \("
    return DummyVecEnv(makers), r"Env 1 failed at timestep 18 \(RuntimeError"


@pytest.mark.parametrize("kind", ["numpy", "subprocess", "torch"])
def test_a_failing_env_leaves_a_valid_model_that_saves_and_trains_on(tmp_path, kind):
    env, message = failing_env(kind)
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 6})
    with pytest.raises(EnvStepError, match=message) as caught:
        model.learn(100)
    assert caught.value.__cause__ is not None
    # The eight good vector steps are stored, nothing of the ninth; the counters agree
    assert model.num_timesteps == 16 and model.replay_buffer.size() == 8
    stored = stored_transitions(model)
    model.save(tmp_path / "model")
    model.save_replay_buffer(tmp_path / "buffer")
    loaded = FastTD3.load(tmp_path / "model")
    loaded.load_replay_buffer(tmp_path / "buffer")
    assert stored_transitions(loaded) == stored
    if kind == "subprocess":  # SB3's close() waits on the dead worker: stop the live one directly
        for process in env.processes:
            process.terminate()

    # A new env: learning goes on from where it stopped
    new_env = CountingTorchVecEnv(num_envs=2) if kind == "torch" else make_vec_env(CountingEnv, n_envs=2, seed=1)
    model.set_env(new_env)
    model.learn(20, reset_num_timesteps=False)
    assert model.num_timesteps == 36 and model.replay_buffer.size() == 18


def test_learning_on_after_a_failed_step_starts_from_reset_envs():
    # Env 0 took its ninth step before env 1 failed at its own: the last observation is behind env 0's state
    env, message = failing_env("numpy")
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, "learning_starts": 1000, "n_steps": 1})
    with pytest.raises(EnvStepError, match=message):
        model.learn(100)
    env.envs[1].fail_at = None
    model.learn(20, reset_num_timesteps=False)  # on the same envs, which fail no more
    # CountingEnv observes [t, episode, x]: with one-step returns, every stored transition steps t by one
    samples = stored_samples(model.replay_buffer)
    assert th.equal(samples.next_observations[:, 0], samples.observations[:, 0] + 1)
