"""
Environment steps per second through our vector envs against the bare backend they wrap, with random actions
(drawn beforehand, the same for both):

- MuJoCo Playground: ``PlaygroundVecEnv`` (torch actions in, DLPack both ways, our auto-reset) against the
  task's own ``jax.jit(jax.vmap(env.step))`` fed with JAX actions (no auto-reset at all);
- envpool: ``EnvpoolVecEnv`` (torch tensors, the extra reset step hidden) against ``pool.step`` with NumPy;
- Gymnasium MuJoCo through SB3's ``DummyVecEnv``, the CPU baseline (nothing of ours to compare with).

    python -m benchmarks.env_throughput                                   # 1, 64 and 1024 envs
    python -m benchmarks.env_throughput --backends playground --num-envs 64 1024 --repeats 5
    python -m benchmarks.env_throughput --playground-tasks CartpoleBalance CheetahRun

Writes ``benchmarks/results/env_throughput.{json,md}``: medians over ``--repeats`` runs of ``--seconds`` each,
and the ratio ours / bare measured in the same run (the overhead target is at most 20%).
"""

import argparse
import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch as th

from benchmarks.common import machine_info, write_results

# backend -> default tasks, and the largest number of envs worth running on a 2-core CPU
TASKS = {"playground": ["CheetahRun"], "envpool": ["HalfCheetah-v5"], "gymnasium": ["HalfCheetah-v5"]}
MAX_ENVS = {"gymnasium": 64}


def steps_per_second(steps: dict[str, Callable[[], Any]], num_envs: int, seconds: float, repeats: int) -> dict[str, Any]:
    """
    Env steps per second of each ``steps`` function (``num_envs`` per call), after warm-up calls: medians over
    ``repeats`` rounds of ``seconds`` each, the functions taking turns within a round so that a slow spell of the
    machine hits them alike, and the median over rounds of the ratio ours / bare.
    """
    for step in steps.values():
        for _ in range(3):
            step()
    rates: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds:
                step()
                calls += 1
            rates[name].append(calls * num_envs / (time.perf_counter() - start))
    result: dict[str, Any] = {name: float(np.median(values)) for name, values in rates.items()}
    if "ours" in rates:
        result["ours_over_bare"] = float(np.median(np.array(rates["ours"]) / np.array(rates["bare"])))
    return result


def drawn_actions(
    num_envs: int, action_dim: int, to_jax: Callable[[np.ndarray], Any] | None = None, count: int = 16
) -> tuple[Iterator[Any], Iterator[th.Tensor]]:
    """
    ``count`` batches of uniform random actions in [-1, 1], drawn beforehand so that neither side pays for
    its random numbers, cycled through: as NumPy arrays (or JAX arrays with ``to_jax``) for the bare backend,
    as torch tensors (the same values) for ours.
    """
    batches = np.random.default_rng(0).uniform(-1.0, 1.0, (count, num_envs, action_dim)).astype(np.float32)
    bare = [to_jax(batch) if to_jax else batch for batch in batches]
    return itertools.cycle(bare), itertools.cycle([th.from_numpy(batch) for batch in batches])


def playground_steps(task: str, num_envs: int) -> dict[str, Callable[[], Any]]:
    import jax

    from sb3_fasttd3.vec_env.playground import PlaygroundVecEnv

    ours = PlaygroundVecEnv(task, num_envs, device="cpu")
    ours.reset()
    raw = ours.env
    step = jax.jit(jax.vmap(raw.step))
    state = jax.jit(jax.vmap(raw.reset))(jax.random.split(jax.random.PRNGKey(0), num_envs))
    bare_actions, our_actions = drawn_actions(num_envs, raw.action_size, to_jax=jax.device_put)
    box = {"state": state}

    def bare() -> None:
        box["state"] = step(box["state"], next(bare_actions))
        box["state"].obs.block_until_ready()

    def wrapped() -> None:
        ours.step(next(our_actions))

    return {"bare": bare, "ours": wrapped}


def envpool_steps(task: str, num_envs: int) -> dict[str, Callable[[], Any]]:
    import envpool

    from sb3_fasttd3.vec_env.envpool import EnvpoolVecEnv

    pool = envpool.make(task, env_type="gymnasium", num_envs=num_envs, seed=0)
    pool.reset()
    ours = EnvpoolVecEnv(task, num_envs=num_envs, seed=0)
    ours.reset()
    bare_actions, our_actions = drawn_actions(num_envs, pool.action_space.shape[0])

    def bare() -> None:
        pool.step(next(bare_actions))

    def wrapped() -> None:
        ours.step(next(our_actions))

    return {"bare": bare, "ours": wrapped}


def gymnasium_steps(task: str, num_envs: int) -> dict[str, Callable[[], Any]]:
    from stable_baselines3.common.env_util import make_vec_env

    env = make_vec_env(task, n_envs=num_envs, seed=0)
    env.reset()
    return {"bare": lambda: env.step(np.stack([env.action_space.sample() for _ in range(num_envs)]))}


BACKENDS = {"playground": playground_steps, "envpool": envpool_steps, "gymnasium": gymnasium_steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backends", nargs="+", choices=list(BACKENDS), default=list(BACKENDS))
    parser.add_argument("--num-envs", type=int, nargs="+", default=[1, 64, 1024])
    parser.add_argument("--seconds", type=float, default=2.0, help="length of one timed run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--playground-tasks", nargs="+", default=TASKS["playground"], help="Playground registry names")
    args = parser.parse_args()
    tasks = {**TASKS, "playground": args.playground_tasks}

    rows = []
    runs = [(backend, task, n) for backend in args.backends for task in tasks[backend] for n in args.num_envs]
    for backend, task, num_envs in runs:
        if num_envs > MAX_ENVS.get(backend, num_envs):
            continue
        try:
            steps = BACKENDS[backend](task, num_envs)
        except ImportError as error:
            print(f"{backend}: skipped ({error})")
            continue
        rates = steps_per_second(steps, num_envs, args.seconds, args.repeats)
        row = {"backend": backend, "task": task, "num_envs": num_envs, **rates}
        print(row, flush=True)
        rows.append(row)

    lines = [
        "# Environment throughput (env steps/s, random actions)",
        "",
        f"Medians of {args.repeats} rounds of {args.seconds:g} s, bare and ours taking turns in each round; "
        "ours / bare is the median of the per-round ratios.",
        "",
        "| backend | task | envs | bare | ours | ours / bare |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        ours = f"{row['ours']:,.0f}" if "ours" in row else "-"
        ratio = f"{row['ours_over_bare']:.2f}" if "ours_over_bare" in row else "-"
        lines.append(f"| {row['backend']} | {row['task']} | {row['num_envs']} | {row['bare']:,.0f} | {ours} | {ratio} |")
    write_results("env_throughput", {"machine": machine_info(), "rows": rows}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
