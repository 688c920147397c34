"""
Evaluation with SB3 callbacks: EvalCallback that stops at a reward threshold, crash-safe checkpoints
(FastTD3CheckpointCallback: the replay buffer, noise and RNGs included, the newest three kept, to resume later
with examples/resume.py) and a progress bar.

    python examples/callbacks.py --timesteps 20000 --threshold -200
"""

import argparse

from stable_baselines3.common.callbacks import EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.callbacks import FastTD3CheckpointCallback
from sb3_fasttd3.hyperparams import load_hyperparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--timesteps", type=int, default=20_000)
    parser.add_argument("--threshold", type=float, default=-200.0, help="stop once the evaluation return reaches it")
    parser.add_argument("--eval-every", type=int, default=2000, help="transitions between evaluations")
    parser.add_argument("--log-dir", default="logs/fasttd3_callbacks")
    args = parser.parse_args()

    hyperparams, n_envs = load_hyperparams(args.env)
    env = make_vec_env(args.env, n_envs=n_envs, seed=0)
    model = FastTD3(env=env, seed=0, **hyperparams)

    # Callback frequencies count calls, i.e. vector steps: divide transitions by the number of envs.
    # Evaluation uses the model's own normalizer statistics (no VecNormalize to sync).
    eval_callback = EvalCallback(
        make_vec_env(args.env, n_envs=1, seed=100),
        callback_on_new_best=StopTrainingOnRewardThreshold(reward_threshold=args.threshold, verbose=1),
        n_eval_episodes=5,
        eval_freq=max(args.eval_every // n_envs, 1),
        best_model_save_path=args.log_dir,
        log_path=args.log_dir,
        verbose=1,
    )
    checkpoint_callback = FastTD3CheckpointCallback(
        save_freq=max(args.eval_every // n_envs, 1),
        save_path=f"{args.log_dir}/checkpoints",
        name_prefix="fasttd3",
        keep_last=3,
    )
    model.learn(args.timesteps, callback=[eval_callback, checkpoint_callback], progress_bar=True)
    print(f"stopped after {model.num_timesteps} transitions; best evaluation return {eval_callback.best_mean_reward:.1f}")
    print(f"best model: {args.log_dir}/best_model.zip, checkpoints: {args.log_dir}/checkpoints/")


if __name__ == "__main__":
    main()
