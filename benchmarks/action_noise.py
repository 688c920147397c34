"""
What SB3's ``action_noise`` costs against FastTD3's default mixed noise: transitions per second of FastTD3's
rollout loop alone (``gradient_steps=0``, so no update runs; the actor acts from the first step),
with a NumPy ``DummyVecEnv`` and with a ``TorchVecEnv``, where the NumPy noise objects make the loop read the
done flags from the device once per vector step. Both noises are measured in the same process, interleaved.

    python -m benchmarks.action_noise
    python -m benchmarks.action_noise --n-envs 16 --steps 100 --repeats 1   # a quick run

Writes ``benchmarks/results/action_noise.{json,md}``. On a CPU the device read costs next to nothing; on a GPU it
is a synchronization per step (run it there with ``--device cuda``).
"""

import argparse
import time
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.noise import NormalActionNoise

from benchmarks.common import BoxEnv, CpuSteal, machine_info, write_results
from sb3_fasttd3 import FastTD3
from sb3_fasttd3.vec_env.base import TorchStep, TorchVecEnv

OBS_DIM, ACTION_DIM, EPISODE = 17, 6, 1000


class RandomTorchVecEnv(TorchVecEnv):
    """Random observations and rewards on ``device``, episodes of 1000 steps started at staggered times."""

    def __init__(self, num_envs: int, device: str):
        box = spaces.Box(-np.inf, np.inf, (OBS_DIM,), np.float32)
        super().__init__(num_envs, box, spaces.Box(-1.0, 1.0, (ACTION_DIM,), np.float32), device=device)
        self.t = th.arange(num_envs, device=self.device) % EPISODE

    def _reset(self, seed: int | None) -> th.Tensor:
        return th.randn(self.num_envs, OBS_DIM, device=self.device)

    def _step(self, actions: th.Tensor) -> TorchStep:
        self.t += 1
        truncated = self.t >= EPISODE
        self.t = th.where(truncated, 0, self.t)
        obs = th.randn(self.num_envs, OBS_DIM, device=self.device)
        return TorchStep(obs, th.randn(self.num_envs, device=self.device), th.zeros_like(truncated), truncated, obs)


def transitions_per_second(env_kind: str, noise: str, n_envs: int, steps: int, device: str) -> float:
    env = RandomTorchVecEnv(n_envs, device) if env_kind == "TorchVecEnv" else BoxEnv(OBS_DIM, ACTION_DIM, n_envs)
    action_noise = NormalActionNoise(np.zeros(ACTION_DIM), 0.1 * np.ones(ACTION_DIM)) if noise == "action_noise" else None
    total = n_envs * steps
    # The actor acts from the first step; gradient_steps=0: no update runs
    model = FastTD3("MlpPolicy", env, action_noise=action_noise, learning_starts=0, gradient_steps=0, device=device, seed=0)
    model.learn(n_envs * 20)  # warm-up
    start = time.perf_counter()
    model.learn(total, reset_num_timesteps=False)
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n-envs", type=int, default=64)
    parser.add_argument("--steps", type=int, default=1000, help="vector steps per measurement")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    steal, rows = CpuSteal(), []
    for env_kind in ("DummyVecEnv", "TorchVecEnv"):
        speeds: dict[str, list[float]] = {"mixed noise": [], "action_noise": []}
        for _ in range(args.repeats):
            for noise in speeds:  # interleaved
                speeds[noise].append(transitions_per_second(env_kind, noise, args.n_envs, args.steps, args.device))
        row: dict[str, Any] = {"env": env_kind, **{noise: float(np.median(values)) for noise, values in speeds.items()}}
        row["action_noise / mixed noise"] = row["action_noise"] / row["mixed noise"]
        rows.append(row)
        print(row, flush=True)
    results = {
        "settings": vars(args),
        "rows": rows,
        "cpu_steal_percent": steal.percent(),
        "machine": machine_info(),
    }
    lines = [
        "# action_noise against the mixed noise: transitions per second of the rollout loop",
        "",
        f"{args.n_envs} envs, {args.steps} vector steps per measurement, medians of {args.repeats} interleaved runs, "
        f"on {args.device}, no updates.",
        "",
        "| env | mixed noise | action_noise | action_noise / mixed noise |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['env']} | {r['mixed noise']:,.0f} | {r['action_noise']:,.0f} | {r['action_noise / mixed noise']:.3f} |"
        for r in rows
    ]
    write_results("action_noise", results, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
