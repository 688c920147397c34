"""CPU-sized FastTD3 hyperparameters in the RL Zoo format, shipped with the package."""

from pathlib import Path
from typing import Any

import torch as th
import yaml
from stable_baselines3 import HerReplayBuffer
from stable_baselines3.common.buffers import DictReplayBuffer, NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.utils import LinearSchedule

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.schedules import DelayedLinearSchedule

HYPERPARAMS_FILE = Path(__file__).with_name("fasttd3.yml")
# MuJoCo Playground tasks (PlaygroundVecEnv), keyed by registry name
PLAYGROUND_FILE = Path(__file__).with_name("playground.yml")
# Keys of the RL Zoo format that are not FastTD3 constructor arguments: they make the envs, their wrappers, the
# callbacks or the run's length (read them with zoo_entry)
ZOO_ONLY_KEYS = (
    "n_timesteps",
    "n_envs",
    "env_kwargs",
    "env_wrapper",
    "vec_env_wrapper",
    "monitor_kwargs",
    "normalize",
    "frame_stack",
    "callback",
)
# The replay buffers an entry may name in replay_buffer_class
REPLAY_BUFFERS = {
    cls.__name__: cls for cls in (DeviceNStepReplayBuffer, ReplayBuffer, DictReplayBuffer, NStepReplayBuffer, HerReplayBuffer)
}
# Learning rates an entry may write as a schedule string, progressing over the run's total_timesteps
SCHEDULE_KEYS = ("learning_rate", "actor_learning_rate", "critic_learning_rate")
# The schedules a schedule string may call
SCHEDULES = {"LinearSchedule": LinearSchedule, "DelayedLinearSchedule": DelayedLinearSchedule}


def zoo_entry(env_id: str, path: Path | str = HYPERPARAMS_FILE) -> dict[str, Any]:
    """
    The raw entry for ``env_id`` (or ``default``), RL Zoo keys included.

    :param env_id: Gymnasium environment id (or Playground task name)
    :param path: RL Zoo-format YAML file
    """
    entries = yaml.safe_load(Path(path).read_text())
    if env_id not in entries and "default" not in entries:
        raise ValueError(f"{path} has no entry for env_id={env_id!r} and no default; it has {sorted(entries)}")
    return dict(entries.get(env_id, entries.get("default")))


def parse_schedule(key: str, value: str) -> LinearSchedule:
    """
    The learning-rate schedule a string writes: the RL Zoo's ``lin_<rate>`` (from ``rate`` down to 0), SB3's
    ``LinearSchedule(start, end, end_fraction)`` (from ``start`` to ``end`` over the first ``end_fraction`` of the
    run, then ``end``) or :class:`~sb3_fasttd3.common.schedules.DelayedLinearSchedule` ``(start, end, start_fraction,
    end_fraction)`` (``start`` until ``start_fraction`` of the run, then down to ``end`` at ``end_fraction``).

    :param key: the hyperparameter, named in the error
    :param value: the string
    """
    accepted = (
        f"{key} takes a float, lin_<rate>, LinearSchedule(start, end, end_fraction) or "
        f"DelayedLinearSchedule(start, end, start_fraction, end_fraction), got {value!r}"
    )
    try:
        if value.startswith("lin_"):
            return LinearSchedule(float(value.removeprefix("lin_")), 0.0, 1.0)
        schedule = eval(value, {"__builtins__": {}}, dict(SCHEDULES))
    except Exception as error:  # the cause says what was wrong: a name, the arguments, their values
        raise ValueError(f"{accepted} ({error})") from error
    if not isinstance(schedule, LinearSchedule):
        raise ValueError(accepted)
    return schedule


def load_hyperparams(env_id: str, path: Path | str = HYPERPARAMS_FILE) -> tuple[dict[str, Any], int]:
    """
    The entry for ``env_id`` (or ``default``) as FastTD3 keyword arguments, read as the RL Zoo reads them. The keys
    that make the envs, their wrappers, the callbacks or the run's length (:data:`ZOO_ONLY_KEYS`) are left out:
    :func:`zoo_entry` has them.

    :param env_id: Gymnasium environment id (or Playground task name)
    :param path: RL Zoo-format YAML file
    :return: the keyword arguments (``policy`` included) and the entry's number of envs
    """
    entry = zoo_entry(env_id, path)
    n_envs = int(entry.pop("n_envs", 1))
    for key in ZOO_ONLY_KEYS:
        entry.pop(key, None)
    if "noise_type" in entry or "noise_std" in entry:
        raise ValueError(
            f"noise_type and noise_std (entry {env_id!r} of {path}) make an SB3 action_noise of the env's action size, "
            "which load_hyperparams does not know: drop them and pass action_noise=NormalActionNoise(...) yourself, "
            "or train with the RL Zoo"
        )
    for key in ("policy_kwargs", "replay_buffer_kwargs"):
        if isinstance(entry.get(key), str):
            # The RL Zoo evaluates these strings; only dict() and torch.nn are needed here
            entry[key] = eval(entry[key], {"__builtins__": {}, "dict": dict, "nn": th.nn})
    if isinstance(entry.get("replay_buffer_class"), str):
        name = entry["replay_buffer_class"]
        if name not in REPLAY_BUFFERS:
            raise ValueError(f"replay_buffer_class must be one of {list(REPLAY_BUFFERS)}, got {name!r}")
        entry["replay_buffer_class"] = REPLAY_BUFFERS[name]
    if isinstance(entry.get("train_freq"), list):  # YAML has no tuples: the Zoo converts [1, "episode"] alike
        entry["train_freq"] = tuple(entry["train_freq"])
    for key in SCHEDULE_KEYS:
        if isinstance(entry.get(key), str):
            entry[key] = parse_schedule(key, entry[key])
    return entry, n_envs
