"""
Resume training from a checkpoint of examples/callbacks.py (FastTD3CheckpointCallback): the model, its optimizers,
replay buffer, exploration noise, RNGs and envs come back together, and ``learn(..., reset_num_timesteps=False)``
carries on with the step counts, schedules and logs. Killed at any moment, a run resumed from its newest checkpoint
reaches what it would have reached uninterrupted (see docs/checkpoints.md).

    python examples/callbacks.py --timesteps 4000
    python examples/resume.py --checkpoint logs/fasttd3_callbacks/checkpoints/fasttd3_4000_steps.zip --timesteps 4000
"""

import argparse
from pathlib import Path

from stable_baselines3.common.env_util import make_vec_env

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.callbacks import FastTD3CheckpointCallback


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a checkpoint written by FastTD3CheckpointCallback")
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--n-envs", type=int, default=4, help="must match the checkpoint's")
    parser.add_argument("--timesteps", type=int, default=4000, help="transitions to add")
    args = parser.parse_args()

    checkpoint = Path(args.checkpoint)
    # The checkpoint's envs (their state, wrappers and RNGs) are put into this env when they could be saved
    env = make_vec_env(args.env, n_envs=args.n_envs, seed=1)
    model = FastTD3.load_checkpoint(checkpoint, env=env)
    print(f"replay buffer restored: {model.replay_buffer.size()} transitions per env")
    start = model.num_timesteps
    # Keep checkpointing under the same prefix, so that a crash now resumes from the newest one
    prefix = checkpoint.stem.rsplit("_", 2)[0]
    callback = FastTD3CheckpointCallback(
        save_freq=max(args.timesteps // args.n_envs, 1), save_path=str(checkpoint.parent), name_prefix=prefix, keep_last=3
    )
    model.learn(args.timesteps, callback=callback, reset_num_timesteps=False)
    print(f"resumed at {start} transitions, now at {model.num_timesteps}")


if __name__ == "__main__":
    main()
