"""
Data-parallel FastTD3: one process per GPU (or per CPU core), each with its own envs and replay buffer.

    torchrun --nproc_per_node=2 examples/distributed.py --env HalfCheetah-v5 --timesteps 200000
    torchrun --nnodes=2 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=HOST:29400 examples/distributed.py

Run without torchrun, it trains in one process. Every rank runs this script; FastTD3 joins the process group
that torchrun announces (NCCL on GPUs, gloo on CPUs), and only rank 0 logs and saves.
"""

import argparse
import os

from stable_baselines3.common.env_util import make_vec_env

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.hyperparams import load_hyperparams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--timesteps", type=int, default=200_000, help="transitions over all ranks")
    parser.add_argument("--save-path", default="fasttd3_distributed")
    args = parser.parse_args()

    hyperparams, n_envs = load_hyperparams(args.env)  # n_envs and batch_size are per rank
    rank = int(os.environ.get("RANK", "0"))
    # The same seed on every rank: FastTD3 offsets it by the rank (envs, noise, sampling)
    model = FastTD3(env=make_vec_env(args.env, n_envs=n_envs), seed=0, verbose=1 if rank == 0 else 0, **hyperparams)
    model.learn(total_timesteps=args.timesteps, log_interval=8)
    model.save(args.save_path)  # rank 0 writes it; a plain FastTD3 model that loads in one process


if __name__ == "__main__":
    main()
