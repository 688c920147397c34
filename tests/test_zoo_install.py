"""
The RL Zoo as users meet it: ``python -m rl_zoo3.<script> --algo fasttd3`` in fresh interpreters.

The wheel tests build a (non-editable) wheel of this checkout and install it, without dependencies, into
a fresh virtual environment whose only other path is this environment's site-packages directory, added
as a plain path (its ``.pth`` files, the editable install of this checkout included, are not run). The
import hook then comes from the wheel alone. Commands run from a temporary directory so that the
checkout is never importable by accident.
"""

import os
import site
import subprocess
import sys
import sysconfig
import textwrap
import venv
from pathlib import Path

import numpy as np
import pytest
import yaml

pytest.importorskip("rl_zoo3")

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import zoo_entry

REPO = Path(__file__).resolve().parents[1]
PTH_FILE = "sb3_fasttd3_zoo.pth"
TRAIN_STEPS = 2000


def run(python: Path | str, *args: str, cwd: Path, env: dict | None = None, flags: tuple = ()) -> str:
    """Run ``python [flags] args`` and return its output; fail the test with the output on error."""
    environ = {**os.environ, "MPLBACKEND": "Agg", "PYTHONPATH": "", **(env or {})}
    result = subprocess.run([str(python), *flags, *args], cwd=cwd, env=environ, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{args} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheel_env(tmp_path_factory) -> tuple[Path, Path]:
    """A fresh venv with the wheel of this checkout: its python and its site-packages."""
    root = tmp_path_factory.mktemp("wheel")
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(root / "dist"), str(REPO), cwd=root)
    (wheel,) = (root / "dist").glob("sb3_fasttd3-*.whl")
    # The venv's own pip: `pip install --prefix` from this environment would uninstall the checkout here
    venv.create(root / "venv", with_pip=True)
    python = root / "venv" / "bin" / "python"
    purelib = Path(run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=root).strip())
    run(python, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel), cwd=root)
    (purelib / "dependencies.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python, purelib


@pytest.fixture(scope="module")
def trained(wheel_env, tmp_path_factory) -> tuple[Path, str]:
    """``rl_zoo3.train --algo fasttd3 --env Pendulum-v1 -n 2000`` without -conf: the working dir and the output."""
    python, _ = wheel_env
    cwd = tmp_path_factory.mktemp("zoo")
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", str(TRAIN_STEPS), "-f", "logs", "--seed", "0"]
    output = run(
        python, "-m", "rl_zoo3.train", *args, "--eval-freq", "1000", "--eval-episodes", "2", "--save-freq", "1000", cwd=cwd
    )
    return cwd, output


def test_wheel_ships_the_hook(wheel_env):
    python, purelib = wheel_env
    assert (purelib / PTH_FILE).is_file() and (purelib / "_sb3_fasttd3_zoo_hook.py").is_file()
    location = run(python, "-c", "import sb3_fasttd3; print(sb3_fasttd3.__file__)", cwd=purelib.parent)
    assert Path(location.strip()).is_relative_to(purelib)


def test_train_without_conf_uses_packaged_config(wheel_env, trained):
    _, purelib = wheel_env
    cwd, output = trained
    assert f"Loading hyperparameters from: {purelib / 'sb3_fasttd3' / 'hyperparams' / 'fasttd3.yml'}" in output
    run_dir = cwd / "logs" / "fasttd3" / "Pendulum-v1_1"
    saved = yaml.load((run_dir / "Pendulum-v1" / "config.yml").read_text(), Loader=yaml.UnsafeLoader)
    entry = zoo_entry("Pendulum-v1")
    assert dict(saved) == entry
    model = FastTD3.load(run_dir / "Pendulum-v1.zip")
    assert model.num_timesteps == TRAIN_STEPS and model.num_atoms == entry["num_atoms"]


def test_eval_checkpoints_and_best_model_carry_the_normalizer(trained):
    cwd, _ = trained
    run_dir = cwd / "logs" / "fasttd3" / "Pendulum-v1_1"
    counts = [
        FastTD3.load(run_dir / f"rl_model_{steps}_steps.zip").policy.obs_normalizer.count.item() for steps in (1000, 2000)
    ]
    assert 0 < counts[0] < counts[1]
    best = FastTD3.load(run_dir / "best_model.zip")
    assert best.policy.obs_normalizer.count.item() in counts
    assert not best.replay_buffer.is_allocated  # loading to predict allocates no replay storage
    evaluations = np.load(run_dir / "evaluations.npz")
    assert list(evaluations["timesteps"]) == [1000, 2000]


def test_enjoy(wheel_env, trained):
    python, _ = wheel_env
    cwd, _ = trained
    output = run(
        python,
        "-m",
        "rl_zoo3.enjoy",
        "--algo",
        "fasttd3",
        "--env",
        "Pendulum-v1",
        "-f",
        "logs",
        "-n",
        "450",
        "--no-render",
        cwd=cwd,
    )
    assert "Mean reward" in output and "2 Episodes" in output


def test_continue_training_with_subprocess_envs(wheel_env, trained):
    python, _ = wheel_env
    cwd, _ = trained
    previous = cwd / "logs" / "fasttd3" / "Pendulum-v1_1" / "Pendulum-v1.zip"
    args = [
        "--algo",
        "fasttd3",
        "--env",
        "Pendulum-v1",
        "-n",
        "400",
        "-f",
        "logs",
        "-i",
        str(previous),
        "--vec-env",
        "subproc",
    ]
    output = run(python, "-m", "rl_zoo3.train", *args, cwd=cwd)
    assert "Loading pretrained agent" in output
    # The Zoo restarts the timestep count (reset_num_timesteps=True); the learned state carries on
    before = FastTD3.load(previous).policy.obs_normalizer.count.item()
    model = FastTD3.load(cwd / "logs" / "fasttd3" / "Pendulum-v1_2" / "Pendulum-v1.zip")
    assert model.num_timesteps == 400 and model.policy.obs_normalizer.count.item() >= before + 400


def test_plots(wheel_env, trained):
    python, _ = wheel_env
    cwd, _ = trained
    run(python, "-m", "rl_zoo3.plots.plot_train", "-a", "fasttd3", "-e", "Pendulum-v1", "-f", "logs", cwd=cwd)
    output = run(
        python, "-m", "rl_zoo3.plots.all_plots", "-a", "fasttd3", "-e", "Pendulum-v1", "-f", "logs", "-o", "results", cwd=cwd
    )
    assert "fasttd3" in output and (cwd / "results.pkl").is_file()


def test_record_video_and_record_training(wheel_env, tmp_path):
    """Headless videos of a MuJoCo agent: record_video, then record_training (a video per checkpoint)."""
    python, _ = wheel_env
    gl = {"MUJOCO_GL": "egl"}
    probe = subprocess.run(
        [str(python), "-c", "import mujoco; mujoco.GLContext(64, 64).make_current()"],
        env={**os.environ, **gl},
        capture_output=True,
    )
    if probe.returncode != 0:
        pytest.skip("no EGL OpenGL library here (install libegl1 and libegl-mesa0, see docs/guide/install.md)")
    common = ["--algo", "fasttd3", "--env", "InvertedPendulum-v5", "-f", "logs"]
    run(
        python,
        "-m",
        "rl_zoo3.train",
        *common,
        "-n",
        "800",
        "--save-freq",
        "400",
        "--hyperparams",
        "learning_starts:200",
        cwd=tmp_path,
    )
    run(python, "-m", "rl_zoo3.record_video", *common, "-n", "100", cwd=tmp_path, env=gl)
    videos = tmp_path / "logs" / "fasttd3" / "InvertedPendulum-v5_1" / "videos"
    (video,) = videos.glob("final-model-fasttd3-InvertedPendulum-v5-step-0-to-step-100.mp4")
    size = video.stat().st_size
    assert size > 1000
    # record_training runs `python -m rl_zoo3.record_video` per model (the venv's python must come first on PATH)
    # and joins the videos with `ffmpeg` from PATH: the one imageio-ffmpeg ships (from PyPI, with moviepy) will do
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    ffmpeg = run(python, "-c", "import imageio_ffmpeg; print(imageio_ffmpeg.get_ffmpeg_exe())", cwd=tmp_path).strip()
    (bin_dir / "ffmpeg").symlink_to(ffmpeg)
    path = os.pathsep.join([str(python.parent), str(bin_dir), os.environ["PATH"]])
    run(python, "-m", "rl_zoo3.record_training", *common, "-n", "100", cwd=tmp_path, env={**gl, "PATH": path})
    names = sorted(video.name.split("-fasttd3")[0] for video in videos.glob("*-step-0-to-step-100.mp4"))
    assert names == ["checkpoint-400", "checkpoint-800", "final-model"]
    assert (videos / "training.mp4").stat().st_size > size


def test_one_optuna_trial(wheel_env, tmp_path):
    python, _ = wheel_env
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "400", "-optimize", "--n-trials", "1", "--n-evaluations", "1"]
    args += [
        "--sampler",
        "random",
        "--pruner",
        "none",
        "--seed",
        "0",
        "--eval-episodes",
        "1",
        "--hyperparams",
        "learning_starts:200",
    ]
    output = run(python, "-m", "rl_zoo3.train", *args, cwd=tmp_path)
    assert "Number of finished trials:  1" in output and "num_atoms" in output and "TrialPruned" not in output


