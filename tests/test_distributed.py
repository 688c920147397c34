"""Data-parallel FastTD3 on two CPU processes (torchrun, gloo): the ranks stay in step, and a failing rank ends the job."""

import atexit
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch as th
import torch.distributed as dist
from stable_baselines3.common import callbacks as sb3_callbacks
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecNormalize

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.callbacks import FastTD3CheckpointCallback
from sb3_fasttd3.common.distributed import DataParallel, _GroupTeardown
from tests.distributed_run import KWARGS, N_ENVS

RUN = Path(__file__).with_name("distributed_run.py")
ROOT = RUN.parent.parent


def torchrun(*arguments: str, timeout: float, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *arguments]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=cwd)


def whole_batch_update(out: Path) -> dict:
    """The one-process update on the whole batch that the ranks split in halves; saves the batch for them."""
    model = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), target_policy_noise=0.0, **KWARGS)
    model.learn(KWARGS["learning_starts"])  # a filled buffer to draw a realistic batch from
    batch = model.replay_buffer.sample(64)
    th.save(batch, out / "batch.pt")
    fresh = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), target_policy_noise=0.0, **KWARGS)
    fresh._update(batch, update_actor=True)
    return fresh.policy.state_dict()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, dict, list[dict]]:
    out = tmp_path_factory.mktemp("distributed")
    th.set_num_threads(1)
    whole = whole_batch_update(out)
    single = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), **KWARGS)
    single.learn(60)
    single.save(out / "single.zip")
    result = torchrun(str(RUN), "train", str(out), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return out, whole, [th.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def test_ranks_hold_identical_parameters_after_every_update(two_ranks):
    _, _, ranks = two_ranks
    for rank in ranks:
        assert rank["update_checks"] > 20
        assert rank["max_rank_difference"] == 0.0
        assert rank["resumed_checks"] > 0 and rank["resumed_difference"] == 0.0
        # BatchNorm's running statistics too (the parameters and buffers of the whole policy are compared)
        assert rank["batch_norm_checks"] > 20 and rank["batch_norm_difference"] == 0.0


def test_the_ranks_envs_are_seeded_as_one_vec_env_of_all_of_them(two_ranks):
    _, _, ranks = two_ranks
    first = np.concatenate([rank["observations"][:N_ENVS] for rank in ranks])
    np.testing.assert_array_equal(first, make_vec_env("Pendulum-v1", n_envs=2 * N_ENVS, seed=KWARGS["seed"]).reset())


def test_timesteps_count_every_rank_and_a_stop_on_rank_0_stops_both(two_ranks):
    _, _, ranks = two_ranks
    per_step = 2 * N_ENVS
    for rank in ranks:
        assert rank["first_timesteps"] == 1000
        # StopAt(7) returns False at its 7th call, on rank 0 only: both ranks stop after that vector step
        assert rank["stopped_timesteps"] == 1000 + 7 * per_step
        assert rank["stored"] == rank["stopped_timesteps"] // 2  # each rank stores its own half
        assert rank["resumed_timesteps"] == 60 + 80


def test_normalizer_merges_every_rank_exactly(two_ranks):
    _, _, ranks = two_ranks
    everything = np.concatenate([rank["observations"] for rank in ranks])
    for rank in ranks:
        count, mean, var = rank["normalizer"]
        assert count == len(everything)
        np.testing.assert_allclose(mean.numpy(), everything.mean(axis=0), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(var.numpy(), everything.var(axis=0), rtol=1e-4)
    assert all(th.equal(a, b) for a, b in zip(ranks[0]["normalizer"][1:], ranks[1]["normalizer"][1:], strict=True))


def test_two_half_batches_update_as_one_whole_batch(two_ranks):
    _, whole, ranks = two_ranks
    for key, value in whole.items():
        for rank in ranks:
            th.testing.assert_close(rank["halves"][key], value, rtol=1e-5, atol=1e-6, msg=key)


def test_only_rank_0_logs_and_saves_a_plain_model(two_ranks):
    out, _, ranks = two_ranks
    assert [rank["output_formats"] for rank in ranks] == [1, 0]
    assert (out / "log0" / "progress.csv").stat().st_size > 0
    assert (out / "log1" / "progress.csv").stat().st_size == 0  # rank 1's own logger was replaced
    # The model saved under torchrun loads, predicts and trains in one process
    model = FastTD3.load(out / "model.zip", env=make_vec_env("Pendulum-v1", n_envs=N_ENVS), device="cpu")
    assert model._data_parallel is None and model.num_timesteps == ranks[0]["stopped_timesteps"]
    action, _ = model.predict(np.zeros((N_ENVS, 3), dtype=np.float32), deterministic=True)
    assert action.shape == (N_ENVS, 1)
    model.learn(60)


@pytest.mark.slow
def test_compiled_bf16_ranks_stay_identical(tmp_path):
    result = torchrun(str(RUN), "compiled", str(tmp_path), timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    for rank in range(2):
        checks = th.load(tmp_path / f"compiled{rank}.pt")
        assert checks["update_checks"] > 50 and checks["max_rank_difference"] == 0.0


def test_a_failing_rank_ends_the_job_with_its_error(tmp_path):
    start = time.monotonic()
    result = torchrun(str(RUN), "crash", str(tmp_path), timeout=240)
    assert result.returncode != 0
    assert time.monotonic() - start < 120  # torchrun stops the waiting rank, instead of its collective timing out
    output = result.stdout + result.stderr
    assert "EnvStepError" in output and "the simulator diverged" in output


def test_ranks_that_disagree_fail_alike_naming_what_differs(tmp_path):
    result = torchrun(str(RUN), "disagree", str(tmp_path), timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]  # every rank raised the same error: no hang, no abort
    for rank in range(2):
        settings, history = (tmp_path / f"disagree{rank}.txt").read_text().splitlines()
        gradient_steps = KWARGS["gradient_steps"] + rank
        assert settings.startswith(f"The ranks disagree on batch_size, gradient_steps (this rank, {rank}: ")
        assert f"batch_size={16 * (1 + rank)}, gradient_steps={gradient_steps})" in settings
        assert history.startswith("The ranks disagree on _n_updates, num_timesteps, the optimizers' states ")


def test_zoo_trains_under_torchrun_with_rank_0_outputs(tmp_path):
    zoo = ["-m", "rl_zoo3.train", "--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "800", "-f", "logs"]
    frequencies = ["--eval-freq", "400", "--eval-episodes", "1", "--save-freq", "400"]
    result = torchrun(*zoo, *frequencies, "--hyperparams", "learning_starts:200", "n_envs:2", timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "logs" / "fasttd3").iterdir())
    assert [run.name for run in runs] == ["Pendulum-v1_1"]  # one run folder: rank 1 writes elsewhere
    model = FastTD3.load(runs[0] / "Pendulum-v1.zip")
    assert model.num_timesteps == 800  # over both ranks
    # The frequencies count both ranks' transitions, as -n does
    assert np.load(runs[0] / "evaluations.npz")["timesteps"].tolist() == [400, 800]
    assert sorted(path.name for path in runs[0].glob("rl_model_*_steps.zip")) == [
        "rl_model_400_steps.zip",
        "rl_model_800_steps.zip",
    ]
    n_envs = model.n_envs
    assert sorted(path.name for path in runs[0].glob("*.monitor.csv")) == [f"{i}.monitor.csv" for i in range(n_envs)]


def test_distributed_argument_is_checked():
    env = make_vec_env("Pendulum-v1", n_envs=1)
    for value in ("yes", 1, 0, 1.0, np.True_, np.False_):  # 1 == True and np.False_ == False, yet they are no bools
        with pytest.raises(ValueError, match=r"distributed must be one of \['auto', True, False\], got"):
            FastTD3("MlpPolicy", env, distributed=value)
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="distributed=True needs several processes: launch the script with torchrun"):
        FastTD3("MlpPolicy", env, distributed=True)
    assert FastTD3("MlpPolicy", env)._data_parallel is None  # "auto" in a single process
    assert DataParallel.resolve(False, th.device("cpu")) is None


def test_merge_moments_equal_numpy_on_the_union(monkeypatch):
    """The merge itself, with a stand-in all-gather of three 'ranks' of different sizes."""
    rng = np.random.default_rng(0)
    parts = [rng.normal(loc, 1.0 + loc, size=(n, 4)).astype(np.float32) for loc, n in ((0.0, 5), (3.0, 17), (-1.0, 2))]
    moments = [
        th.cat(
            [
                th.tensor([len(p)], dtype=th.float64),
                th.tensor(p.mean(0), dtype=th.float64),
                th.tensor(p.var(0), dtype=th.float64),
            ]
        )
        for p in parts
    ]

    def all_gather(outputs, _):
        for output, moment in zip(outputs, moments, strict=True):
            output.copy_(moment)

    monkeypatch.setattr(dist, "all_gather", all_gather)
    data_parallel = DataParallel.__new__(DataParallel)
    data_parallel.world_size = 3
    count, mean, var = data_parallel.merge_moments(th.tensor(5.0), th.zeros(4), th.zeros(4))
    union = np.concatenate(parts)
    assert float(count) == len(union)
    np.testing.assert_allclose(mean.numpy(), union.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(var.numpy(), union.var(0), rtol=1e-5)


class StandInRanks:
    """A DataParallel stand-in for the checks made before any collective: a world of ranks that disagree on n_envs."""

    rank, world_size = 1, 2

    def all_equal(self, value: int) -> bool:
        return False


def test_checkpoints_are_refused_before_anything_runs(tmp_path, monkeypatch):
    model = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1), **KWARGS)
    path = model.learn(4).save_checkpoint(tmp_path / "checkpoint.zip")
    model._data_parallel = StandInRanks()
    callback = FastTD3CheckpointCallback(save_freq=10**6, save_path=str(tmp_path))
    with pytest.raises(NotImplementedError, match="FastTD3CheckpointCallback does not support data-parallel"):
        callback.init_callback(model)  # at the start of learn(), not when the first save is due
    monkeypatch.setattr(DataParallel, "resolve", classmethod(lambda cls, distributed, device: StandInRanks()))
    with pytest.raises(NotImplementedError, match="load_checkpoint does not support data-parallel training yet"):
        FastTD3.load_checkpoint(path, device="cpu")


def test_learn_refuses_what_would_desynchronize_the_ranks(tmp_path):
    model = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=1), train_freq=(1, "episode"))
    with pytest.raises(ValueError, match=r"train_freq=\(1, <TrainFrequencyUnit.EPISODE: 'episode'>\) counts episodes"):
        model._join_ranks(StandInRanks(), None, False, 100, True)
    model = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=2))
    with pytest.raises(ValueError, match=r"Every rank must step the same number of envs \(this rank, 1, has n_envs=2\)"):
        model._join_ranks(StandInRanks(), None, False, 100, True)
    model._data_parallel = StandInRanks()
    with pytest.raises(NotImplementedError, match="save_checkpoint does not support data-parallel training yet"):
        model.save_checkpoint(tmp_path / "checkpoint.zip")
    model.save(tmp_path / "model.zip")  # rank 1 writes nothing to a path
    model.save_replay_buffer(tmp_path / "buffer.pkl")
    assert not (tmp_path / "model.zip").exists() and not (tmp_path / "buffer.pkl").exists()


