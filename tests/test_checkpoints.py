"""Crash-safe checkpoints: exact resume (also after kill -9), clear errors on damaged files, keep_last."""

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from stable_baselines3.common.callbacks import EveryNTimesteps
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.noise import OrnsteinUhlenbeckActionNoise
from stable_baselines3.common.vec_env import VecCheckNan, VecEnv, VecFrameStack, VecNormalize

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.callbacks import FastTD3CheckpointCallback
from sb3_fasttd3.common.checkpoints import CheckpointError, atomic_write, make_generator
from tests.buffer_data import sample_columns, stored_samples

ROOT = Path(__file__).resolve().parents[1]
RUN = Path(__file__).with_name("checkpoint_run.py")
TINY = dict(
    learning_starts=50,
    batch_size=16,
    buffer_size=1000,
    n_steps=3,
    policy_kwargs=dict(net_arch=dict(pi=[8], qf=[16, 8])),
    device="cpu",
)


def make_model(seed: int = 0) -> FastTD3:
    return FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2, seed=seed), seed=seed, **TINY)


def assert_same_parameters(first: dict[str, th.Tensor], second: dict[str, th.Tensor]) -> None:
    assert first.keys() == second.keys()
    differing = [name for name in first if not th.equal(first[name], second[name])]
    assert not differing, f"parameters differ: {differing}"


def python(*args: str) -> list[str]:
    return [sys.executable, *args]


def subprocess_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    model = make_model()
    model.learn(150)
    return Path(model.save_checkpoint(tmp_path_factory.mktemp("checkpoint") / "model.zip"))


@pytest.mark.parametrize("action_noise", [None, "correlated", "ornstein_uhlenbeck"])
def test_save_then_load_checkpoint_continues_exactly(tmp_path, action_noise):
    # Mixed noise scales and state (or SB3 action noise with its own), RNGs, buffer windows and the envs carry over
    noise = OrnsteinUhlenbeckActionNoise(np.zeros(1), 0.3 * np.ones(1)) if action_noise == "ornstein_uhlenbeck" else None
    correlation = 20.0 if action_noise == "correlated" else None
    env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
    model = FastTD3("MlpPolicy", env, seed=0, action_noise=noise, noise_correlation=correlation, **TINY)
    model.learn(150)
    path = model.save_checkpoint(tmp_path / "at_150.zip")
    model.learn(100, reset_num_timesteps=False)

    resumed = FastTD3.load_checkpoint(path, env=make_vec_env("Pendulum-v1", n_envs=2, seed=123), device="cpu")
    assert resumed.num_timesteps == 150
    resumed.learn(100, reset_num_timesteps=False)
    assert (resumed.num_timesteps, resumed._n_updates) == (model.num_timesteps, model._n_updates)
    assert_same_parameters(model.policy.state_dict(), resumed.policy.state_dict())
    if noise is not None:
        assert np.array_equal(model.action_noise._noises[1].noise_prev, resumed.action_noise._noises[1].noise_prev)
    else:
        assert th.equal(model.exploration_noise.sigmas, resumed.exploration_noise.sigmas)
        assert (model.exploration_noise.unit is None) == (correlation is None)
        if correlation is not None:
            assert th.equal(model.exploration_noise.unit, resumed.exploration_noise.unit)


def frame_stack(seed: int = 0) -> VecEnv:
    return VecFrameStack(make_vec_env("Pendulum-v1", n_envs=2, seed=seed), n_stack=2)


def normalized(seed: int = 0) -> VecEnv:
    return VecNormalize(make_vec_env("Pendulum-v1", n_envs=2, seed=seed))


@pytest.mark.parametrize("make_env", [frame_stack, normalized])
@pytest.mark.parametrize("at", [0, 150])
def test_vec_env_wrappers_and_queued_seeds_resume_exactly(tmp_path, make_env, at):
    # The wrappers' state (stacked frames, normalization statistics) and, before the first learn(), the seeds
    # queued for the first reset come back with the envs
    model = FastTD3("MlpPolicy", make_env(), seed=0, **TINY)
    model.learn(at) if at else None
    path = model.save_checkpoint(tmp_path / "checkpoint.zip")
    model.learn(100, reset_num_timesteps=not at)
    resumed = FastTD3.load_checkpoint(path, env=make_env(seed=123), device="cpu")
    resumed.learn(100, reset_num_timesteps=not at)
    assert (resumed.num_timesteps, resumed._n_updates) == (model.num_timesteps, model._n_updates)
    assert_same_parameters(model.policy.state_dict(), resumed.policy.state_dict())


