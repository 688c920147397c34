"""
A small training run for tests/test_checkpoints.py, run in its own process so that it can be killed for real.

    python checkpoint_run.py train SAVE_DIR OUT TOTAL [--slow]
    python checkpoint_run.py resume SAVE_DIR OUT TOTAL
"""

import sys
import time
from pathlib import Path

import torch as th
from stable_baselines3.common.callbacks import BaseCallback, CallbackList
from stable_baselines3.common.env_util import make_vec_env

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.callbacks import FastTD3CheckpointCallback

KWARGS = dict(
    learning_starts=100,
    batch_size=32,
    buffer_size=2000,
    n_steps=3,
    compile=False,
    policy_kwargs=dict(net_arch=dict(pi=[16], qf=[32, 16])),
    device="cpu",
)


class Slow(BaseCallback):
    """Stretches the run so that the test can kill it midway."""

    def _on_step(self) -> bool:
        time.sleep(0.004)
        return True


def main() -> None:
    mode, save_dir, out, total = sys.argv[1], Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    th.set_num_threads(1)  # the same float results in every process
    checkpoints = FastTD3CheckpointCallback(save_freq=40, save_path=str(save_dir), name_prefix="run", keep_last=2)
    if mode == "train":
        env = make_vec_env("Pendulum-v1", n_envs=2, seed=0)
        model = FastTD3("MlpPolicy", env, seed=0, **KWARGS)
        callbacks = [checkpoints, Slow()] if "--slow" in sys.argv else [checkpoints]
        model.learn(total, callback=CallbackList(callbacks))
    else:
        newest = FastTD3CheckpointCallback(1, str(save_dir), name_prefix="run").checkpoints()[-1]
        model = FastTD3.load_checkpoint(newest, device="cpu")
        print(f"resumed from {newest.name} at {model.num_timesteps}", flush=True)
        model.learn(total - model.num_timesteps, callback=checkpoints, reset_num_timesteps=False)
    th.save({"params": model.policy.state_dict(), "num_timesteps": model.num_timesteps, "n_updates": model._n_updates}, out)


if __name__ == "__main__":
    main()
