"""
FastTD3 in the RL Baselines3 Zoo: ``--algo fasttd3`` for train, enjoy, record_video, -optimize...

The Zoo has no plugin entry point: its algorithms are a plain dict, ``rl_zoo3.utils.ALGOS``, read by
argparse ``choices`` before any ``--gym-packages`` import. The import hook installed with the package
(``_sb3_fasttd3_zoo_hook``) calls :func:`patch_module` on each Zoo module below right after it executes;
:func:`register` does the same by hand (``python -m sb3_fasttd3.zoo`` and ``python -S``).
"""

import atexit
import functools
import importlib
import inspect
import os
import shutil
import tempfile
from types import ModuleType
from typing import Any

from sb3_fasttd3.common.distributed import launched_by_torchrun
from sb3_fasttd3.fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import HYPERPARAMS_FILE, REPLAY_BUFFERS, SCHEDULE_KEYS, parse_schedule
from sb3_fasttd3.zoo.sampler import convert_fasttd3_params, sample_fasttd3_params

ALGO_NAME = "fasttd3"
# Set on a patched object so that patching twice (hook and register()) is harmless
_MARK = "_sb3_fasttd3_patched"


def _register_algo(utils: ModuleType) -> None:
    utils.ALGOS[ALGO_NAME] = FastTD3


def _register_sampler(hyperparams_opt: ModuleType) -> None:
    hyperparams_opt.HYPERPARAMS_SAMPLER[ALGO_NAME] = sample_fasttd3_params
    hyperparams_opt.HYPERPARAMS_CONVERTER[ALGO_NAME] = convert_fasttd3_params


def _rank_arguments(arguments: dict[str, Any]) -> None:
    """
    Under torchrun, ``--eval-freq`` and ``--save-freq`` count every rank's transitions, as ``-n`` does (the Zoo
    divides them by one rank's ``n_envs``), ``-optimize`` is refused (each rank would run its own study), and the
    ranks other than 0 write their Zoo outputs (monitor files, config, logs) into a temporary folder, quietly: the
    run's folder holds rank 0's only, and the ranks never race for the same run id.
    """
    if not launched_by_torchrun():
        return
    if arguments["optimize_hyperparameters"]:
        raise ValueError(
            "-optimize under torchrun would run one Optuna study per process, each sampling its own hyperparameters "
            "for ranks that must share them: run the search without torchrun, then train its best trial with torchrun"
        )
    for key in ("eval_freq", "save_freq"):
        if arguments[key] > 0:
            arguments[key] = max(arguments[key] // int(os.environ["WORLD_SIZE"]), 1)
    if os.environ["RANK"] != "0":
        arguments["log_folder"] = folder = tempfile.mkdtemp(prefix=f"fasttd3_rank{os.environ['RANK']}_")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        arguments["tensorboard_log"] = ""
        arguments["verbose"] = 0


def _default_config(exp_manager: ModuleType) -> None:
    """
    Without ``-conf``, ``--algo fasttd3`` reads the hyperparameters shipped in this package; under torchrun, only
    rank 0 writes into the log folder.
    """
    manager = exp_manager.ExperimentManager
    original_init = manager.__init__
    if getattr(original_init, _MARK, False):
        return
    signature = inspect.signature(original_init)

    @functools.wraps(original_init)
    def __init__(*args: Any, **kwargs: Any) -> None:
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        if bound.arguments.get("algo") == ALGO_NAME:
            if not bound.arguments.get("config"):
                bound.arguments["config"] = str(HYPERPARAMS_FILE)
            _rank_arguments(bound.arguments)
        original_init(*bound.args, **bound.kwargs)

    setattr(__init__, _MARK, True)
    manager.__init__ = __init__


def _schedules(exp_manager: ModuleType) -> None:
    """
    The Zoo reads only ``learning_rate: lin_<rate>`` as a schedule; FastTD3's entries may also write the actor's and
    the critic's rates as one, and any of the three as ``LinearSchedule(start, end, end_fraction)``
    (:func:`~sb3_fasttd3.hyperparams.parse_schedule`). Other algorithms' entries read as before.
    """
    manager = exp_manager.ExperimentManager
    original = manager._preprocess_schedules
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def _preprocess_schedules(hyperparams: dict[str, Any]) -> dict[str, Any]:
        ours = {
            key: parse_schedule(key, hyperparams.pop(key))
            for key in SCHEDULE_KEYS
            if isinstance(hyperparams.get(key), str) and not (key == "learning_rate" and hyperparams[key].startswith("lin_"))
        }
        return {**original(hyperparams), **ours}

    setattr(_preprocess_schedules, _MARK, True)
    manager._preprocess_schedules = staticmethod(_preprocess_schedules)


def _replay_buffer_names(exp_manager: ModuleType) -> None:
    """The Zoo evaluates a ``replay_buffer_class`` string in its own module, which knows ``HerReplayBuffer`` only."""
    for name, buffer_class in REPLAY_BUFFERS.items():
        if not hasattr(exp_manager, name):
            setattr(exp_manager, name, buffer_class)


def _patch_exp_manager(exp_manager: ModuleType) -> None:
    _default_config(exp_manager)
    _schedules(exp_manager)
    _replay_buffer_names(exp_manager)


PATCHES = {
    "rl_zoo3.utils": _register_algo,
    "rl_zoo3.hyperparams_opt": _register_sampler,
    "rl_zoo3.exp_manager": _patch_exp_manager,
}


def patch_module(module: ModuleType) -> None:
    """
    Register FastTD3 into one executed Zoo module (one of :data:`PATCHES`, others are ignored).

    :param module: ``rl_zoo3.utils``, ``rl_zoo3.hyperparams_opt`` or ``rl_zoo3.exp_manager``
    """
    patch = PATCHES.get(module.__name__)
    if patch is not None:
        patch(module)


def register() -> None:
    """Import the Zoo and register FastTD3 into it (idempotent). Needs ``pip install sb3-fasttd3[zoo]``."""
    for name in PATCHES:
        patch_module(importlib.import_module(name))
