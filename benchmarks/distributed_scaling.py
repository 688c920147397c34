"""
Data-parallel scaling: transitions/s and updates/s of FastTD3 on 1 and 2 ranks, and the time each update spends
communicating (the gradient all-reduces) and each vector step (the normalizer merge and the stop flag); and the
critic update with FastTD3's flattened all-reduce against ``DistributedDataParallel``.

    python -m benchmarks.distributed_scaling                 # CPU: gloo, one core per rank
    python -m benchmarks.distributed_scaling --device cuda   # one GPU per rank: NCCL

Each rank steps ``--n-envs`` envs of a synthetic task (Humanoid's sizes) and updates on ``--batch-size``
transitions per rank, so that 2 ranks collect twice the transitions per vector step and average two batches.
Rank counts are launched with torchrun one after the other, ``--repeats`` times each, interleaved; medians are
reported. Writes ``benchmarks/results/distributed_scaling.{json,md}``.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch as th
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from benchmarks.common import BoxEnv, machine_info, synchronize, write_results
from sb3_fasttd3 import FastTD3

ROOT = Path(__file__).resolve().parents[1]
OBS_DIM, ACTION_DIM = 376, 17


class Timed:
    """Wraps a DataParallel method, adding its wall-clock time (on CUDA, after a sync) into ``seconds``."""

    def __init__(self, method: Any, device: th.device):
        self.method, self.device, self.seconds, self.calls = method, device, 0.0, 0

    def __call__(self, *args: Any) -> Any:
        synchronize(self.device)
        start = time.perf_counter()
        result = self.method(*args)
        synchronize(self.device)
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return result


def worker(args: argparse.Namespace) -> None:
    """One rank: warm up, then time ``--steps`` vector steps of learning; rank 0 writes the figures."""
    rank = int(os.environ.get("RANK", "0"))
    if args.pin and hasattr(os, "sched_setaffinity") and rank < (os.cpu_count() or 1):
        os.sched_setaffinity(0, {rank})
    th.set_num_threads(1 if args.device == "cpu" else th.get_num_threads())
    width = args.width
    model = FastTD3(
        "MlpPolicy",
        BoxEnv(OBS_DIM, ACTION_DIM, args.n_envs),
        learning_starts=0,
        batch_size=args.batch_size,
        gradient_steps=args.gradient_steps,
        policy_kwargs=dict(net_arch=dict(pi=[width, width], qf=[width, width])),
        device=args.device,
        seed=0,
    )
    data_parallel = model._data_parallel
    timers: dict[str, Timed] = {}
    if data_parallel is not None:
        for name in ("average_gradients_", "merge_moments", "all_true"):
            timers[name] = Timed(getattr(data_parallel, name), model.device)
            setattr(data_parallel, name, timers[name])
    model.learn(args.n_envs * (1 if data_parallel is None else data_parallel.world_size) * args.warmup)
    for timer in timers.values():
        timer.seconds, timer.calls = 0.0, 0
    updates_before, steps_before = model._n_updates, model.num_timesteps
    start = time.perf_counter()
    model.learn(model._transitions_per_step * args.steps, reset_num_timesteps=False)
    synchronize(model.device)
    seconds = time.perf_counter() - start
    updates = model._n_updates - updates_before
    critic = sum(p.numel() for p in model.critic.parameters() if p.requires_grad)
    actor = sum(p.numel() for p in model.actor.parameters() if p.requires_grad)
    gradients = timers.get("average_gradients_")
    per_step = [timers[name] for name in ("merge_moments", "all_true") if name in timers]
    result = dict(
        ranks=1 if data_parallel is None else data_parallel.world_size,
        transitions_per_s=(model.num_timesteps - steps_before) / seconds,
        updates_per_s=updates / seconds,
        communication_ms_per_update=0.0 if gradients is None else 1e3 * gradients.seconds / updates,
        communication_ms_per_vector_step=1e3 * sum(t.seconds for t in per_step) / args.steps,
        all_reduce_mb_per_update=4 * (critic + actor / model.policy_delay) / 1e6,
    )
    if data_parallel is not None and args.compare_ddp:  # after the figures above: it runs more all-reduces
        result.update(compare_ddp(model, rounds=5, updates=20))
    if rank == 0:
        Path(args.out).write_text(json.dumps(result))
    if dist.is_initialized():
        dist.destroy_process_group()


def compare_ddp(model: FastTD3, rounds: int, updates: int) -> dict[str, float]:
    """
    Milliseconds per critic update with the flattened all-reduce after the backward (what FastTD3 does) and with the
    critic wrapped in ``DistributedDataParallel`` (bucketed all-reduces overlapping the backward), interleaved.
    """
    data_parallel, critic, optimizer = model._data_parallel, model.critic, model.critic.optimizer
    ddp = DistributedDataParallel(critic)
    batch = model.replay_buffer.sample(model.batch_size)
    variants = {"flattened all-reduce": (data_parallel, critic), "DistributedDataParallel": (None, ddp)}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, (averaging, module) in variants.items():
            model._data_parallel, model.critic = averaging, module  # type: ignore[assignment]
            start = time.perf_counter()
            for _ in range(updates):
                loss, _ = model._critic_loss(batch)
                model._optimize(optimizer, loss, model._critic_params)
            synchronize(model.device)
            times[name].append(1e3 * (time.perf_counter() - start) / updates)
    model._data_parallel, model.critic = data_parallel, critic
    dist.barrier()  # no rank leaves while another still runs DDP's collectives
    return {f"{name} ms per critic update": statistics.median(values) for name, values in times.items()}


def launch(ranks: int, args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Run :func:`worker` on ``ranks`` processes (torchrun for 2 and more) and read rank 0's figures."""
    worker_args = ["-m", "benchmarks.distributed_scaling", "--worker", "--out", str(out), *args.worker_args]
    if ranks > 1:
        worker_args = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", *worker_args]
    env = {**os.environ, "OMP_NUM_THREADS": "1" if args.device == "cpu" else os.environ.get("OMP_NUM_THREADS", "")}
    subprocess.run([sys.executable, *worker_args], cwd=ROOT, env=env, check=True, timeout=1800)
    return json.loads(out.read_text())


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# Data-parallel scaling ({results['device']}, {results['n_envs']} envs and batch {results['batch_size']} "
        f"per rank, widths {results['width']})",
        "",
        f"Medians of {results['repeats']} interleaved runs; the gradient all-reduce moves "
        f"{results['rows'][0]['all_reduce_mb_per_update']:.2f} MB per update.",
        "",
        "| ranks | transitions/s | updates/s | speed-up (transitions) | communication ms per update "
        "| communication ms per vector step |",
        "|---|---|---|---|---|---|",
    ]
    ddp = [f"{key}: {value:.2f}" for key, value in results["rows"][-1].items() if key.endswith("per critic update")]
    base = results["rows"][0]["transitions_per_s"]
    for row in results["rows"]:
        lines.append(
            f"| {row['ranks']} | {row['transitions_per_s']:.0f} | {row['updates_per_s']:.1f} | "
            f"{row['transitions_per_s'] / base:.2f}x | {row['communication_ms_per_update']:.3f} | "
            f"{row['communication_ms_per_vector_step']:.3f} |"
        )
    if ddp:
        lines += ["", f"Critic update on {results['rows'][-1]['ranks']} ranks (medians of 5 x 20): " + "; ".join(ddp)]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--gradient-steps", type=int, default=2)
    parser.add_argument("--steps", type=int, default=200, help="timed vector steps per run")
    parser.add_argument("--warmup", type=int, default=20, help="vector steps before the timing")
    parser.add_argument("--no-ddp", dest="compare_ddp", action="store_false", help="skip the DDP comparison")
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="do not pin rank r to core r")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    args.worker_args = [
        *("--device", args.device, "--n-envs", str(args.n_envs), "--batch-size", str(args.batch_size)),
        *("--width", str(args.width), "--gradient-steps", str(args.gradient_steps)),
        *("--steps", str(args.steps), "--warmup", str(args.warmup)),
        *([] if args.pin else ["--no-pin"]),
        *([] if args.compare_ddp else ["--no-ddp"]),
    ]
    runs: dict[int, list[dict[str, Any]]] = {ranks: [] for ranks in args.ranks}
    with tempfile.TemporaryDirectory() as folder:
        for repeat in range(args.repeats):
            for ranks in args.ranks:
                runs[ranks].append(launch(ranks, args, Path(folder) / f"{ranks}_{repeat}.json"))
    rows = [{key: statistics.median(run[key] for run in runs[ranks]) for key in runs[ranks][0]} for ranks in args.ranks]
    results = dict(
        device=args.device,
        n_envs=args.n_envs,
        batch_size=args.batch_size,
        width=args.width,
        repeats=args.repeats,
        rows=rows,
        runs={str(ranks): value for ranks, value in runs.items()},
        machine=machine_info(),
    )
    write_results("distributed_scaling", results, markdown(results))


if __name__ == "__main__":
    main()
