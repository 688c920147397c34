"""
GPU readiness: one command that runs every GPU path of FastTD3 on the machine at hand and writes one result.

    python -m benchmarks.gpu_check            # on a CUDA machine: the paper's sizes, sized for 8 minutes on one GPU
    python -m benchmarks.gpu_check --quick    # small sizes; on a CPU this is the fallback that CI runs

Sections:

1. tests: the tests marked ``device`` (``pytest -m device``), run on this device through ``FASTTD3_TEST_DEVICE``.
2. updates: two updates (critic, then critic and actor) of eager and compiled FastTD3 in fp32, bf16 and fp16 (fp16
   on CUDA only) at the paper's batch (32,768) and widths (critic 1024-512-256, actor 512-256-128), from the same
   weights, batch and random numbers: how far each variant's parameter change is from the eager fp32 one
   (relative norm of the difference), updates/s, and the update's FLOP/s against this device's measured GEMM peak
   in the same dtype.
3. memory: peak device memory of those updates with the reference's humanoid-sized buffer (1024 envs x 10240
   rows, 376-float observations) in the full and the memory-lean layouts, next to the GPU recipe's estimate
   (``benchmarks/results/replay_memory.md``). On a CPU: the buffer's storage bytes only.
4. distributed: a 2-rank NCCL run of ``benchmarks/distributed_scaling.py``'s worker when two GPUs are present
   (transitions/s, updates/s and communication time per update).
5. playground: a short learning run of ``examples/playground_cheetah_run.py`` when JAX sees a GPU.
6. profile (``--profile`` only): where the compiled bf16 update's device time goes (matrix products, fused
   kernels, the optimizer, copies, the rest; the ten longest kernels) and how busy the device is over the
   update's wall time. It has not completed on a GPU yet: run it there on its own first, with a short timeout.

Writes ``benchmarks/results/gpu_check.{json,md}`` when it finishes; until then (and where it was stopped) the
sections done so far are in ``gpu_check.partial.{json,md}``, and the last complete record is kept.
"""

import argparse
import functools
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch as th
from stable_baselines3.common.logger import configure
from stable_baselines3.common.utils import set_random_seed
from torch._inductor import config as inductor_config
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.common import BoxEnv, machine_info, promote_results, synchronize, write_results
from benchmarks.kernel_profile import profile_lines, profile_update
from benchmarks.replay_memory import MODEL_RESERVE_GB, REFERENCE_ENVS, REFERENCE_ROWS
from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer

ROOT = Path(__file__).resolve().parents[1]
OBS_DIM, ACTION_DIM = 376, 17  # Humanoid-v5's sizes
VARIANTS: dict[str, dict[str, Any]] = {
    "eager fp32": dict(compile=False, amp_dtype=None),
    "compiled fp32": dict(compile=True, amp_dtype=None),
    "eager bf16": dict(compile=False, amp_dtype="bf16"),
    "compiled bf16": dict(compile=True, amp_dtype="bf16"),
    "eager fp16": dict(compile=False, amp_dtype="fp16"),
    "compiled fp16": dict(compile=True, amp_dtype="fp16"),
}
GEMM_DTYPES = {"fp32": th.float32, "bf16": th.bfloat16, "fp16": th.float16}
PARTIAL_NAME = "gpu_check.partial"  # the record of a run in progress or stopped
SKIPPED_TESTS = {"passed": [], "failed": [], "skipped": ["all: --skip-tests"]}
SIZES = {  # batch, critic widths, actor widths, buffer envs and rows
    "paper": dict(batch=32768, critic=[1024, 512, 256], actor=[512, 256, 128], envs=REFERENCE_ENVS, rows=REFERENCE_ROWS),
    "quick": dict(batch=256, critic=[64, 32, 16], actor=[32, 16], envs=16, rows=64),
}


def median_seconds(fn: Callable[[], Any], device: th.device, repeats: int) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call, waiting for the device each time."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def gemm_peak(dtype: th.dtype, device: th.device, size: int, repeats: int) -> float:
    """FLOP/s of a square matrix product in ``dtype`` on ``device``."""
    a, b = th.randn(size, size, device=device).to(dtype), th.randn(size, size, device=device).to(dtype)
    return 2 * size**3 / median_seconds(lambda: a @ b, device, repeats)