def test_without_site_the_fallback_registers(wheel_env, tmp_path):
    """``python -S`` runs no ``.pth`` file: ``--algo fasttd3`` is unknown to rl_zoo3 but works through the fallback."""
    python, purelib = wheel_env
    env = {"PYTHONPATH": os.pathsep.join([str(purelib), sysconfig.get_path("purelib")])}
    args = ["--algo", "fasttd3", "--env", "Pendulum-v1", "-n", "300", "-f", "logs", "--hyperparams", "learning_starts:200"]
    result = subprocess.run(
        [str(python), "-S", "-m", "rl_zoo3.train", *args],
        cwd=tmp_path,
        env={**os.environ, **env},
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and "invalid choice: 'fasttd3'" in result.stderr
    run(python, "-m", "sb3_fasttd3.zoo", "train", *args, cwd=tmp_path, env=env, flags=("-S",))
    assert (tmp_path / "logs" / "fasttd3" / "Pendulum-v1_1" / "Pendulum-v1.zip").is_file()


# ---------------------------------------------------------------- the hook in this (editable) environment
def test_interpreter_start_is_silent_and_light(tmp_path):
    modules = ("_sb3_fasttd3_zoo_hook", "torch", "rl_zoo3", "sb3_fasttd3")
    code = f"import sys; print(sorted(m for m in {modules} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "['_sb3_fasttd3_zoo_hook']" and result.stderr == ""


def test_pth_sorts_after_editable_installs():
    directory = next(Path(path) for path in site.getsitepackages() if (Path(path) / PTH_FILE).is_file())
    names = sorted(path.name for path in directory.glob("*.pth"))
    assert all(names.index(PTH_FILE) > names.index(name) for name in names if name.startswith("__editable__"))


@pytest.mark.parametrize("warnings_as_errors", [False, True])
def test_broken_zoo_never_raises(tmp_path, warnings_as_errors):
    """An rl_zoo3 without ``ALGOS`` imports as it would without us: at most a warning, never an exception."""
    package = tmp_path / "rl_zoo3"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "utils.py").write_text("NOT_ALGOS = {}\n")
    code = textwrap.dedent(
        """
        import rl_zoo3.utils
        print("imported", "fasttd3" in rl_zoo3.utils.NOT_ALGOS)
        """
    )
    flags = ["-W", "error::RuntimeWarning"] if warnings_as_errors else []
    result = subprocess.run(
        [sys.executable, *flags, "-c", code],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
    )
    assert result.returncode == 0 and result.stdout.strip() == "imported False", result.stderr
    assert ("could not register FastTD3 into rl_zoo3.utils" in result.stderr) != warnings_as_errors
    assert "Traceback" not in result.stderr


def test_two_copies_of_the_hook_register_once(tmp_path):
    """A second copy of the hook (two installs on the path) must neither recurse nor break the import."""
    (tmp_path / "second_hook.py").write_text((REPO / "_sb3_fasttd3_zoo_hook.py").read_text())
    code = "import second_hook, rl_zoo3.utils as u; print(u.ALGOS['fasttd3'].__name__)"
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert result.returncode == 0 and result.stdout.strip() == "FastTD3", result.stderr
    assert "RecursionError" not in result.stderr and "could not register" not in result.stderr
