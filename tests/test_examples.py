"""The examples run as documented (with small step counts)."""

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(name: str, *args: str, cwd: Path) -> str:
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, f"{name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout


def test_quickstart(tmp_path):
    output = run_example("quickstart.py", "--timesteps", "1200", cwd=tmp_path)
    assert "evaluation return" in output and (tmp_path / "fasttd3_quickstart.zip").is_file()


def test_train(tmp_path):
    # The script of `make train`, on a task whose entry trains in seconds
    output = run_example("train.py", "--env", "Pendulum-v1", "--timesteps", "400", "--eval-episodes", "1", cwd=tmp_path)
    assert "evaluation return" in output and (tmp_path / "fasttd3_pendulum.zip").is_file()


def test_playground(tmp_path):
    pytest.importorskip("mujoco_playground")
    args = ["--task", "CartpoleBalance", "--timesteps", "256", "--n-envs", "4", "--eval-episodes", "1"]
    output = run_example("playground_cheetah_run.py", *args, cwd=tmp_path)
    assert "evaluation return" in output and (tmp_path / "fasttd3_playground_cartpolebalance.zip").is_file()


def test_callbacks_stop_at_threshold_then_resume(tmp_path):
    # A threshold every evaluation beats: training stops at the first evaluation, after its checkpoint
    output = run_example("callbacks.py", "--timesteps", "8000", "--eval-every", "1200", "--threshold=-1e9", cwd=tmp_path)
    assert "stopped after 1200 transitions" in output
    checkpoints = tmp_path / "logs" / "fasttd3_callbacks" / "checkpoints"
    assert (checkpoints / "fasttd3_1200_steps.zip").is_file()
    assert (tmp_path / "logs" / "fasttd3_callbacks" / "best_model.zip").is_file()

    output = run_example(
        "resume.py", "--checkpoint", str(checkpoints / "fasttd3_1200_steps.zip"), "--timesteps", "400", cwd=tmp_path
    )
    # The step is stored before the callbacks run: the checkpoint taken at vector step 300 holds 300 transitions
    assert "replay buffer restored: 300 transitions per env" in output
    assert "resumed at 1200 transitions, now at 1600" in output
    assert (checkpoints / "fasttd3_1600_steps.zip").is_file()


def test_train_from_pixels(tmp_path):
    output = run_example("train_from_pixels.py", "--timesteps", "600", cwd=tmp_path)
    assert "evaluation return" in output and (tmp_path / "fasttd3_pixels.zip").is_file()


def test_distributed_under_torchrun(tmp_path):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    command = [*torchrun, str(EXAMPLES / "distributed.py"), "--env", "Pendulum-v1", "--timesteps", "800"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    from sb3_fasttd3 import FastTD3

    assert FastTD3.load(tmp_path / "fasttd3_distributed.zip").num_timesteps == 800