def run_device_tests(device: th.device) -> dict[str, Any]:
    """The tests marked ``device``, on ``device``: their outcomes and the names of those that failed."""
    with tempfile.TemporaryDirectory() as folder:
        report = Path(folder) / "report.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "device", f"--junitxml={report}"]
        env = {**os.environ, "FASTTD3_TEST_DEVICE": str(device)}
        subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
        outcomes: dict[str, Any] = {"passed": [], "failed": [], "skipped": [], "messages": {}}
        for case in ET.parse(report).iter("testcase"):
            kinds = {child.tag: child for child in case}
            kind = "failed" if kinds.keys() & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
            name = f"{case.get('classname')}::{case.get('name')}"
            outcomes[kind].append(name)
            if kind == "failed":  # the assertion's message and the end of the traceback: enough to act on
                failure = kinds["failure"] if "failure" in kinds else kinds["error"]
                outcomes["messages"][name] = f"{failure.get('message', '')}\n{(failure.text or '')[-3000:]}"
    return outcomes


def make_model(device: th.device, sizes: dict[str, Any], **kwargs: Any) -> FastTD3:
    """A model at ``sizes`` on ``device``, with a silent logger so that ``train()`` can run before ``learn()``."""
    model = FastTD3(
        "MlpPolicy",
        BoxEnv(OBS_DIM, ACTION_DIM, n_envs=1),
        batch_size=sizes["batch"],
        learning_starts=0,
        policy_kwargs=dict(net_arch=dict(pi=sizes["actor"], qf=sizes["critic"])),
        device=device,
        seed=0,
        **kwargs,
    )
    model.set_logger(configure(None, []))
    return model


def filled_buffer(device: th.device, envs: int, rows: int, lean: bool) -> DeviceNStepReplayBuffer:
    """A buffer of ``envs`` x ``rows`` humanoid-sized transitions on ``device``, allocated and partly written."""
    model_env = BoxEnv(OBS_DIM, ACTION_DIM, n_envs=1)
    buffer = DeviceNStepReplayBuffer(
        envs * rows,
        model_env.observation_space,
        model_env.action_space,
        device=device,
        n_envs=envs,
        optimize_memory_usage=lean,
        n_steps=3,
    )
    generator = th.Generator(device=device).manual_seed(0)
    for step in range(8):
        obs = th.randn(envs, OBS_DIM, device=device, generator=generator)
        next_obs = th.randn(envs, OBS_DIM, device=device, generator=generator)
        actions = th.rand(envs, ACTION_DIM, device=device, generator=generator) * 2 - 1
        rewards = th.randn(envs, device=device, generator=generator)
        dones = th.full((envs,), step % 5 == 4, device=device)
        buffer.add(obs, next_obs, actions, rewards, dones, [{}] * envs)
    return buffer


