"""
Quickstart: train FastTD3 on Pendulum-v1 with its tuned hyperparameters, save, load and act.

    python examples/quickstart.py --timesteps 8000
"""

import argparse

from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import load_hyperparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="Pendulum-v1")
    parser.add_argument("--timesteps", type=int, default=8000)
    parser.add_argument("--save-path", default="fasttd3_quickstart")
    args = parser.parse_args()

    # The entry of sb3_fasttd3/hyperparams/fasttd3.yml (what the RL Zoo would use) and its number of envs
    hyperparams, n_envs = load_hyperparams(args.env)
    env = make_vec_env(args.env, n_envs=n_envs, seed=0)
    model = FastTD3(env=env, verbose=1, seed=0, **hyperparams)
    model.learn(total_timesteps=args.timesteps, log_interval=8)
    model.save(args.save_path)

    # The observation normalizer lives in the policy: the loaded model acts on raw observations
    model = FastTD3.load(args.save_path)
    eval_env = make_vec_env(args.env, n_envs=1, seed=1)
    mean_return, std_return = evaluate_policy(model, eval_env, n_eval_episodes=5)
    print(f"evaluation return {mean_return:.1f} +/- {std_return:.1f}")

    obs = eval_env.reset()
    action, _ = model.predict(obs, deterministic=True)
    print(f"action for the first observation: {action}")


if __name__ == "__main__":
    main()
