"""
Data-parallel runs for tests/test_distributed.py, launched with torchrun (gloo, CPU)::

    python -m torch.distributed.run --standalone --nproc_per_node=2 tests/distributed_run.py SCENARIO OUT_DIR

``train``: learn, stop from a callback on rank 0, save, resume a one-process model, and update halves of a batch;
each rank writes what it saw to ``OUT_DIR/rank{r}.pt`` for the test to check. ``compiled``: the same checks with
``compile=True`` and bf16. ``crash``: rank 1's env raises. ``disagree``: ranks that differ in hyperparameters and
in what they learned before.
"""

import os
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import torch as th
import torch.distributed as dist
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.logger import configure
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor

from sb3_fasttd3 import FastTD3
from tests.test_fasttd3 import TINY

KWARGS = dict(TINY, learning_starts=40, buffer_size=1000, gradient_steps=2, device="cpu", seed=0)
N_ENVS = 2


class CheckedFastTD3(FastTD3):
    """FastTD3 that compares its parameters with the other ranks' after every update and records its observations."""

    def _update(self, replay_data, update_actor: bool) -> None:
        super()._update(replay_data, update_actor)
        flat = th.cat([tensor.reshape(-1).float() for tensor in self.policy.state_dict().values()])
        gathered = [th.empty_like(flat) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, flat)
        self.update_checks = getattr(self, "update_checks", 0) + 1
        self.max_rank_difference = max(getattr(self, "max_rank_difference", 0.0), (gathered[0] - gathered[1]).abs().max())

    def _exploration_actions(self, obs, learning_starts):
        self.seen_observations = [*getattr(self, "seen_observations", []), obs.clone()]
        return super()._exploration_actions(obs, learning_starts)


class BatchNormExtractor(BaseFeaturesExtractor):
    """Features through a BatchNorm layer, whose running statistics each rank updates from its own batches."""

    def __init__(self, observation_space: gym.spaces.Box):
        super().__init__(observation_space, features_dim=8)
        self.net = th.nn.Sequential(th.nn.Linear(observation_space.shape[0], 8), th.nn.BatchNorm1d(8), th.nn.ReLU())

    def forward(self, observations: th.Tensor) -> th.Tensor:
        return self.net(observations)


class StopAt(BaseCallback):
    """Stops training after ``n_calls`` vector steps (it only runs on rank 0)."""

    def __init__(self, n_calls: int):
        super().__init__()
        self.stop_at = n_calls

    def _on_step(self) -> bool:
        return self.n_calls < self.stop_at


class FailingEnv(gym.Wrapper):
    def __init__(self, env: gym.Env, fail_at: int):
        super().__init__(env)
        self.fail_at, self.steps = fail_at, 0

    def step(self, action):
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("the simulator diverged")
        return self.env.step(action)


def halves_update(out: Path) -> dict:
    """One update, each rank on its half of a batch both ranks draw alike (compared with a whole-batch update)."""
    model = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), target_policy_noise=0.0, **KWARGS)
    model.learn(0)  # joins the ranks: rank 0's weights everywhere
    batch = th.load(out / "batch.pt", weights_only=False)
    half = batch.observations.shape[0] // 2
    rank = dist.get_rank()
    model._update(type(batch)(*(value[rank * half : (rank + 1) * half] for value in batch)), update_actor=True)
    return {key: value.clone() for key, value in model.policy.state_dict().items()}


def train(out: Path) -> None:
    rank = int(os.environ["RANK"])  # the process group is joined by the first model
    env = make_vec_env("Pendulum-v1", n_envs=N_ENVS)
    model = CheckedFastTD3("MlpPolicy", env, **KWARGS)
    model.set_logger(configure(str(out / f"log{rank}"), ["csv"]))
    model.learn(1000, log_interval=1)  # Pendulum's episodes end at the 200th vector step: a dump on rank 0
    first_timesteps = model.num_timesteps
    model.learn(200, callback=StopAt(7), reset_num_timesteps=False)
    stopped_timesteps = model.num_timesteps
    model.save(out / "model.zip")
    normalizer = model.policy.obs_normalizer
    resumed = CheckedFastTD3.load(
        out / "single.zip", env=make_vec_env("Pendulum-v1", n_envs=N_ENVS), device="cpu", amp_dtype="bf16"
    )
    resumed.learn(80, reset_num_timesteps=False)
    batch_norm_kwargs = dict(net_arch=[8], features_extractor_class=BatchNormExtractor)
    batch_norm = CheckedFastTD3(
        "MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), **{**KWARGS, "policy_kwargs": batch_norm_kwargs}
    )
    batch_norm.learn(120)
    results = dict(
        first_timesteps=first_timesteps,
        stopped_timesteps=stopped_timesteps,
        stored=model.replay_buffer.n_transitions,
        update_checks=model.update_checks,
        max_rank_difference=float(model.max_rank_difference),
        observations=th.cat(model.seen_observations).numpy(),
        normalizer=(float(normalizer.count), normalizer.mean.clone(), normalizer.var.clone()),
        output_formats=len(model.logger.output_formats),
        resumed_timesteps=resumed.num_timesteps,
        resumed_checks=resumed.update_checks,
        resumed_difference=float(resumed.max_rank_difference),
        halves=halves_update(out),
        batch_norm_checks=batch_norm.update_checks,
        batch_norm_difference=float(batch_norm.max_rank_difference),
    )
    th.save(results, out / f"rank{rank}.pt")


def compiled(out: Path) -> None:
    """Compiled updates and acting in bf16 keep the ranks identical."""
    model = CheckedFastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), compile=True, amp_dtype="bf16", **KWARGS)
    model.learn(300)
    results = dict(update_checks=model.update_checks, max_rank_difference=float(model.max_rank_difference))
    th.save(results, out / f"compiled{dist.get_rank()}.pt")


def crash(out: Path) -> None:
    fail_at = 30 if os.environ["RANK"] == "1" else -1
    env = make_vec_env("Pendulum-v1", n_envs=N_ENVS, wrapper_class=FailingEnv, wrapper_kwargs=dict(fail_at=fail_at))
    FastTD3("MlpPolicy", env, **KWARGS).learn(10_000)


def disagree(out: Path) -> None:
    """Rank 1 has another batch size and number of updates, then rank 0 has learned alone before: each rank's errors."""
    rank = int(os.environ["RANK"])
    first = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), **{**KWARGS, "batch_size": 16 * (1 + rank)})
    first.gradient_steps += rank
    second = FastTD3("MlpPolicy", make_vec_env("Pendulum-v1", n_envs=N_ENVS), **KWARGS)
    if rank == 0:  # then it has counted timesteps and updates, and holds optimizer states, which rank 1 lacks
        data_parallel, second._data_parallel = second._data_parallel, None
        second.learn(60)
        second._data_parallel = data_parallel
    errors = []
    for model in (first, second):
        try:
            model.learn(60, reset_num_timesteps=False)
        except ValueError as error:
            errors.append(str(error))
    (out / f"disagree{rank}.txt").write_text("\n".join(errors))


if __name__ == "__main__":
    th.set_num_threads(1)
    np.set_printoptions(precision=4)
    scenario, out_dir = sys.argv[1], Path(sys.argv[2])
    {"train": train, "compiled": compiled, "crash": crash, "disagree": disagree}[scenario](out_dir)
    if dist.is_initialized():
        dist.destroy_process_group()