def update_buffer(device: th.device, batch: int) -> DeviceNStepReplayBuffer:
    """A small full-layout buffer with enough rows for batches of ``batch``: what the update checks sample from."""
    return filled_buffer(device, envs=16, rows=max(64, batch // 8), lean=False)


def update_flops(model: FastTD3, batch: int) -> float:
    """FLOPs of one update (averaged over the actor's delay), counted on the eager path."""
    counter = FlopCounterMode(display=False)
    with counter:
        model.train(gradient_steps=model.policy_delay, batch_size=batch)
    return counter.get_total_flops() / model.policy_delay


def parameter_change(model: FastTD3, before: list[th.Tensor]) -> th.Tensor:
    pairs = zip(model.policy.parameters(), before, strict=True)
    return th.cat([(param.detach() - old).float().flatten() for param, old in pairs])


def failure(error: Exception) -> dict[str, str]:
    """What a check that raised reports in place of its results, so that the other checks still run."""
    message = " ".join(f"{type(error).__name__}: {error}".split()).replace("|", "/")  # one line, fit for a table cell
    return {"error": message[:2000]}


def update_row(device: th.device, sizes: dict[str, Any], repeats: int, kwargs: dict[str, Any], base: dict[str, Any]) -> dict:
    """One variant from the reference's weights: its parameter change against the eager fp32 one, and its speed."""
    batch = sizes["batch"]
    th._dynamo.reset()
    model = make_model(device, sizes, **kwargs)
    model.set_parameters(base["weights"])
    model.replay_buffer = base["buffer"]
    before = [param.detach().clone() for param in model.policy.parameters()]
    with inductor_config.patch(fallback_random=True):  # compiled code draws eager's random numbers
        set_random_seed(0)
        model.train(gradient_steps=2, batch_size=batch)
    change = parameter_change(model, before)
    if kwargs == VARIANTS["eager fp32"]:
        base["change"] = change
    elif "change" not in base:
        raise RuntimeError("no eager fp32 update to compare with: that variant failed")
    relative = float((change - base["change"]).norm() / base["change"].norm())
    seconds = median_seconds(lambda: model.train(gradient_steps=2, batch_size=batch), device, repeats) / 2
    flops, peak = base["flops"], base["peaks"][kwargs["amp_dtype"] or "fp32"]
    return {
        "relative_difference_to_eager_fp32": relative,
        "updates_per_s": 1 / seconds,
        "tflop_per_s": flops / seconds / 1e12,
        "share_of_gemm_peak": flops / seconds / peak,
    }


def check_updates(device: th.device, sizes: dict[str, Any], repeats: int, report: Callable[[dict], None]) -> dict[str, Any]:
    """
    Agreement with the eager fp32 update, updates/s and FLOP/s against the GEMM peak, for each variant; the rows
    so far go to ``report`` after each variant.
    """
    batch = sizes["batch"]
    buffer = update_buffer(device, batch)
    reference = make_model(device, sizes)
    reference.replay_buffer = buffer
    reference.train(gradient_steps=2, batch_size=batch)  # optimizer states exist
    flops = update_flops(reference, batch)
    size = 8192 if device.type == "cuda" else 1024
    peaks = {name: gemm_peak(dtype, device, size, repeats) for name, dtype in GEMM_DTYPES.items()}
    rows: dict[str, Any] = {"gflop_per_update": flops / 1e9, "gemm_peak_tflop_per_s": {k: v / 1e12 for k, v in peaks.items()}}
    base = {"weights": reference.get_parameters(), "buffer": buffer, "flops": flops, "peaks": peaks}
    for name, kwargs in VARIANTS.items():
        if kwargs["amp_dtype"] == "fp16" and device.type != "cuda":
            rows[name] = {"skipped": "fp16 needs CUDA"}
            continue
        try:
            rows[name] = update_row(device, sizes, repeats, kwargs, base)
        except Exception as error:  # a failing variant is a result; the others still run
            rows[name] = failure(error)
        report(rows)
    return rows


def check_memory(device: th.device, sizes: dict[str, Any]) -> list[dict[str, Any]]:
    """Peak device memory of updates at the batch size with the reference's buffer, in either layout."""
    rows = []
    for layout, lean in (("full", False), ("lean", True)):
        gc.collect()  # a model sits in reference cycles: only the collector frees the previous layout's buffer
        if device.type == "cuda":
            th.cuda.empty_cache()
            th.cuda.reset_peak_memory_stats(device)
        row: dict[str, Any] = {"layout": layout, "envs": sizes["envs"], "rows": sizes["rows"]}
        try:
            buffer = filled_buffer(device, sizes["envs"], sizes["rows"], lean)
            model = make_model(device, sizes)
            model.replay_buffer = buffer
            model.train(gradient_steps=4, batch_size=sizes["batch"])
        except th.OutOfMemoryError as error:
            rows.append({**row, "out_of_memory": str(error).split(".")[0]})
            continue
        row["buffer_gb"] = buffer.storage_nbytes() / 1e9
        if device.type == "cuda":
            row["peak_allocated_gb"] = th.cuda.max_memory_allocated(device) / 1e9
            row["peak_reserved_gb"] = th.cuda.max_memory_reserved(device) / 1e9
            row["beyond_the_buffer_gb"] = row["peak_reserved_gb"] - row["buffer_gb"]
            row["recipe_reserve_gb"] = MODEL_RESERVE_GB
        rows.append(row)
        del model, buffer
    return rows


def check_profile(device: th.device, sizes: dict[str, Any]) -> dict[str, Any]:
    """Where the compiled bf16 update's device time goes, at ``sizes``."""
    th._dynamo.reset()
    model = make_model(device, sizes, compile=True, amp_dtype="bf16")
    model.replay_buffer = update_buffer(device, sizes["batch"])
    return {"variant": "compiled bf16", **profile_update(model, sizes["batch"])}


def check_playground(device: th.device, budget_s: int) -> dict[str, Any]:
    """A short CheetahRun run on the GPU when JAX sees one."""
    if importlib.util.find_spec("mujoco_playground") is None:
        return {"skipped": "MuJoCo Playground is not installed (the jax extra)"}
    try:
        import jax

        backend = jax.default_backend()
    except ImportError:
        return {"skipped": "JAX is not installed"}
    if device.type != "cuda" or backend != "gpu":
        return {"skipped": f"needs JAX on a GPU (JAX backend: {backend}, torch device: {device})"}
    command = [sys.executable, "examples/playground_cheetah_run.py", "--device", "cuda", "--timesteps", "100000"]
    try:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=budget_s)
    except subprocess.TimeoutExpired:
        return {"failed": f"did not finish within {budget_s} s"}
    lines = [line for line in result.stdout.splitlines() if "return" in line or "transitions in" in line]
    return {"returncode": result.returncode, "output": lines or result.stderr.splitlines()[-5:]}


def check_distributed(device: th.device) -> dict[str, Any] | str:
    """Two ranks on two GPUs (torchrun, NCCL): what ``benchmarks.distributed_scaling`` measures, at a short length."""
    if device.type != "cuda" or th.cuda.device_count() < 2:
        return "skipped: fewer than two GPUs"
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "rank0.json"
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
        worker = ["-m", "benchmarks.distributed_scaling", "--worker", "--device", "cuda", "--out", str(out)]
        sizes = ["--n-envs", "1024", "--batch-size", "32768", "--width", "1024", "--steps", "50", "--warmup", "10"]
        result = subprocess.run([*torchrun, *worker, *sizes], cwd=ROOT, capture_output=True, text=True, timeout=300)
        if result.returncode != 0:
            return f"failed: {result.stderr[-2000:]}"
        return json.loads(out.read_text())


def tests_lines(tests: dict[str, Any]) -> list[str]:
    failed = f" Failed: {', '.join(tests['failed'])}." if tests["failed"] else ""
    counts = f"{len(tests['passed'])} passed, {len(tests['failed'])} failed, {len(tests['skipped'])} skipped."
    lines = [f"Tests marked `device`: {counts}{failed}"]
    for name, message in tests.get("messages", {}).items():
        lines.append(f"- {name}: {' '.join(message.split())[:300]}")  # the full message is in the JSON
    return lines


def updates_lines(updates: dict[str, Any]) -> list[str]:
    peaks = ", ".join(f"{k} {v:.2f}" for k, v in updates["gemm_peak_tflop_per_s"].items())
    lines = [
        f"Updates: {updates['gflop_per_update']:.2f} GFLOP each; GEMM peak (TFLOP/s): {peaks}",
        "",
        "| variant | relative difference to eager fp32 | updates/s | TFLOP/s | share of the GEMM peak |",
        "|---|---|---|---|---|",
    ]
    for name in VARIANTS:
        row = updates.get(name, {"skipped": "not reached"})
        if "skipped" in row or "error" in row:
            lines.append(f"| {name} | {row.get('error') or 'skipped: ' + row['skipped']} | | | |")
            continue
        lines.append(
            f"| {name} | {row['relative_difference_to_eager_fp32']:.2e} | {row['updates_per_s']:.1f} | "
            f"{row['tflop_per_s']:.3f} | {row['share_of_gemm_peak']:.1%} |"
        )
    return lines


def memory_lines(memory: list[dict[str, Any]]) -> list[str]:
    lines = ["| layout | envs x rows | buffer GB | peak allocated GB | peak reserved GB | beyond the buffer GB |"]
    lines.append("|---|---|---|---|---|---|")
    for row in memory:
        size = f"{row['envs']} x {row['rows']}"
        if "out_of_memory" in row:
            lines.append(f"| {row['layout']} | {size} | {row['out_of_memory']} | | | |")
            continue
        peaks = [f"{row[key]:.2f}" if key in row else "n/a" for key in ("peak_allocated_gb", "peak_reserved_gb")]
        beyond = "n/a"
        if "beyond_the_buffer_gb" in row:
            beyond = f"{row['beyond_the_buffer_gb']:.2f} (recipe: {row['recipe_reserve_gb']:g})"
        lines.append(f"| {row['layout']} | {size} | {row['buffer_gb']:.3f} | {' | '.join(peaks)} | {beyond} |")
    return lines


SECTION_LINES: dict[str, Callable[[Any], list[str]]] = {
    "tests": tests_lines,
    "updates": updates_lines,
    "memory": memory_lines,
    "distributed": lambda value: [f"Distributed: {value}"],
    "playground": lambda value: [f"Playground: {value}"],
    "profile": profile_lines,
}


def markdown(results: dict[str, Any]) -> str:
    """The report: each section's table, or what stopped it (an error, or not reached before the run ended)."""
    lines = [f"# GPU check on {results['device']} ({results['sizes']} sizes, {results['seconds']:.0f} s)"]
    for name, section_lines in SECTION_LINES.items():
        value = results.get(name)
        lines.append("")
        if value is None:
            lines.append(f"{name}: not reached")
        elif isinstance(value, dict) and value.keys() == {"error"}:
            lines.append(f"{name} failed: {value['error']}")
        else:
            lines += section_lines(value)
            if isinstance(value, dict) and "error" in value:
                lines += ["", f"{name} stopped: {value['error']}"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes (what CI runs on a CPU)")
    parser.add_argument("--device", default="auto", help="cuda, cpu or auto (cuda when available)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--skip-tests", action="store_true", help="leave out the tests marked device")
    parser.add_argument("--playground-budget", type=int, default=120, help="seconds for the Playground run")
    parser.add_argument("--profile", action="store_true", help="also profile the compiled bf16 update (section 6)")
    args = parser.parse_args()

    device = th.device("cuda" if args.device == "auto" and th.cuda.is_available() else args.device.replace("auto", "cpu"))
    sizes_name = "quick" if args.quick else "paper"
    sizes = SIZES[sizes_name]
    start = time.perf_counter()
    results: dict[str, Any] = {"device": th.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
    results["sizes"] = sizes_name
    results["machine"] = machine_info()

    def save(name: str, value: Any) -> None:
        results[name] = value
        results["seconds"] = time.perf_counter() - start
        write_results(PARTIAL_NAME, results, markdown(results))

    sections: dict[str, Callable[[], Any]] = {
        "tests": lambda: SKIPPED_TESTS if args.skip_tests else run_device_tests(device),
        "updates": lambda: check_updates(device, sizes, args.repeats, functools.partial(save, "updates")),
        "memory": lambda: check_memory(device, sizes),
        "distributed": lambda: check_distributed(device),
        "playground": lambda: check_playground(device, args.playground_budget),
        "profile": lambda: check_profile(device, sizes) if args.profile else {"skipped": "not asked for (--profile)"},
    }
    for name, check in sections.items():
        print(f"{name}...", flush=True)
        try:
            value = check()
        except Exception as error:  # a failing section is a result (kept beside what it reported); the others run
            value = {**results.get(name, {}), **failure(error)}
        save(name, value)  # after every section, so that a run stopped at a time limit keeps what it measured
    promote_results(PARTIAL_NAME, "gpu_check")


if __name__ == "__main__":
    main()
