"""
Update throughput of FastTD3 (eager/compiled, fp32/bf16) next to the GEMM peak of the same dtype,
SB3 TD3's ``train()`` at the same network and batch sizes, and replay sampling against SB3's buffers.

    python -m benchmarks.update_throughput                       # the full grid (slow on a CPU)
    python -m benchmarks.update_throughput --batch-sizes 8192 --widths 1024 --repeats 3
    python -m benchmarks.update_throughput --sampling-only      # replaces the sampling section only
    python -m benchmarks.update_throughput --rewrite-markdown   # the summary again, from the JSON results

Writes ``benchmarks/results/update_throughput.{json,md}``. Timings are medians over ``--repeats``
repetitions; ratios are taken between variants measured in the same run.
"""

import argparse
import functools
import json
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3 import TD3
from stable_baselines3.common.buffers import NStepReplayBuffer, ReplayBuffer
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import RESULTS_DIR, BoxEnv, CpuSteal, machine_info, matrix_product_share, write_results
from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.row_sampling import numpy_indices, sample_rows

VARIANTS = {
    "eager fp32": dict(compile=False, amp_dtype=None),
    "compiled fp32": dict(compile=True, amp_dtype=None),
    "eager bf16": dict(compile=False, amp_dtype="bf16"),
    "compiled bf16": dict(compile=True, amp_dtype="bf16"),
}
OBS_DIM, ACTION_DIM = 17, 6  # HalfCheetah's sizes


