"""Callbacks: crash-safe checkpoints that keep the newest few, and a progress bar of the model's timesteps."""

import os
import pickle
import re
from pathlib import Path

from stable_baselines3.common.callbacks import CheckpointCallback, ProgressBarCallback

from sb3_fasttd3.common.checkpoints import atomic_write
from sb3_fasttd3.common.utils import is_integer


class FastTD3CheckpointCallback(CheckpointCallback):
    """
    SB3's ``CheckpointCallback`` (same arguments, same file names ``<name_prefix>_<num_timesteps>_steps.zip``)
    writing full checkpoints with ``model.save_checkpoint``: atomically, and holding the replay buffer, the
    exploration noise, every RNG and the envs where they pickle, so that ``FastTD3.load_checkpoint`` resumes
    training exactly.

    A checkpoint due at a step is written when that step's training is done (at the start of the next rollout,
    or when training ends), so that the resumed run starts where the saved one would have gone on. Inside an
    ``EventCallback`` (``EveryNTimesteps``, ``EvalCallback``'s ``callback_on_new_best``), which passes on ``on_step``
    only, it is written at once: the resumed run then goes on without the updates of that step.

    :param save_freq: Save a checkpoint every ``save_freq`` calls of the callback (vector steps)
    :param save_path: Folder of the checkpoints
    :param name_prefix: Common prefix of the checkpoint files
    :param save_replay_buffer: Accepted for compatibility: the replay buffer is always in the checkpoint
    :param save_vecnormalize: Also save the ``VecNormalize`` statistics (atomically) as SB3 does
    :param verbose: 2 prints each checkpoint written
    :param keep_last: Keep only the newest ``keep_last`` checkpoints of this prefix (``None``: keep all)
    """

    def __init__(
        self,
        save_freq: int,
        save_path: str,
        name_prefix: str = "rl_model",
        save_replay_buffer: bool = False,
        save_vecnormalize: bool = False,
        verbose: int = 0,
        keep_last: int | None = None,
    ):
        if keep_last is not None and not (is_integer(keep_last) and keep_last >= 1):
            raise ValueError(f"keep_last must be None (keep all) or an int >= 1, got {keep_last!r}")
        if not (is_integer(save_freq) and save_freq >= 1):
            raise ValueError(f"save_freq must be an int >= 1, got {save_freq!r}")
        super().__init__(save_freq, save_path, name_prefix, save_replay_buffer, save_vecnormalize, verbose)
        self.keep_last = keep_last
        self._due = False

    def _init_callback(self) -> None:
        if getattr(self.model, "_data_parallel", None) is not None:  # refused now, not when the first save is due
            raise NotImplementedError(
                "FastTD3CheckpointCallback does not support data-parallel training yet (each rank holds its own replay "
                "buffer): use SB3's CheckpointCallback, whose model.save() rank 0 writes, and resume from the model"
            )
        super()._init_callback()
        # Temporary files of saves killed midway: never a checkpoint, safe to remove
        for stale in Path(self.save_path).glob(f".{self.name_prefix}_*_steps.zip.*.tmp"):
            stale.unlink(missing_ok=True)

    def _on_step(self) -> bool:
        if self.n_calls % self.save_freq == 0:
            self._due = True
            if self.parent is not None:  # an EventCallback never passes on the rollout and training-end hooks
                self._save_if_due()
        return True

    def _on_rollout_start(self) -> None:
        self._save_if_due()

    def _on_training_end(self) -> None:
        self._save_if_due()

    def _save_if_due(self) -> None:
        if not self._due:
            return
        self._due = False
        checkpoint = self._checkpoint_path(extension="zip")
        self.model.save_checkpoint(checkpoint)  # type: ignore[attr-defined]
        if self.verbose >= 2:
            print(f"Saving checkpoint to {checkpoint}")
        vec_normalize = self.model.get_vec_normalize_env()
        if self.save_vecnormalize and vec_normalize is not None:
            path = self._checkpoint_path("vecnormalize_", extension="pkl")
            atomic_write(path, lambda file: pickle.dump(vec_normalize, file))
        if self.keep_last is not None:
            self._remove_older_checkpoints(self.keep_last, newest=Path(checkpoint))

    def checkpoints(self) -> list[Path]:
        """
        This callback's checkpoint files (its prefix in its folder), oldest first: in the order they were written
        (then of their steps), so that a new run's checkpoints come after those an earlier run left at higher steps.
        """
        pattern = re.compile(rf"{re.escape(self.name_prefix)}_(\d+)_steps\.zip")
        if not Path(self.save_path).is_dir():  # none written yet
            return []
        found = [
            (path.stat().st_mtime_ns, int(m.group(1)), path)
            for path in Path(self.save_path).iterdir()
            if (m := pattern.fullmatch(path.name))
        ]
        return [path for *_, path in sorted(found)]

    def _remove_older_checkpoints(self, keep: int, newest: Path) -> None:
        older = [path for path in self.checkpoints() if path != newest]
        for path in older[: max(0, len(older) - (keep - 1))]:
            os.remove(path)
            vec_normalize = path.with_name(path.name.replace(f"{self.name_prefix}_", f"{self.name_prefix}_vecnormalize_", 1))
            vec_normalize.with_suffix(".pkl").unlink(missing_ok=True)


class TimestepsProgressBar(ProgressBarCallback):
    """
    SB3's progress bar (``learn(progress_bar=True)``), advanced to the model's ``num_timesteps``: in data-parallel
    training those count every rank's transitions, whereas SB3's bar adds this process's envs only.
    """

    def _on_training_start(self) -> None:
        super()._on_training_start()
        self._start = self.model.num_timesteps

    def _on_step(self) -> bool:
        self.pbar.update(self.model.num_timesteps - self._start - self.pbar.n)
        return True
