"""
Memory and sampling speed of the replay buffer's two layouts (``optimize_memory_usage=False`` and ``True``):
bytes per stored transition measured from the storage the buffer allocated (every tensor, the final-observation
store and huge-page padding included), after filling the ring and wrapping around it, for a HalfCheetah-sized
observation (17 floats, 6 actions), a humanoid-sized one (376 floats, 17 actions) and an 84x84x3 uint8 image;
against the lean layout's target, 1.1x what a transition needs (observation and action at their stored dtypes,
plus three float32 scalars: n-step return, discount and terminal flag); sampling speed of both layouts on the CPU
at batch 256 and 32,768 (medians of interleaved rounds, in one process); and, from the measured bytes, how many
transitions fit on a 24 GB and an 80 GB GPU.

    python -m benchmarks.replay_memory
    python -m benchmarks.replay_memory --scale 0.01 --rounds 1    # a quick run at 1% of the sizes

Writes ``benchmarks/results/replay_memory.{json,md}``.
"""

import argparse
import time
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces

from benchmarks.common import CpuSteal, machine_info, write_results
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer

LAYOUTS = {"full": False, "lean": True}
# name: observation shape and dtype, action dimension, envs, rows per env (at --scale 1)
CONFIGS: dict[str, dict[str, Any]] = {
    "HalfCheetah-sized": dict(shape=(17,), dtype=np.float32, action_dim=6, n_envs=64, rows=16384),
    "humanoid-sized": dict(shape=(376,), dtype=np.float32, action_dim=17, n_envs=64, rows=2048),
    "84x84x3 image": dict(shape=(84, 84, 3), dtype=np.uint8, action_dim=6, n_envs=4, rows=2048),
}
SAMPLING_CONFIG = "HalfCheetah-sized"
TARGET = 1.1
N_STEPS = 3
GB = 1e9
# What the GPU recipe sets aside for everything but the buffer, at batch 32,768 with the reference's networks
# (critic 1024-512-256, 101 atoms; actor 512-256-128): weights, gradients and AdamW states of the actor, the two
# critics and the target critic (about 0.1 GB at a humanoid's sizes), the activations of the critic's and the
# actor's updates and the gathered samples of two updates (about 2 GB in fp32), and the CUDA context and the
# caching allocator's slack (about 1.5 GB)
MODEL_RESERVE_GB = 4.0
REFERENCE_ENVS, REFERENCE_ROWS = 1024, 10240  # FastTD3's MuJoCo Playground defaults: num_envs, buffer_size per env


def needed_bytes(config: dict[str, Any]) -> int:
    """Bytes a transition needs: observation and action at their stored dtypes, and three float32 scalars."""
    obs_bytes = int(np.prod(config["shape"])) * np.dtype(config["dtype"]).itemsize
    return obs_bytes + 4 * config["action_dim"] + 3 * 4


def observation_space(config: dict[str, Any]) -> spaces.Box:
    if config["dtype"] == np.uint8:
        return spaces.Box(0, 255, config["shape"], np.uint8)
    return spaces.Box(-np.inf, np.inf, config["shape"], np.float32)


