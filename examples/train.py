"""
Train FastTD3 on a Gymnasium task with the CPU-sized hyperparameters of ``hyperparams/fasttd3.yml``
(shipped in the package as ``sb3_fasttd3/hyperparams/fasttd3.yml``),
evaluate it and save it. ``make train`` runs this on HalfCheetah-v5 (embedded MuJoCo, no server).

    python examples/train.py --env HalfCheetah-v5 --timesteps 100000 --save-path fasttd3_halfcheetah
"""

import argparse
import time

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import load_hyperparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5", help="Gymnasium environment id")
    parser.add_argument("--timesteps", type=int, default=100_000, help="transitions to collect, over all envs")
    parser.add_argument("--n-envs", type=int, default=None, help="parallel envs (default: from the hyperparameters)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--save-path", default=None, help="where to save the model (default: fasttd3_<env>)")
    parser.add_argument("--eval-episodes", type=int, default=5)
    args = parser.parse_args()

    hyperparams, n_envs = load_hyperparams(args.env)
    n_envs = args.n_envs or n_envs
    env = make_vec_env(args.env, n_envs=n_envs, seed=args.seed)
    model = FastTD3(env=env, seed=args.seed, device=args.device, verbose=1, **hyperparams)
    start = time.perf_counter()
    model.learn(args.timesteps, progress_bar=True, log_interval=max(1, 4 * n_envs))
    elapsed = time.perf_counter() - start

    save_path = args.save_path or f"fasttd3_{args.env.split('-')[0].lower()}"
    model.save(save_path)
    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=args.eval_episodes)
    print(f"{args.env}: {args.timesteps} transitions in {elapsed:.0f} s")
    print(f"evaluation return {mean_return:.1f} +/- {std_return:.1f} over {args.eval_episodes} episodes")
    print(f"model saved to {save_path}.zip")


if __name__ == "__main__":
    main()
