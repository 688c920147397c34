"""
Train FastTD3 on MuJoCo Playground's CheetahRun (DM Control suite on MJX, JAX), with the environments,
the replay buffer and the networks all on one device: observations reach torch through DLPack, without copies.
Hyperparameters come from ``sb3_fasttd3/hyperparams/playground.yml`` (CPU-sized entries, GPU-sized for robots).

    pip install -e ".[jax]"
    python examples/playground_cheetah_run.py --timesteps 200000
    python examples/playground_cheetah_run.py --task CartpoleBalance --timesteps 30000

On a GPU, install JAX's CUDA build (``pip install "jax[cuda12]"``) and pass ``--device cuda``: JAX and torch
must see the same device.
"""

import argparse
import time

from stable_baselines3.common.evaluation import evaluate_policy

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import PLAYGROUND_FILE, load_hyperparams, zoo_entry
from sb3_fasttd3.vec_env import NumpyVecEnv
from sb3_fasttd3.vec_env.playground import PlaygroundVecEnv


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--task", default="CheetahRun", help="MuJoCo Playground task name")
    parser.add_argument("--timesteps", type=int, default=None, help="transitions over all envs (default: the entry's)")
    parser.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: the entry's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="torch and JAX device, e.g. cpu or cuda")
    parser.add_argument("--eval-episodes", type=int, default=8)
    parser.add_argument("--save-path", default=None)
    args = parser.parse_args()

    hyperparams, n_envs = load_hyperparams(args.task, PLAYGROUND_FILE)
    timesteps = args.timesteps or int(zoo_entry(args.task, PLAYGROUND_FILE)["n_timesteps"])
    n_envs = args.n_envs or n_envs
    env = PlaygroundVecEnv(args.task, num_envs=n_envs, device=args.device, randomize_episode_start=True, seed=args.seed)
    model = FastTD3(env=env, seed=args.seed, device=args.device, verbose=1, **hyperparams)
    start = time.perf_counter()
    model.learn(timesteps, log_interval=max(1, n_envs))
    elapsed = time.perf_counter() - start

    save_path = args.save_path or f"fasttd3_playground_{args.task.lower()}"
    model.save(save_path)
    # Evaluation: all episodes at once, one per env, through the NumPy adapter that SB3's tools expect
    eval_env = NumpyVecEnv(PlaygroundVecEnv(args.task, num_envs=args.eval_episodes, device=args.device, seed=args.seed + 1))
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes)
    print(f"{args.task}: {model.num_timesteps} transitions in {elapsed:.0f} s")
    print(f"evaluation return {mean_return:.1f} +/- {std_return:.1f} over {args.eval_episodes} episodes")
    print(f"model saved to {save_path}.zip")


if __name__ == "__main__":
    main()