class MirrorRanks:
    """A DataParallel stand-in: rank 0 of two ranks, the other of which does exactly what this one does."""

    rank, world_size, device = 0, 2, th.device("cpu")

    def __init__(self):
        self.failed = False

    def all_equal(self, value: int) -> bool:
        return True

    def differing(self, values) -> list[str]:
        return []

    def all_true(self, flag: bool) -> bool:
        return flag

    def broadcast_(self, tensors) -> None:
        pass

    def average_gradients_(self, params) -> None:
        pass

    def merge_moments(self, count: th.Tensor, mean: th.Tensor, var: th.Tensor):
        return 2 * count, mean, var

    def fail(self) -> None:
        self.failed = True


def mirrored_model(env=None, **kwargs) -> FastTD3:
    model = FastTD3("MlpPolicy", env or make_vec_env("Pendulum-v1", n_envs=N_ENVS), **{**KWARGS, **kwargs})
    model._data_parallel = MirrorRanks()
    return model


def test_the_progress_bar_counts_every_ranks_transitions(monkeypatch):
    bars = []

    class RecordingBar:
        """Stands in for tqdm: its total and how far it got."""

        def __init__(self, total: int):
            self.total, self.n = total, 0
            bars.append(self)

        def update(self, n: int) -> None:
            self.n += n

        def refresh(self) -> None:
            pass

        def close(self) -> None:
            pass

    monkeypatch.setattr(sb3_callbacks, "tqdm", RecordingBar)
    model = mirrored_model()
    model.learn(40, progress_bar=True)
    model.learn(24, progress_bar=True, reset_num_timesteps=False)
    assert model.num_timesteps == 64 and [(bar.total, bar.n) for bar in bars] == [(40, 40), (24, 24)]


