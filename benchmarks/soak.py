"""
Soak: a long FastTD3 run on the CPU, checking that nothing grows. Every ``--window`` transitions it records the
process's resident memory, the wall time per vector step and the number of graphs ``torch.compile`` has made.
After the warm-up (the replay buffer's first fill, whose pages the OS maps as they are written, and the first
compilations) memory should be flat, step time stable and the graph count constant; the summary gives the
slope of resident memory over the transitions after the warm-up (least squares) and the step time of the first
and last windows after it.

    python -m benchmarks.soak                                    # 1M transitions, buffer of 200k
    python -m benchmarks.soak --transitions 20000 --buffer-size 4000 --window 2000   # a quick run

Writes ``benchmarks/results/soak.{json,md}``.
"""

import argparse
import os
import time
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.callbacks import BaseCallback

from benchmarks.common import BoxEnv, CpuSteal, machine_info, write_results
from sb3_fasttd3 import FastTD3

MB = 2**20


def resident_mb() -> float:
    """This process's resident memory (``/proc/self/statm``), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB


def compiled_graphs() -> int:
    """Graphs ``torch.compile`` has made in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


class SoakProbe(BaseCallback):
    """
    Record memory, step time and compiled graphs every ``window`` transitions.

    :param window: transitions (over all envs) between records
    """

    def __init__(self, window: int):
        super().__init__()
        self.window = window
        self.records: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        self.next_record, self.last_time, self.last_steps = self.window, time.perf_counter(), self.num_timesteps

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_record:
            now = time.perf_counter()
            vector_steps = (self.num_timesteps - self.last_steps) / self.training_env.num_envs
            self.records.append(
                {
                    "transitions": self.num_timesteps,
                    "resident_mb": resident_mb(),
                    "ms_per_step": 1000.0 * (now - self.last_time) / vector_steps,
                    "compiled_graphs": compiled_graphs(),
                }
            )
            self.next_record += self.window
            self.last_time, self.last_steps = time.perf_counter(), self.num_timesteps
        return True


def summarize(records: list[dict[str, float]], warm_up: int) -> dict[str, Any]:
    """Slope of resident memory, step times and graph counts over the records after ``warm_up`` transitions."""
    after = [record for record in records if record["transitions"] > warm_up]
    if len(after) < 2:
        raise ValueError(f"need at least two records after the warm-up of {warm_up} transitions, got {len(after)}")
    transitions = np.array([record["transitions"] for record in after], dtype=np.float64)
    memory = np.array([record["resident_mb"] for record in after])
    slope = float(np.polyfit(transitions / 1e5, memory, 1)[0])
    return {
        "warm_up_transitions": warm_up,
        "records_after_warm_up": len(after),
        "resident_mb_slope_per_100k_transitions": slope,
        "resident_mb_first": float(memory[0]),
        "resident_mb_last": float(memory[-1]),
        "ms_per_step_first": after[0]["ms_per_step"],
        "ms_per_step_last": after[-1]["ms_per_step"],
        "ms_per_step_median": float(np.median([record["ms_per_step"] for record in after])),
        "compiled_graphs_first": after[0]["compiled_graphs"],
        "compiled_graphs_last": after[-1]["compiled_graphs"],
    }


def markdown(results: dict[str, Any]) -> str:
    summary, settings = results["summary"], results["settings"]
    lines = [
        "# Soak: memory, step time and compiled graphs over a long run",
        "",
        f"FastTD3 on {settings['n_envs']} random 17-dimensional envs (6 actions), {settings['transitions']:,} "
        f"transitions, buffer of {settings['buffer_size']:,}, batch {settings['batch_size']}, compile "
        f"{settings['compile']}. After the warm-up ({summary['warm_up_transitions']:,} transitions):",
        "",
        "| resident memory slope | resident memory first -> last | ms per vector step first / last / median "
        "| compiled graphs first -> last |",
        "|---|---|---|---|",
        f"| {summary['resident_mb_slope_per_100k_transitions']:+.3f} MiB per 100k transitions "
        f"| {summary['resident_mb_first']:.1f} -> {summary['resident_mb_last']:.1f} MiB "
        f"| {summary['ms_per_step_first']:.2f} / {summary['ms_per_step_last']:.2f} / "
        f"{summary['ms_per_step_median']:.2f} | {summary['compiled_graphs_first']} -> "
        f"{summary['compiled_graphs_last']} |",
        "",
        "| transitions | resident MiB | ms per vector step | compiled graphs |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {r['transitions']:,} | {r['resident_mb']:.1f} | {r['ms_per_step']:.2f} | {r['compiled_graphs']} |"
        for r in results["records"]
    ]
    if results.get("cpu_steal_percent") is not None:
        lines += ["", f"CPU steal during the run: {results['cpu_steal_percent']:.1f}%"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--transitions", type=int, default=1_000_000)
    parser.add_argument("--buffer-size", type=int, default=200_000)
    parser.add_argument("--window", type=int, default=50_000, help="transitions between records")
    parser.add_argument("--n-envs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager updates")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    th.manual_seed(args.seed)
    model = FastTD3(
        "MlpPolicy",
        BoxEnv(17, 6, args.n_envs),
        buffer_size=args.buffer_size,
        batch_size=args.batch_size,
        learning_starts=args.batch_size,
        compile=args.compile,
        seed=args.seed,
    )
    probe, steal = SoakProbe(args.window), CpuSteal()
    model.learn(args.transitions, callback=probe)
    # The warm-up: the buffer's first fill plus one window (the first compilations happen in the first updates)
    warm_up = args.buffer_size + args.window
    results = {
        "settings": {
            "transitions": args.transitions,
            "buffer_size": args.buffer_size,
            "window": args.window,
            "n_envs": args.n_envs,
            "batch_size": args.batch_size,
            "compile": args.compile,
        },
        "records": probe.records,
        "summary": summarize(probe.records, warm_up),
        "cpu_steal_percent": steal.percent(),
        "machine": machine_info(),
    }
    write_results("soak", results, markdown(results))


if __name__ == "__main__":
    main()