def test_envs_saved_in_wrappers_need_an_env_to_load_into(tmp_path):
    model = FastTD3("MlpPolicy", normalized(), seed=0, **TINY)
    path = model.learn(40).save_checkpoint(tmp_path / "checkpoint.zip")
    with pytest.raises(ValueError, match=r"The checkpoint's envs were wrapped in \['stable_baselines3.*VecNormalize'\]"):
        FastTD3.load_checkpoint(path, device="cpu")  # env=None would drop the normalization silently


def test_a_buffer_size_given_at_load_is_the_buffers_capacity(checkpoint):
    resumed = FastTD3.load_checkpoint(checkpoint, device="cpu", buffer_size=2000)
    stored = resumed.replay_buffer.size()
    resumed.learn(1000, reset_num_timesteps=False)  # past the checkpoint's 1000 transitions
    assert resumed.replay_buffer.buffer_size * resumed.n_envs == 2000 and resumed.replay_buffer.size() == stored + 500


def test_envs_that_pickle_without_their_state_are_reset(tmp_path):
    # gymnasium's MuJoCo envs pickle their constructor arguments only (EzPickle): unpickled, they start anew
    def make_env(seed: int) -> VecEnv:
        return make_vec_env("InvertedPendulum-v5", n_envs=2, seed=seed)

    model = FastTD3("MlpPolicy", make_env(0), seed=0, **TINY)
    model.learn(60)
    with pytest.warns(UserWarning, match="pickle only their constructor arguments"):
        path = model.save_checkpoint(tmp_path / "mujoco.zip")
    saved = [generator.bit_generator.state for generator in model.env.get_attr("np_random")]
    resumed = FastTD3.load_checkpoint(path, env=make_env(7), device="cpu")
    assert [generator.bit_generator.state for generator in resumed.env.get_attr("np_random")] == saved
    assert resumed._last_obs is None  # learn() resets the envs


def test_envs_under_other_wrappers_are_reset_from_their_own_seeds(tmp_path):
    model = FastTD3("MlpPolicy", frame_stack(), **TINY)  # no seed: loading it seeds nothing
    model.learn(100)
    path = model.save_checkpoint(tmp_path / "checkpoint.zip")
    with pytest.warns(UserWarning, match="envs are not restored but reset"):
        resumed = FastTD3.load_checkpoint(path, env=VecCheckNan(frame_stack(seed=5)), device="cpu")
    assert resumed._last_obs is None
    resumed.learn(2, reset_num_timesteps=False)
    buffer = resumed.replay_buffer
    first = buffer.observations[:, (buffer.pos - 1) % buffer.ring_rows]
    assert np.array_equal(first.numpy(), frame_stack(seed=5).reset())


