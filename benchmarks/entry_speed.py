"""
How fast FastTD3's RL Zoo entry trains, for variants of it: transitions per second in ``learn()`` (acting,
stepping the envs, storing, updating) and milliseconds per update (``train()`` alone), measured in one
process in interleaved rounds, each round in a new random order, so that the machine's slow spells hit
every variant alike. Each variant is a set of ``key=value`` replacements of the entry (as ``tune_entry``
takes them); the first is the reference of the ratios. Then, per variant, where the time goes: the updates'
share of ``learn()``, and a profile of the update by kind of operator (matrix products, compiled graphs...).

    python -m benchmarks.entry_speed                                 # the HalfCheetah entry in fp32 and in bf16
    python -m benchmarks.entry_speed --variants "compile=false" "compile=true"
    python -m benchmarks.entry_speed --variants amp_dtype=auto n_envs=8 --output entry_speed_envs

Writes ``benchmarks/results/entry_speed.{json,md}`` (``--output``: another name).
"""

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import MATRIX_PRODUCTS, CpuSteal, machine_info, parse_overrides, write_results
from benchmarks.time_to_return import make_model
from sb3_fasttd3 import FastTD3

# Where an update's time goes: groups of profiler events (self CPU time); the rest is autograd, dispatch,
# eager element-wise operators and sampling
UPDATE_TIME_GROUPS: dict[str, Callable[[str], bool]] = {
    "matrix products": lambda key: key in MATRIX_PRODUCTS,
    "compiled graphs (inductor's kernels and wrappers)": lambda key: key.startswith("## Call CompiledFxGraph"),
    "dtype casts": lambda key: key in ("aten::copy_", "aten::_to_copy"),
    "optimizer": lambda key: key.startswith("Optimizer.") or "adam" in key.lower(),
}


def seconds_per_transition(model: FastTD3, transitions: int) -> float:
    """Wall-clock of ``learn(transitions)`` continuing the model's training, per transition."""
    start = time.perf_counter()
    model.learn(transitions, reset_num_timesteps=False)
    return (time.perf_counter() - start) / transitions


def updates_per_transition(model: FastTD3, transitions: int) -> float:
    """How many updates ``learn()`` makes per transition collected (counted over ``transitions``)."""
    updates = model._n_updates
    model.learn(transitions, reset_num_timesteps=False)
    return (model._n_updates - updates) / transitions


def update_time_shares(model: FastTD3, updates: int) -> dict[str, float]:
    """The share of each of :data:`UPDATE_TIME_GROUPS` in the operators' CPU time of ``updates`` updates."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train(gradient_steps=updates, batch_size=model.batch_size)
    times = {event.key: event.self_cpu_time_total for event in prof.key_averages()}
    total = sum(times.values())
    shares = {name: sum(t for key, t in times.items() if belongs(key)) / total for name, belongs in UPDATE_TIME_GROUPS.items()}
    return {**shares, "the rest": 1.0 - sum(shares.values())}


def seconds_per_update(model: FastTD3, updates: int) -> float:
    """Wall-clock of ``train(updates)`` on the model's replay buffer, per update."""
    start = time.perf_counter()
    model.train(gradient_steps=updates, batch_size=model.batch_size)
    return (time.perf_counter() - start) / updates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--variants", nargs="+", default=["amp_dtype=null", "amp_dtype=bf16"], metavar="'K=V ...'")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--transitions", type=int, default=2000, help="learn() transitions per round and variant")
    parser.add_argument("--updates", type=int, default=100, help="train() updates per round and variant")
    parser.add_argument("--warmup", type=int, default=2000, help="transitions trained before timing (compiles)")
    parser.add_argument("--output", default="entry_speed", help="results name in benchmarks/results/")
    args = parser.parse_args()

    steal = CpuSteal()
    models = {}
    for variant in args.variants:
        model = make_model("fasttd3", args.env, seed=0, overrides=parse_overrides(variant.split()))
        model.learn(model.learning_starts + args.warmup)
        models[variant] = model
    timings: dict[str, dict[str, list[float]]] = {v: {"transition": [], "update": []} for v in args.variants}
    rng = np.random.default_rng(0)
    for round_ in range(args.rounds):
        for variant in rng.permutation(args.variants):
            timings[variant]["transition"].append(seconds_per_transition(models[variant], args.transitions))
            timings[variant]["update"].append(seconds_per_update(models[variant], args.updates))
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    reference = timings[args.variants[0]]
    rows = []
    for variant in args.variants:
        timing, model = timings[variant], models[variant]
        transitions_per_s, ms_per_update = 1 / float(np.median(timing["transition"])), 1e3 * float(np.median(timing["update"]))
        # The time of learn() spent updating, from the two medians
        update_share = ms_per_update / 1e3 * updates_per_transition(model, args.transitions) * transitions_per_s
        rows.append(
            {
                "variant": variant,
                "autocast_dtype": str(model.autocast_dtype),
                "transitions_per_s": transitions_per_s,
                "ms_per_update": ms_per_update,
                "update_share_of_learn": update_share,
                "update_time_shares": update_time_shares(model, args.updates),
                # Per round, then the median: a slow spell inflates both sides of a round's ratio
                "speedup_transitions": float(np.median(np.array(reference["transition"]) / timing["transition"])),
                "speedup_updates": float(np.median(np.array(reference["update"]) / timing["update"])),
                "seconds": timing,
            }
        )
    results = {"env": args.env, "rows": rows, "cpu_steal_percent": steal.percent(), "machine": machine_info()}
    lines = [
        f"# Speed of the {args.env} entry's variants",
        "",
        f"Medians of {args.rounds} interleaved rounds ({args.transitions} transitions of `learn()` and "
        f"{args.updates} updates of `train()` per round and variant), after {args.warmup} trained transitions; "
        f"speed-ups are per-round ratios to `{args.variants[0]}`. CPU steal {steal.percent():.1f}%.",
        "",
        "| variant | autocast dtype | transitions/s | speed-up | ms per update | speed-up |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(
            f"| `{row['variant']}` | {row['autocast_dtype']} | {row['transitions_per_s']:.0f} | "
            f"{row['speedup_transitions']:.2f}x | {row['ms_per_update']:.2f} | {row['speedup_updates']:.2f}x |"
        )
    write_results(args.output, results, "\n".join(lines + time_share_lines(rows, args.updates)) + "\n")


def time_share_lines(rows: list[dict[str, Any]], updates: int) -> list[str]:
    """Where the time goes: the updates' share of ``learn()``, and the groups' shares of an update."""
    groups = list(rows[0]["update_time_shares"])
    lines = [
        "",
        "## Where the time goes",
        "",
        "The updates' share of `learn()` (ms per update x updates per transition x transitions/s), and the share of "
        f"each kind of operator in the CPU time of {updates} profiled updates (torch.profiler, self time):",
        "",
        "| variant | updates in `learn()` | " + " | ".join(groups) + " |",
        "| --- | --- |" + " --- |" * len(groups),
    ]
    for row in rows:
        shares = " | ".join(f"{row['update_time_shares'][group]:.0%}" for group in groups)
        lines.append(f"| `{row['variant']}` | {row['update_share_of_learn']:.0%} | {shares} |")
    return lines


if __name__ == "__main__":
    main()