def test_a_vec_normalize_updating_its_statistics_is_refused():
    with pytest.raises(ValueError, match=r"A VecNormalize that updates its statistics \(training=True\)"):
        mirrored_model(VecNormalize(make_vec_env("Pendulum-v1", n_envs=N_ENVS))).learn(8)
    frozen = VecNormalize(make_vec_env("Pendulum-v1", n_envs=N_ENVS), training=False)
    assert mirrored_model(frozen).learn(8).num_timesteps == 8


def test_a_rank_leaving_learn_on_sys_exit_does_not_wait_for_the_others_at_exit():
    class Exit(BaseCallback):
        def _on_step(self) -> bool:
            sys.exit(1)

    model = mirrored_model()
    with pytest.raises(SystemExit):
        model.learn(40, callback=Exit())
    assert model._data_parallel.failed


def test_exit_waits_for_the_other_ranks_unless_this_one_failed(monkeypatch):
    """A rank ending normally meets the others before closing its group; one ending on an exception does not."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")
    monkeypatch.setattr(dist, "monitored_barrier", lambda timeout: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(atexit, "register", lambda close: calls.append("registered"))
    monkeypatch.setattr(sys, "excepthook", lambda *args: calls.append("previous hook"))
    teardown = _GroupTeardown()
    teardown.close()
    assert calls == ["registered", "barrier", "destroy"]
    calls.clear()
    sys.excepthook(ValueError, ValueError("env failed"), None)
    teardown.close()
    assert calls == ["previous hook", "destroy"]
    # A rank whose learn() ended on an error (sys.exit included, which no excepthook sees)
    calls.clear()
    teardown = _GroupTeardown()
    DataParallel.fail()
    teardown.close()
    assert calls == ["registered", "destroy"]
