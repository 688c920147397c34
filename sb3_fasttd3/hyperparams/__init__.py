"""CPU-sized FastTD3 hyperparameters in the RL Zoo format, shipped with the package."""

from pathlib import Path
from typing import Any

import torch as th
import yaml

HYPERPARAMS_FILE = Path(__file__).with_name("fasttd3.yml")
# MuJoCo Playground tasks (PlaygroundVecEnv), keyed by registry name
PLAYGROUND_FILE = Path(__file__).with_name("playground.yml")
# Keys of the RL Zoo format that are not FastTD3 constructor arguments
ZOO_ONLY_KEYS = ("n_timesteps", "n_envs", "env_wrapper", "normalize", "frame_stack", "callback")


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


def load_hyperparams(env_id: str, path: Path | str = HYPERPARAMS_FILE) -> tuple[dict[str, Any], int]:
    """
    The entry for ``env_id`` (or ``default``) as FastTD3 keyword arguments.

    :param env_id: Gymnasium environment id (or Playground task name)
    :param path: RL Zoo-format YAML file
    :return: the keyword arguments (``policy`` included) and the entry's number of envs
    """
    entry = zoo_entry(env_id, path)
    n_envs = int(entry.pop("n_envs", 1))
    for key in ZOO_ONLY_KEYS:
        entry.pop(key, None)
    if isinstance(entry.get("policy_kwargs"), str):
        # The RL Zoo evaluates this string; only dict() and torch.nn are needed here
        entry["policy_kwargs"] = eval(entry["policy_kwargs"], {"__builtins__": {}, "dict": dict, "nn": th.nn})
    return entry, n_envs
