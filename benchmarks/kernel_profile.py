"""
Where an update's device time goes, from PyTorch's profiler: kernel time by kind (compiled fused kernels, the
optimizer, matrix products, copies, the rest), the longest kernels, and how busy the device is over the wall
time. On a CPU the operators' own time stands in for kernels. Used by ``benchmarks/gpu_check.py --profile``.
"""

import time
from typing import Any

import torch as th

from benchmarks.common import synchronize
from sb3_fasttd3 import FastTD3

PROFILED_UPDATES = 8
KERNEL_KINDS = {  # the first kind whose marks a kernel's name holds, lower-cased
    "fused (compiled)": ("triton", "compiledfxgraph"),
    "optimizer": ("adam", "multi_tensor", "foreach"),  # before "mm": FusedAdamMathFunctor
    "matrix products": ("gemm", "xmma", "cutlass", "nvjet", "mm"),
    "copies": ("memcpy", "memset", "copy"),
}


def kernel_kind(name: str) -> str:
    """The kind of a kernel (or, on a CPU, an operator) from its name."""
    name = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS.items() if any(mark in name for mark in marks)), "other")


def profile_update(model: FastTD3, batch: int) -> dict[str, Any]:
    """
    Device time of ``model``'s update by kind of kernel, its ten longest kernels, and the busy share of the wall
    time, over ``PROFILED_UPDATES`` updates after four that compile (and on CUDA record the graphs).

    :param model: a model with a filled replay buffer and a logger
    :param batch: the batch size of each update
    """
    device = model.device
    model.train(gradient_steps=4, batch_size=batch)
    on_cuda = device.type == "cuda"
    activities = [th.profiler.ProfilerActivity.CUDA if on_cuda else th.profiler.ProfilerActivity.CPU]
    synchronize(device)
    start = time.perf_counter()
    with th.profiler.profile(activities=activities) as profile:
        model.train(gradient_steps=PROFILED_UPDATES, batch_size=batch)
        synchronize(device)
    wall = time.perf_counter() - start
    # On CUDA the kernels; on a CPU the operators' own time (no double counting of nested operators)
    kernels = {
        event.key: (event.self_device_time_total if on_cuda else event.self_cpu_time_total) / 1e3 / PROFILED_UPDATES
        for event in profile.key_averages()
        if (event.device_type == th.autograd.DeviceType.CUDA) == on_cuda
    }
    kernels = {name: ms for name, ms in kernels.items() if ms > 0}
    busy = sum(kernels.values())
    kinds = dict.fromkeys([*KERNEL_KINDS, "other"], 0.0)
    for name, ms in kernels.items():
        kinds[kernel_kind(name)] += ms
    longest = sorted(kernels.items(), key=lambda item: -item[1])[:10]
    return {
        "wall_ms_per_update": wall * 1e3 / PROFILED_UPDATES,
        "busy_ms_per_update": busy,
        "ms_per_update_by_kind": kinds,
        "longest_kernels_ms_per_update": [{"name": name[:120], "ms": ms} for name, ms in longest],
    }


def profile_lines(profile: dict[str, Any]) -> list[str]:
    """The profile as Markdown: a table by kind of kernel, then the longest kernels."""
    if "skipped" in profile:
        return [f"Profile: skipped, {profile['skipped']}"]
    wall, busy = profile["wall_ms_per_update"], profile["busy_ms_per_update"]
    lines = [
        f"Profile of the {profile['variant']} update: {wall:.2f} ms per update, kernels busy {busy:.2f} ms "
        f"({busy / wall:.0%} of it; the profiler adds its own overhead)",
        "",
        "| kind | ms per update | share of kernel time |",
        "|---|---|---|",
    ]
    lines += [f"| {kind} | {ms:.3f} | {ms / busy:.0%} |" for kind, ms in profile["ms_per_update_by_kind"].items()]
    lines += ["", "| longest kernels | ms per update |", "|---|---|"]
    lines += [f"| `{row['name']}` | {row['ms']:.3f} |" for row in profile["longest_kernels_ms_per_update"]]
    return lines