def test_resume_after_kill_9_is_bit_exact(tmp_path):
    total = 1000
    reference = subprocess.run(
        python(str(RUN), "train", str(tmp_path / "reference"), str(tmp_path / "reference.pt"), str(total)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert reference.returncode == 0, reference.stderr[-3000:]

    killed_dir = tmp_path / "killed"
    run = subprocess.Popen(
        python(str(RUN), "train", str(killed_dir), str(tmp_path / "never.pt"), str(total), "--slow"),
        env=subprocess_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 120
        while not list(killed_dir.glob("run_*_steps.zip")):
            assert run.poll() is None, f"the run ended before its first checkpoint: {run.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no checkpoint within 120 s"
            time.sleep(0.01)
        delay = random.uniform(0.0, 1.0)
        time.sleep(delay)
        assert run.poll() is None, f"the run finished within {delay:.2f} s of its first checkpoint: kill it sooner"
        os.kill(run.pid, signal.SIGKILL)
        assert run.wait(timeout=30) == -signal.SIGKILL
    finally:
        if run.poll() is None:
            run.kill()
        run.stderr.close()
    assert not (tmp_path / "never.pt").exists()

    resumed = subprocess.run(
        python(str(RUN), "resume", str(killed_dir), str(tmp_path / "resumed.pt"), str(total)),
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    start = int(resumed.stdout.split(" at ")[-1])
    assert 0 < start < total, f"killed after {delay:.2f} s: {resumed.stdout}"
    expected = th.load(tmp_path / "reference.pt", weights_only=True)
    actual = th.load(tmp_path / "resumed.pt", weights_only=True)
    assert (actual["num_timesteps"], actual["n_updates"]) == (expected["num_timesteps"], expected["n_updates"])
    assert_same_parameters(expected["params"], actual["params"])


def test_a_checkpoint_resumes_with_another_number_of_envs(checkpoint):
    saved = FastTD3.load_checkpoint(checkpoint, device="cpu").replay_buffer
    saved.close_windows()  # as the re-laid buffer's: the envs are reset
    resumed = FastTD3.load_checkpoint(checkpoint, env=make_vec_env("Pendulum-v1", n_envs=4, seed=1), device="cpu")
    assert resumed.replay_buffer.n_envs == 4 and resumed._last_obs is None
    rows = sorted(sample_columns(stored_samples(resumed.replay_buffer)).tolist())
    assert len(rows) == 150 and rows == sorted(sample_columns(stored_samples(saved)).tolist())
    resumed.learn(40, reset_num_timesteps=False)
    assert resumed.num_timesteps == 190


@pytest.mark.parametrize("changed", [dict(gamma=0.9), dict(n_steps=1)])
def test_a_checkpoint_refuses_to_load_with_other_returns(checkpoint, changed):
    name, value = next(iter(changed.items()))
    with pytest.raises(ValueError, match=rf"checkpoint .*{checkpoint.name} holds .* model has .*{name}={value}"):
        FastTD3.load_checkpoint(checkpoint, device="cpu", **changed)


@pytest.mark.parametrize("keep", [0, 1, 10, 0.5, -22, -1])
def test_truncated_checkpoint_raises_a_clear_error(checkpoint, tmp_path, keep):
    data = checkpoint.read_bytes()
    length = int(len(data) * keep) if isinstance(keep, float) else keep % len(data)
    damaged = tmp_path / "truncated.zip"
    damaged.write_bytes(data[:length])
    with pytest.raises(CheckpointError, match=re.escape(str(damaged))):
        FastTD3.load_checkpoint(damaged)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75, 0.999])
def test_flipped_bytes_raise_a_clear_error(checkpoint, tmp_path, where):
    data = bytearray(checkpoint.read_bytes())
    for offset in range(int(len(data) * where), int(len(data) * where) + 4):
        data[offset] ^= 0xFF
    damaged = tmp_path / "flipped.zip"
    damaged.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=re.escape(str(damaged))):
        FastTD3.load_checkpoint(damaged)


def test_missing_or_foreign_file_raises_a_clear_error(checkpoint, tmp_path):
    absent, plain = tmp_path / "absent.zip", tmp_path / "plain_model.zip"
    with pytest.raises(CheckpointError, match=re.escape(str(absent))):
        FastTD3.load_checkpoint(absent)
    make_model().save(plain)  # a model zip, not a checkpoint
    with pytest.raises(CheckpointError, match=re.escape(str(plain))):
        FastTD3.load_checkpoint(plain)


def test_failed_write_leaves_the_previous_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda file: file.write(b"previous"))

    def fail_midway(file):
        file.write(b"half of the new")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail_midway)
    assert path.read_bytes() == b"previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.bin"]


