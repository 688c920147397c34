"""
Try a variant of FastTD3's RL Zoo entry: the entry's hyperparameters with some of them replaced, trained under
a wall-clock budget with ``time_to_return``'s clock (evaluation time not counted), stopping early once the
evaluation return reaches ``--stop-at``. It prints the curve and appends it to
``benchmarks/results/entry_variants.json``: compare variants by seed, and between runs of similar CPU steal.

    python -m benchmarks.tune_entry --seed 2 --budget 360 --set n_envs=8
    python -m benchmarks.tune_entry --seed 2 --budget 360 --set gradient_steps=1 batch_size=512
"""

import argparse
import json

from stable_baselines3.common.env_util import make_vec_env

from benchmarks.common import RESULTS_DIR, CpuSteal, machine_info
from benchmarks.time_to_return import BudgetedEvaluation, budgeted_learn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--budget", type=float, default=360.0, help="training seconds")
    parser.add_argument("--stop-at", type=float, default=5000.0, help="stop once an evaluation reaches this return")
    parser.add_argument("--eval-every", type=int, default=5000, help="environment steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="hyperparameters to replace")
    args = parser.parse_args()

    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    callback = BudgetedEvaluation(eval_env, args.budget, args.eval_every, args.eval_episodes, stop_at=args.stop_at)
    steal = CpuSteal()
    budgeted_learn("fasttd3", args.env, args.seed, args.set, callback)

    results_file = RESULTS_DIR / "entry_variants.json"
    runs = json.loads(results_file.read_text()) if results_file.exists() else []
    runs.append(
        {
            "env": args.env,
            "seed": args.seed,
            "set": args.set,
            "budget": args.budget,
            "stop_at": args.stop_at,
            "cpu_steal_percent": steal.percent(),
            "curve": callback.curve,
            "machine": machine_info(),
        }
    )
    results_file.write_text(json.dumps(runs, indent=1) + "\n")
    print(f"appended to {results_file}", flush=True)


if __name__ == "__main__":
    main()