def median_time(fn: Callable[[], Any], repeats: int, inner: int) -> float:
    """Median over ``repeats`` of the mean time of ``inner`` calls (after one warm-up call)."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - start) / inner)
    return float(np.median(times))


def gemm_peak(dtype: th.dtype, repeats: int, size: int = 4096) -> float:
    """FLOP/s of a square matrix product in ``dtype``."""
    a, b = th.randn(size, size, dtype=dtype), th.randn(size, size, dtype=dtype)
    return 2 * size**3 / median_time(lambda: a @ b, repeats, inner=3)


def critic_net_arch(width: int) -> list[int]:
    return [width, width // 2, width // 4]


def filled_model(batch_size: int, width: int, algo: type[FastTD3] | type[TD3] = FastTD3, **kwargs) -> Any:
    """A model with a filled replay buffer, ready for ``train()`` (the same networks for FastTD3 and TD3)."""
    model = algo(
        "MlpPolicy",
        BoxEnv(OBS_DIM, ACTION_DIM, n_envs=64),
        batch_size=batch_size,
        learning_starts=0,
        policy_kwargs=dict(net_arch=dict(pi=[512, 256, 128], qf=critic_net_arch(width))),
        **kwargs,
    )
    model.learn(64 * 16)
    return model


def update_flops(batch_size: int, width: int) -> float:
    """Floating point operations of one update (averaged over the actor's delay), counted on the eager path."""
    model = filled_model(batch_size, width)
    counter = FlopCounterMode(display=False)
    with counter:
        model.train(gradient_steps=model.policy_delay, batch_size=batch_size)
    return counter.get_total_flops() / model.policy_delay


def matmul_time_share(model: FastTD3, batch_size: int) -> float:
    """
    The share of an update's time spent in matrix products (torch.profiler, CPU time of the operators). The
    update's FLOPs (counted by ``FlopCounterMode``) are all matrix products', so dividing the update's FLOP/s by
    this share gives the FLOP/s of its matrix products.
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model.train(gradient_steps=model.policy_delay, batch_size=batch_size)
    return matrix_product_share({event.key: event.self_cpu_time_total for event in prof.key_averages()})


def bench_updates(batch_size: int, width: int, repeats: int) -> dict[str, Any]:
    flops = update_flops(batch_size, width)
    row: dict[str, Any] = {"batch_size": batch_size, "critic": critic_net_arch(width), "gflop_per_update": flops / 1e9}
    for name, kwargs in VARIANTS.items():
        # Each model compiles its own functions: start from a clean dynamo cache so that earlier models'
        # graphs do not use up the recompilation limit (which would silently fall back to eager)
        th._dynamo.reset()
        model = filled_model(batch_size, width, **kwargs)
        model.train(gradient_steps=4, batch_size=batch_size)  # compile and warm up both update kinds
        seconds = median_time(lambda model=model: model.train(gradient_steps=2, batch_size=batch_size), repeats, 1) / 2
        row[name] = {"updates_per_s": 1 / seconds, "gflop_per_s": flops / seconds / 1e9}
        if name == "compiled bf16":
            row[name]["matmul_time_share"] = matmul_time_share(model, batch_size)
    td3 = filled_model(batch_size, width, algo=TD3)
    seconds = median_time(lambda: td3.train(gradient_steps=2, batch_size=batch_size), repeats, 1) / 2
    row["sb3 td3 eager fp32"] = {"updates_per_s": 1 / seconds}
    return row


def bench_sampling(batch_size: int, repeats: int, n_steps: int = 3) -> dict[str, Any]:
    """Transitions sampled per second from 1M stored transitions (64 envs)."""
    obs_space = spaces.Box(-1, 1, (OBS_DIM,), np.float32)
    action_space = spaces.Box(-1, 1, (ACTION_DIM,), np.float32)
    n_envs, rows = 64, 1_000_000 // 64
    buffers = {
        "ours (n-step)": DeviceNStepReplayBuffer(rows * n_envs, obs_space, action_space, "cpu", n_envs, n_steps=n_steps),
        "sb3 ReplayBuffer": ReplayBuffer(rows * n_envs, obs_space, action_space, "cpu", n_envs),
        "sb3 NStepReplayBuffer": NStepReplayBuffer(rows * n_envs, obs_space, action_space, "cpu", n_envs, n_steps=n_steps),
    }
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(n_envs, OBS_DIM)).astype(np.float32)
    action = rng.uniform(-1, 1, size=(n_envs, ACTION_DIM)).astype(np.float32)
    reward, done = rng.normal(size=n_envs).astype(np.float32), rng.random((rows, n_envs)) < 0.001
    infos = [{} for _ in range(n_envs)]
    for buffer in buffers.values():
        for row in range(rows):
            buffer.add(obs, obs, action, reward, done[row], infos)
    # Where our time goes, against the plain path (no C compiler): NumPy draws the indices, index_select gathers
    ours = buffers["ours (n-step)"]
    table = ours._table.flatten(0, 1)
    calls: dict[str, Callable[[], Any]] = {name: functools.partial(buf.sample, batch_size) for name, buf in buffers.items()}
    calls["ours: draw and gather"] = lambda: sample_rows(table, len(table), batch_size)
    calls["plain: draw"] = lambda: numpy_indices(len(table), batch_size)
    calls["plain: draw and index_select"] = lambda: table.index_select(0, numpy_indices(len(table), batch_size))
    # Interleaved (one call of each per round, in a new random order each round): the machine's slow spells hit
    # every buffer alike, and no call always runs after the same one (which measurably favours some calls)
    seconds: dict[str, list[float]] = {name: [] for name in calls}
    names = list(calls)
    for _ in range(repeats):
        for name in rng.permutation(names):
            seconds[name].append(median_time(calls[name], 1, inner=3))
    result: dict[str, Any] = {"batch_size": batch_size, "stored": rows * n_envs, "n_steps": n_steps, "rounds": repeats}
    for name in buffers:
        result[name] = {"transitions_per_s": batch_size / float(np.median(seconds[name]))}
    ratios = np.array(seconds["sb3 NStepReplayBuffer"]) / np.array(seconds["ours (n-step)"])
    result["ours / sb3 NStepReplayBuffer"] = float(np.median(ratios))
    plain_ratios = np.array(seconds["sb3 NStepReplayBuffer"]) / np.array(seconds["plain: draw and index_select"])
    result["plain / sb3 NStepReplayBuffer"] = float(np.median(plain_ratios))
    for name in ("ours: draw and gather", "plain: draw", "plain: draw and index_select"):
        result[f"{name}: ms"] = 1e3 * float(np.median(seconds[name]))
    result["ours: bytes per row"] = table.shape[1] * table.element_size()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1024, 8192, 32768])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 512, 1024], help="first critic layer width")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--sampling-batch", type=int, default=32768)
    parser.add_argument("--sampling-rounds", type=int, default=21, help="interleaved rounds of the sampling benchmark")
    parser.add_argument(
        "--sampling-only",
        action="store_true",
        help="measure sampling only, keeping the update grid of the existing results file (the sampling section "
        "then records its own command and commit)",
    )
    parser.add_argument("--rewrite-markdown", action="store_true", help="only re-render the Markdown from the JSON")
    args = parser.parse_args()
    if args.rewrite_markdown:
        results = json.loads((RESULTS_DIR / "update_throughput.json").read_text())
        write_results("update_throughput", results, markdown(results))
        return
    if args.sampling_only:
        results = json.loads((RESULTS_DIR / "update_throughput.json").read_text())
        results["sampling"] = bench_sampling(args.sampling_batch, args.sampling_rounds)
        results["sampling"]["machine"] = machine_info()
        print(results["sampling"], flush=True)
        write_results("update_throughput", results, markdown(results))
        return

    steal = CpuSteal()
    results: dict[str, Any] = {
        "machine": machine_info(),
        "gemm_peak_gflop_per_s": {
            "fp32": gemm_peak(th.float32, args.repeats) / 1e9,
            "bf16": gemm_peak(th.bfloat16, args.repeats) / 1e9,
        },
        "updates": [],
    }
    # Sampling first, in a fresh process: large allocations made after the compiled models measured slower
    results["sampling"] = bench_sampling(args.sampling_batch, args.sampling_rounds)
    print(results["sampling"], flush=True)
    for batch_size in args.batch_sizes:
        for width in args.widths:
            row = bench_updates(batch_size, width, args.repeats)
            eager = row["eager fp32"]["updates_per_s"]
            row["compiled bf16 / eager fp32"] = row["compiled bf16"]["updates_per_s"] / eager
            row["compiled bf16 / bf16 GEMM peak"] = (
                row["compiled bf16"]["gflop_per_s"] / results["gemm_peak_gflop_per_s"]["bf16"]
            )
            results["updates"].append(row)
            print(row, flush=True)
    results["machine"]["cpu_steal_percent"] = steal.percent()
    write_results("update_throughput", results, markdown(results))


def markdown(results: dict[str, Any]) -> str:
    peak = results["gemm_peak_gflop_per_s"]
    lines = [
        "# Update throughput",
        "",
        f"GEMM peak in the same run: fp32 {peak['fp32']:.0f} GFLOP/s, bf16 {peak['bf16']:.0f} GFLOP/s.",
        "",
        "| batch | critic | GFLOP/update | "
        + " | ".join(f"{name} (upd/s, GFLOP/s)" for name in VARIANTS)
        + " | SB3 TD3 (upd/s) | compiled bf16 / eager fp32 | compiled bf16 / bf16 peak |",
        "|" + " --- |" * (len(VARIANTS) + 6),
    ]
    for row in results["updates"]:
        cells = [str(row["batch_size"]), "-".join(map(str, row["critic"])), f"{row['gflop_per_update']:.2f}"]
        cells += [f"{row[name]['updates_per_s']:.2f}, {row[name]['gflop_per_s']:.0f}" for name in VARIANTS]
        cells += [f"{row['sb3 td3 eager fp32']['updates_per_s']:.2f}", f"{row['compiled bf16 / eager fp32']:.2f}x"]
        cells += [f"{row['compiled bf16 / bf16 GEMM peak']:.0%}"]
        lines.append("| " + " | ".join(cells) + " |")
    sampling = results["sampling"]
    lines += [
        "",
        f"## Replay sampling (batch {sampling['batch_size']}, {sampling['stored']} stored, n_steps={sampling['n_steps']})",
        "",
        "| buffer | transitions/s |",
        "| --- | --- |",
    ]
    for name in ("ours (n-step)", "sb3 ReplayBuffer", "sb3 NStepReplayBuffer"):
        lines.append(f"| {name} | {sampling[name]['transitions_per_s']:.3g} |")
    lines.append(
        f"\nOurs / SB3 NStepReplayBuffer: {sampling['ours / sb3 NStepReplayBuffer']:.1f}x "
        f"(median of the ratios of {sampling.get('rounds', 'several')} interleaved rounds)"
    )
    if "machine" in sampling:
        lines.append(f"\nMeasured apart from the grid: `{sampling['machine']['command']}` at {sampling['machine']['commit']}.")
    if "ours: draw and gather: ms" in sampling:
        names = ("ours: draw and gather", "plain: draw", "plain: draw and index_select")
        ours, draw, plain = (sampling[f"{name}: ms"] for name in names)
        lines.append(
            f"\nOurs per batch, in the same rounds: {ours:.2f} ms for the C kernel that draws "
            f"the indices and gathers the rows ({sampling['ours: bytes per row']} bytes each), prefetching them "
            f"(`sb3_fasttd3/common/row_sampling.py`); the plain path used without a C compiler took {plain:.2f} ms: "
            f"{draw:.2f} ms for NumPy to draw the indices, {plain - draw:.2f} ms for `index_select` to gather the rows "
            f"({sampling['plain / sb3 NStepReplayBuffer']:.1f}x SB3's NStepReplayBuffer, the row gather alone)."
        )
    return "\n".join(lines + target_lines(results)) + "\n"


# Issue 5's targets: the update at batch 8192 with a 1024-512-256 critic, sampling at batch 32,768
TARGET_BATCH, TARGET_CRITIC, TARGET_SPEEDUP, TARGET_PEAK_SHARE, TARGET_SAMPLING = 8192, [1024, 512, 256], 3.0, 0.5, 20.0
SAMPLING_PAIR = ("ours (n-step)", "sb3 NStepReplayBuffer")


def speedup_limit_lines(peak: dict[str, float], row: dict[str, Any]) -> list[str]:
    """What bounds the compiled bf16 speed-up over eager fp32, from the GEMM peaks and the update's profile."""
    if peak["bf16"] < peak["fp32"]:
        return [
            f"  Limit: the bf16 GEMM peak of this CPU is {peak['bf16']:.0f} GFLOP/s against {peak['fp32']:.0f} in "
            "fp32 (same run): without AVX512-BF16 or AMX (see cpu_flags), bf16 products go through fp32 arithmetic "
            f"and conversions. Even at the bf16 peak an update would run at {peak['bf16'] / peak['fp32']:.2f}x its "
            "fp32 speed at peak."
        ]
    eager, compiled = row["eager fp32"]["gflop_per_s"], row["compiled bf16"]
    lines = [
        f"  Limit: the bf16 GEMM peak is {peak['bf16'] / peak['fp32']:.2f}x the fp32 one ({peak['bf16']:.0f} against "
        f"{peak['fp32']:.0f} GFLOP/s, same run), and eager fp32 already runs this update at {eager:.0f} GFLOP/s "
        f"({eager / peak['fp32']:.0%} of its peak): an update made of nothing but matrix products at the bf16 peak "
        f"would be {peak['bf16'] / eager:.2f}x eager fp32."
    ]
    if "matmul_time_share" in compiled:
        share = compiled["matmul_time_share"]
        matmul_rate = compiled["gflop_per_s"] / share
        lines.append(
            f"  Profile of the compiled bf16 update (torch.profiler): {share:.0%} of its time in matrix products, which "
            f"run at {matmul_rate:.0f} GFLOP/s ({matmul_rate / peak['bf16']:.0%} of the bf16 peak); the rest is the "
            "fused element-wise kernels, casts, the projection and the optimizer."
        )
    return lines


def target_lines(results: dict[str, Any]) -> list[str]:
    """The targets, what this run measured against each, and what limits the ones not met."""
    lines = ["", "## Targets", ""]
    peak = results["gemm_peak_gflop_per_s"]
    row = next((r for r in results["updates"] if r["batch_size"] == TARGET_BATCH and r["critic"] == TARGET_CRITIC), None)
    if row is None:
        lines.append(f"- Update targets: batch {TARGET_BATCH}, critic {TARGET_CRITIC} not in this run's grid.")
    else:
        speedup, share = row["compiled bf16 / eager fp32"], row["compiled bf16 / bf16 GEMM peak"]
        met = "met" if speedup >= TARGET_SPEEDUP else f"not met, {speedup / TARGET_SPEEDUP:.0%} of the target"
        critic = "-".join(map(str, TARGET_CRITIC))
        lines.append(
            f"- Compiled bf16 update >= {TARGET_SPEEDUP:g}x eager fp32 (batch {TARGET_BATCH}, critic {critic}): "
            f"{speedup:.2f}x ({met})."
        )
        if speedup < TARGET_SPEEDUP:
            lines += speedup_limit_lines(peak, row)
        met = "met" if share >= TARGET_PEAK_SHARE else "not met"
        lines.append(f"- Compiled bf16 update >= {TARGET_PEAK_SHARE:.0%} of the bf16 GEMM peak: {share:.0%} ({met}).")
    sampling = results["sampling"]
    ratio = sampling["ours / sb3 NStepReplayBuffer"]
    met = "met" if ratio >= TARGET_SAMPLING else f"not met, {ratio / TARGET_SAMPLING:.0%} of the target"
    lines.append(f"- Replay sampling >= {TARGET_SAMPLING:g}x SB3's NStepReplayBuffer: {ratio:.1f}x ({met}).")
    if ratio < TARGET_SAMPLING and "ours: draw and gather: ms" in sampling:
        total, sb3 = (sampling["batch_size"] / sampling[name]["transitions_per_s"] * 1e3 for name in SAMPLING_PAIR)
        lines.append(
            f"  Limit: of our {total:.2f} ms per batch, {sampling['ours: draw and gather: ms']:.2f} ms is the draw and "
            f"gather of random rows from the table, bound by memory latency (see the breakdown above). SB3's buffer took "
            f"{sb3:.1f} ms per batch: {TARGET_SAMPLING:g}x needs {sb3 / TARGET_SAMPLING:.2f} ms."
        )
    return lines


if __name__ == "__main__":
    main()