def filled_buffer(config: dict[str, Any], lean: bool, scale: float, episode_length: int) -> DeviceNStepReplayBuffer:
    """
    A buffer filled with a quarter more vector steps than its rows (the ring wraps around), episodes of
    ``episode_length`` steps ending at staggered steps in each env (truncated), consistent observations (an env's
    next observation is its next step's observation), drawn from a pool of random observations.
    """
    n_envs, rows = config["n_envs"], max(N_STEPS + 1, round(config["rows"] * scale))
    space = observation_space(config)
    buffer = DeviceNStepReplayBuffer(
        rows * n_envs, space, spaces.Box(-1, 1, (config["action_dim"],), np.float32), "cpu", n_envs, lean, n_steps=N_STEPS
    )
    rng = np.random.default_rng(0)
    pool_size = 64
    if config["dtype"] == np.uint8:
        pool = rng.integers(0, 256, (pool_size, n_envs, *config["shape"]), dtype=np.uint8)
    else:
        pool = rng.normal(size=(pool_size, n_envs, *config["shape"])).astype(np.float32)
    actions = rng.uniform(-1, 1, (n_envs, config["action_dim"])).astype(np.float32)
    rewards = rng.normal(size=n_envs).astype(np.float32)
    offsets = np.arange(n_envs) * episode_length // n_envs
    infos = [{} for _ in range(n_envs)]
    for step in range(rows + rows // 4):
        done = (step + offsets) % episode_length == episode_length - 1
        obs, next_obs = pool[step % pool_size], pool[(step + 1) % pool_size]
        buffer.add(obs, next_obs, actions, rewards, done, infos, truncated=done)
    return buffer


def measure_bytes(scale: float, episode_lengths: list[int]) -> list[dict[str, Any]]:
    rows = []
    for name, config in CONFIGS.items():
        for episode_length in episode_lengths:
            row: dict[str, Any] = {"config": name, "episode_length": episode_length, "needed": needed_bytes(config)}
            for layout, lean in LAYOUTS.items():
                buffer = filled_buffer(config, lean, scale, episode_length)
                row[layout] = buffer.storage_nbytes() / buffer.n_transitions
                row["transitions"] = buffer.n_transitions
                del buffer
            row["lean / needed"] = row["lean"] / row["needed"]
            row["full / needed"] = row["full"] / row["needed"]
            row["lean / full"] = row["lean"] / row["full"]
            rows.append(row)
            print(row, flush=True)
    return rows


def measure_sampling(scale: float, batch_sizes: list[int], rounds: int) -> dict[str, Any]:
    """Transitions per second of ``sample`` in both layouts, fresh indices each call, interleaved rounds."""
    config = CONFIGS[SAMPLING_CONFIG]
    buffers = {layout: filled_buffer(config, lean, scale, episode_length=1000) for layout, lean in LAYOUTS.items()}
    result: dict[str, Any] = {"config": SAMPLING_CONFIG, "transitions": buffers["full"].n_transitions, "rows": []}
    rng = np.random.default_rng(0)
    for batch_size in batch_sizes:
        for buffer in buffers.values():
            buffer.sample(batch_size)  # warm-up
        start = time.perf_counter()
        buffers["full"].sample(batch_size)
        calls = max(1, round(0.2 / (time.perf_counter() - start)))
        seconds: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for _ in range(rounds):
            for layout in rng.permutation(list(LAYOUTS)):
                start = time.perf_counter()
                for _ in range(calls):
                    buffers[layout].sample(batch_size)
                seconds[layout].append((time.perf_counter() - start) / calls)
        row: dict[str, Any] = {"batch_size": batch_size}
        for layout in LAYOUTS:
            row[layout] = {"transitions_per_s": batch_size / float(np.median(seconds[layout]))}
        row["lean / full"] = float(np.median(np.array(seconds["full"]) / np.array(seconds["lean"])))
        result["rows"].append(row)
        print(row, flush=True)
    return result


def gpu_recipe(bytes_rows: list[dict[str, Any]], long_episodes: int) -> list[dict[str, Any]]:
    """Transitions that fit beside the model on 24 GB and 80 GB cards, for each state size and layout."""
    recipe = []
    for row in bytes_rows:
        if row["episode_length"] != long_episodes or row["config"] not in ("HalfCheetah-sized", "humanoid-sized"):
            continue
        for card in (24, 80):
            for layout in LAYOUTS:
                transitions = int((card - MODEL_RESERVE_GB) * GB / row[layout])
                reference_gb = REFERENCE_ENVS * REFERENCE_ROWS * row[layout] / GB + MODEL_RESERVE_GB
                recipe.append(
                    {
                        "card_gb": card,
                        "config": row["config"],
                        "layout": layout,
                        "bytes_per_transition": row[layout],
                        "transitions": transitions,
                        "rows_per_env_at_1024_envs": transitions // 1024,
                        "rows_per_env_at_4096_envs": transitions // 4096,
                        "reference_defaults_gb": reference_gb,
                    }
                )
    return recipe


def markdown(results: dict[str, Any]) -> str:
    scale = results["scale"]
    lines = [
        "# Replay memory: full and lean layouts",
        "",
        f"Bytes per stored transition, measured from the storage the buffer allocated (n_steps={N_STEPS}, "
        f"episodes truncated every `episode_length` steps, the ring filled and wrapped; sizes at scale {scale}). "
        "`needed`: observation and action at their stored dtypes plus three float32 scalars (n-step return, "
        f"discount, terminal). The lean layout's target is {TARGET}x needed, for long episodes.",
        "",
        "| observation | episode length | transitions | needed | full | lean | full / needed | lean / needed | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["bytes"]:
        met = "met" if row["lean / needed"] <= TARGET else "not met"
        lines.append(
            f"| {row['config']} | {row['episode_length']} | {row['transitions']:,} | {row['needed']} | {row['full']:.1f} "
            f"| {row['lean']:.1f} | {row['full / needed']:.3f}x | {row['lean / needed']:.3f}x | "
            f"{met if row['episode_length'] == results['long_episodes'] else 'n/a'} |"
        )
    sampling = results["sampling"]
    lines += [
        "",
        f"Sampling on the CPU ({sampling['config']}, {sampling['transitions']:,} transitions stored, n-step "
        f"windows of {N_STEPS}), transitions per second, medians of {results['rounds']} interleaved rounds in one "
        "process (the lean layout gathers each next observation in a second pass); measured on a shared machine:",
        "",
        "| batch | full | lean | lean / full |",
        "| --- | --- | --- | --- |",
    ]
    for row in sampling["rows"]:
        lines.append(
            f"| {row['batch_size']:,} | {row['full']['transitions_per_s']:,.0f} | "
            f"{row['lean']['transitions_per_s']:,.0f} | {row['lean / full']:.2f}x |"
        )
    lines += [
        "",
        "## GPU recipe",
        "",
        f"From the bytes per transition measured above (episodes of {results['long_episodes']} steps), with "
        f"{MODEL_RESERVE_GB:g} GB set aside for everything else at batch 32,768 with the reference's networks "
        "(weights, gradients and AdamW states, about 0.1 GB; activations and gathered samples, about 2 GB in fp32; "
        "CUDA context and allocator slack, about 1.5 GB). `buffer_size` counts transitions over all envs: "
        "`buffer_size = n_envs * rows per env`. The reference's MuJoCo Playground defaults store "
        f"{REFERENCE_ENVS} envs x {REFERENCE_ROWS} rows = {REFERENCE_ENVS * REFERENCE_ROWS:,} transitions.",
        "",
        "| card | observation | layout | bytes / transition | transitions that fit | rows per env at 1024 envs "
        "| at 4096 envs | reference defaults need | fit? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["gpu_recipe"]:
        fits = "yes" if row["reference_defaults_gb"] <= row["card_gb"] else "no"
        lines.append(
            f"| {row['card_gb']} GB | {row['config']} | {row['layout']} | {row['bytes_per_transition']:.0f} | "
            f"{row['transitions']:,} | {row['rows_per_env_at_1024_envs']:,} | {row['rows_per_env_at_4096_envs']:,} | "
            f"{row['reference_defaults_gb']:.1f} GB | {fits} |"
        )
    lines += [
        "",
        "So, at batch 32,768: pass `optimize_memory_usage=True` and "
        "`buffer_size=n_envs * rows`, with rows per env at most the column of the card and env count above "
        "(e.g. 1024 envs x 10240 rows of a humanoid-sized observation fit a 24 GB card only in the lean layout).",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the rows per env of every buffer")
    parser.add_argument("--episode-lengths", type=int, nargs="+", default=[1000, 50])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 32768])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds of the sampling benchmark")
    args = parser.parse_args()
    steal = CpuSteal()
    th.manual_seed(0)
    np.random.seed(0)
    results: dict[str, Any] = {
        "machine": machine_info(),
        "scale": args.scale,
        "rounds": args.rounds,
        "long_episodes": max(args.episode_lengths),
        "n_steps": N_STEPS,
        "model_reserve_gb": MODEL_RESERVE_GB,
    }
    results["bytes"] = measure_bytes(args.scale, args.episode_lengths)
    results["sampling"] = measure_sampling(args.scale, args.batch_sizes, args.rounds)
    results["gpu_recipe"] = gpu_recipe(results["bytes"], results["long_episodes"])
    results["machine"]["cpu_steal_percent"] = steal.percent()
    write_results("replay_memory", results, markdown(results))


if __name__ == "__main__":
    main()
