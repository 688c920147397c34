"""
Resume training from a checkpoint of examples/callbacks.py: the model, then its replay buffer, then
``learn(..., reset_num_timesteps=False)`` so that step counts, schedules and logs carry on.

    python examples/callbacks.py --timesteps 4000
    python examples/resume.py --checkpoint logs/fasttd3_callbacks/checkpoints/fasttd3_4000_steps.zip --timesteps 4000
"""

import argparse
from pathlib import Path

from stable_baselines3.common.env_util import make_vec_env

from sb3_fasttd3 import FastTD3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a model zip saved by CheckpointCallback")
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--n-envs", type=int, default=4, help="must match the checkpoint's replay buffer")
    parser.add_argument("--timesteps", type=int, default=4000, help="transitions to add")
    args = parser.parse_args()

    checkpoint = Path(args.checkpoint)
    env = make_vec_env(args.env, n_envs=args.n_envs, seed=1)
    model = FastTD3.load(checkpoint, env=env)
    # CheckpointCallback names the buffer <prefix>_replay_buffer_<steps>_steps.pkl next to the model
    prefix, steps, _ = checkpoint.stem.rsplit("_", 2)
    buffer_path = checkpoint.with_name(f"{prefix}_replay_buffer_{steps}_steps.pkl")
    if buffer_path.is_file():
        model.load_replay_buffer(buffer_path)
        print(f"replay buffer restored: {model.replay_buffer.size()} transitions per env")
    else:
        print(f"no replay buffer at {buffer_path}: learning restarts from an empty buffer")
    start = model.num_timesteps
    model.learn(args.timesteps, reset_num_timesteps=False)
    print(f"resumed at {start} transitions, now at {model.num_timesteps}")
    model.save(checkpoint.with_name(f"{prefix}_resumed_{model.num_timesteps}_steps"))


if __name__ == "__main__":
    main()