def test_kill_during_save_leaves_the_previous_checkpoint_loadable(checkpoint, tmp_path):
    path = tmp_path / "run_100_steps.zip"
    path.write_bytes(checkpoint.read_bytes())
    # A process killed while writing the next checkpoint over the same name
    writer = (
        "import sys, time\n"
        "from sb3_fasttd3.common.checkpoints import atomic_write\n"
        "def write(file):\n"
        "    file.write(b'PK' + bytes(100000)); file.flush(); print('writing', flush=True); time.sleep(60)\n"
        "atomic_write(sys.argv[1], write)\n"
    )
    run = subprocess.Popen(python("-c", writer, str(path)), env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert run.stdout.readline().strip() == "writing"
        os.kill(run.pid, signal.SIGKILL)
        run.wait(timeout=30)
    finally:
        if run.poll() is None:
            run.kill()
        run.stdout.close()
    leftovers = list(tmp_path.glob(".run_100_steps.zip.*.tmp"))
    assert len(leftovers) == 1 and leftovers[0].stat().st_size > 0
    assert path.read_bytes() == checkpoint.read_bytes()
    assert FastTD3.load_checkpoint(path).num_timesteps == 150

    # The callback clears the leftovers of killed saves when training starts again
    model = make_model()
    model.learn(20, callback=FastTD3CheckpointCallback(1000, str(tmp_path), name_prefix="run"))
    assert not list(tmp_path.glob(".*.tmp"))


def test_keep_last_keeps_exactly_the_newest(tmp_path):
    model = make_model()
    callback = FastTD3CheckpointCallback(save_freq=10, save_path=str(tmp_path), name_prefix="ckpt", keep_last=3)
    model.learn(200, callback=callback)
    names = sorted(path.name for path in tmp_path.iterdir())
    assert names == ["ckpt_160_steps.zip", "ckpt_180_steps.zip", "ckpt_200_steps.zip"]
    assert [path.name for path in callback.checkpoints()] == names
    assert FastTD3.load_checkpoint(tmp_path / "ckpt_200_steps.zip").num_timesteps == 200


@pytest.mark.parametrize("keep_last", [1, 2])
def test_keep_last_keeps_a_new_runs_checkpoints_over_an_earlier_runs(tmp_path, keep_last):
    # An earlier run left checkpoints at higher steps in the same folder; a new run from step 0 writes its own
    def callback():
        return FastTD3CheckpointCallback(save_freq=10, save_path=str(tmp_path), name_prefix="ckpt", keep_last=keep_last)

    make_model().learn(100, callback=callback())
    time.sleep(0.01)  # distinct modification times on file systems that keep coarse ones
    make_model(seed=1).learn(40, callback=callback())
    expected = ["ckpt_20_steps.zip", "ckpt_40_steps.zip"][-keep_last:]
    assert [path.name for path in callback().checkpoints()] == expected
    assert FastTD3.load_checkpoint(tmp_path / expected[-1]).seed == 1


def test_checkpoints_triggered_by_an_event_callback_are_written(tmp_path):
    # SB3's EveryNTimesteps passes on on_step only: the checkpoint cannot wait for the next rollout's start
    callback = FastTD3CheckpointCallback(save_freq=1, save_path=str(tmp_path), name_prefix="ckpt", keep_last=np.int64(2))
    make_model().learn(60, callback=EveryNTimesteps(n_steps=20, callback=callback))
    assert [path.name for path in callback.checkpoints()] == ["ckpt_40_steps.zip", "ckpt_60_steps.zip"]
    assert FastTD3.load_checkpoint(tmp_path / "ckpt_60_steps.zip").num_timesteps == 60


def test_no_checkpoints_before_the_folder_exists(tmp_path):
    assert FastTD3CheckpointCallback(10, str(tmp_path / "not_yet")).checkpoints() == []


@pytest.mark.parametrize("keep_last", [0, -1, 1.5])
def test_keep_last_rejects_non_positive(tmp_path, keep_last):
    with pytest.raises(ValueError, match="keep_last"):
        FastTD3CheckpointCallback(10, str(tmp_path), keep_last=keep_last)


class Unpicklable(gym.Wrapper):
    """An env holding something pickle refuses, as a renderer or a simulator handle would."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self.lock = threading.Lock()


def test_envs_that_do_not_pickle_keep_their_rngs_and_are_reset(tmp_path):
    def make_env(seed: int) -> VecEnv:
        return make_vec_env("Pendulum-v1", n_envs=2, seed=seed, wrapper_class=Unpicklable)

    model = FastTD3("MlpPolicy", make_env(0), seed=0, **TINY)
    model.learn(100)
    with pytest.warns(UserWarning, match="cannot be pickled"):
        path = model.save_checkpoint(tmp_path / "rng_only.zip")
    saved = [generator.bit_generator.state for generator in model.env.get_attr("np_random")]

    other = make_env(7)  # other RNG states, overwritten by the checkpoint's
    assert [generator.bit_generator.state for generator in other.get_attr("np_random")] != saved
    resumed = FastTD3.load_checkpoint(path, env=other, device="cpu")
    assert [generator.bit_generator.state for generator in resumed.env.get_attr("np_random")] == saved
    assert resumed._last_obs is None  # the envs' simulator state is lost: learn() resets them

    # The envs reset from the checkpoint's RNGs, not from a seed queued by the new env or the model
    expected = []
    for state in saved:
        env = gym.make("Pendulum-v1")
        env.unwrapped.np_random = make_generator(state)
        expected.append(env.reset()[0])
    assert np.array_equal(resumed.env.reset(), np.stack(expected))
    resumed._last_obs = None
    resumed.learn(40, reset_num_timesteps=False)
    assert resumed.num_timesteps == 140
