"""
Why ``compile=True`` leaves the actor's loss eager on a CPU: updates per second with the actor's loss compiled
(as the critic's) against eager, in one process, in interleaved rounds; and inductor's CPU code for a ReLU mask
(a bool tensor), which a compiled actor loss with a detached critic would save for its backward.

    python -m benchmarks.actor_loss_compile
    python -m benchmarks.actor_loss_compile --sizes 8192:1024:bf16 --rounds 9

Writes ``benchmarks/results/actor_loss_compile.{json,md}``.
"""

import argparse
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th

from benchmarks.common import CpuSteal, machine_info, write_results
from benchmarks.update_throughput import critic_net_arch, filled_model, median_time
from sb3_fasttd3.fasttd3.fasttd3 import _compile_for_this_model

VARIANTS = ("actor loss compiled", "actor loss eager")
RATIO = "eager / compiled"  # updates per second, median of the rounds' ratios


def bench_update(batch_size: int, width: int, amp_dtype: str | None, rounds: int) -> dict[str, Any]:
    """Updates per second of both variants, timing ``train(2)`` calls (a critic-only and a critic+actor update)."""
    models = {}
    for name in VARIANTS:
        th._dynamo.reset()
        model = filled_model(batch_size, width, compile=True, amp_dtype=amp_dtype)
        if name == "actor loss compiled":
            model._actor_loss_fn = _compile_for_this_model(model._actor_loss, None)
        model.train(gradient_steps=4, batch_size=batch_size)  # compile and warm up
        models[name] = model
    # Each measurement runs for ~0.5 s at least: small updates are timed over many train() calls
    start = time.perf_counter()
    models[VARIANTS[0]].train(gradient_steps=2, batch_size=batch_size)
    calls = max(1, round(0.5 / (time.perf_counter() - start)))
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rng = np.random.default_rng(0)
    for _ in range(rounds):
        for name in rng.permutation(VARIANTS):
            start = time.perf_counter()
            for _ in range(calls):
                models[name].train(gradient_steps=2, batch_size=batch_size)
            seconds[name].append((time.perf_counter() - start) / (2 * calls))
    row: dict[str, Any] = {"batch_size": batch_size, "critic": critic_net_arch(width), "amp_dtype": amp_dtype or "fp32"}
    for name in VARIANTS:
        row[name] = {"updates_per_s": 1 / float(np.median(seconds[name]))}
    ratios = np.array(seconds["actor loss compiled"]) / np.array(seconds["actor loss eager"])
    row[RATIO] = float(np.median(ratios))
    return row


def bench_relu_mask(repeats: int, shape: tuple[int, int] = (8192, 1024)) -> dict[str, Any]:
    """Milliseconds of ``relu(x) <= 0`` (a bool tensor) and of ``relu(x)`` alone, eager and compiled."""
    functions: dict[str, Callable[[th.Tensor], Any]] = {"relu": th.relu, "relu mask": lambda x: th.relu(x) <= 0}
    result = {}
    for dtype in (th.float32, th.bfloat16):
        x = th.randn(shape, dtype=dtype)
        for name, fn in functions.items():
            for mode, call in (("eager", fn), ("compiled", th.compile(fn))):
                key = f"{name}, {str(dtype).removeprefix('torch.')}, {mode}"
                result[key] = 1e3 * median_time(lambda call=call, x=x: call(x), repeats, inner=5)
    return {"shape": list(shape), "ms": result}


def markdown(results: dict[str, Any]) -> str:
    lines = [
        "# The actor's loss, compiled or eager, on a CPU",
        "",
        "Compiled, the actor's backward also computes the critic's weight gradients (eager autograd skips them",
        "with `backward(inputs=...)`). Updates per second, medians of interleaved rounds in one process:",
        "",
        "| batch | critic | dtype | " + " | ".join(VARIANTS) + " | eager / compiled |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["updates"]:
        cells = [str(row["batch_size"]), "-".join(map(str, row["critic"])), row["amp_dtype"]]
        cells += [f"{row[name]['updates_per_s']:.3g}" for name in VARIANTS]
        cells.append(f"{row[RATIO]:.3f}x")
        lines.append("| " + " | ".join(cells) + " |")
    mask = results["relu_mask"]
    lines += [
        "",
        "Detaching the critic inside the compiled graph removes those gradients, but inductor then saves each ReLU's",
        f"mask as a bool tensor for the backward. Milliseconds for a {mask['shape'][0]}x{mask['shape'][1]} tensor:",
        "",
        "| operation | eager | compiled |",
        "| --- | --- | --- |",
    ]
    for key in mask["ms"]:
        if key.endswith(", eager"):
            name = key.removesuffix(", eager")
            lines.append(f"| {name} | {mask['ms'][key]:.2f} | {mask['ms'][name + ', compiled']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--sizes",
        nargs="+",
        default=["256:256:fp32", "8192:1024:fp32", "8192:1024:bf16", "32768:1024:bf16"],
        metavar="BATCH:WIDTH:DTYPE",
        help="batch size, first critic layer width and fp32 or bf16",
    )
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    steal = CpuSteal()
    results: dict[str, Any] = {"machine": machine_info(), "updates": [], "relu_mask": bench_relu_mask(args.rounds)}
    print(results["relu_mask"], flush=True)
    for size in args.sizes:
        batch_size, width, dtype = size.split(":")
        row = bench_update(int(batch_size), int(width), None if dtype == "fp32" else dtype, args.rounds)
        results["updates"].append(row)
        print(row, flush=True)
    results["machine"]["cpu_steal_percent"] = steal.percent()
    write_results("actor_loss_compile", results, markdown(results))


if __name__ == "__main__":
    main()
