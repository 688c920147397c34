"""Shared pieces of the benchmarks: a cheap environment, machine facts, result files."""

import fcntl
import json
import os
import platform
import subprocess
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import stable_baselines3
import torch as th
import yaml
from gymnasium import spaces
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.vec_env import VecEnv

# Where results are written and read; BENCHMARK_RESULTS_DIR moves them (the smoke tests write to a temporary folder)
RESULTS_DIR = Path(os.environ.get("BENCHMARK_RESULTS_DIR") or Path(__file__).resolve().parent / "results")
# The profiler's matrix-product operators: the batched critics multiply with the batched (b*) ones
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm")


class RandomBoxEnv(gym.Env):
    """Random observations and rewards, 1000-step episodes: costs next to nothing to step."""

    def __init__(self, obs_dim: int, action_dim: int):
        self.observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (action_dim,), np.float32)
        self.t = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        self.t = 0
        return self.observation_space.sample(), {}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        self.t += 1
        return self.observation_space.sample(), float(self.np_random.normal()), False, self.t >= 1000, {}


def BoxEnv(obs_dim: int, action_dim: int, n_envs: int) -> VecEnv:
    """A DummyVecEnv of :class:`RandomBoxEnv`."""
    return make_vec_env(RandomBoxEnv, n_envs=n_envs, seed=0, env_kwargs=dict(obs_dim=obs_dim, action_dim=action_dim))


def synchronize(device: th.device) -> None:
    """Wait for ``device``'s queued work (CUDA runs asynchronously), so that a host clock covers it."""
    if device.type == "cuda":
        th.cuda.synchronize(device)


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on, and the command that measured them."""
    cpu, flags = platform.processor(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
        cpu = names[0] if names else cpu
        all_flags = next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), [])
        # What decides the bf16 speed: AVX512-BF16 or AMX (without them bf16 GEMMs are emulated)
        flags = sorted(flag for flag in all_flags if flag.startswith(("avx512", "amx")))
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False).stdout
    except OSError:
        commit = ""
    script = Path(sys.argv[0])
    # Run as `python -m benchmarks.<name>`: say so rather than the script's absolute path
    program = [f"-m benchmarks.{script.stem}"] if script.parent == Path(__file__).resolve().parent else [sys.argv[0]]
    return {
        "command": " ".join([Path(sys.executable).name, *program, *sys.argv[1:]]),
        "commit": commit.strip(),
        "cpu": cpu,
        "cpu_flags": flags,
        "cpu_count": os.cpu_count(),
        "torch_threads": th.get_num_threads(),
        "python": platform.python_version(),
        "torch": th.__version__,
        "stable_baselines3": stable_baselines3.__version__,
        "cuda": th.cuda.get_device_name() if th.cuda.is_available() else None,
    }


class CpuSteal:
    """
    The share of the machine's CPU time that the hypervisor gave to other guests ("steal", from ``/proc/stat``)
    since this object was made: on a shared virtual machine, wall-clock results are only comparable between
    runs with similar steal.
    """

    def __init__(self):
        self.start = self._ticks()

    @staticmethod
    def _ticks() -> tuple[int, int] | None:
        """(steal, total) CPU ticks since boot, over all CPUs; None without ``/proc/stat``."""
        stat = Path("/proc/stat")
        if not stat.exists():
            return None
        # user nice system idle iowait irq softirq steal (guest time is already counted in user)
        fields = [int(value) for value in stat.read_text().split("\n", 1)[0].split()[1:9]]
        return (fields[7] if len(fields) == 8 else 0), sum(fields)

    def percent(self) -> float | None:
        """:return: steal as a percentage of all CPU time since the start, None where it cannot be read"""
        now = self._ticks()
        if self.start is None or now is None or now[1] == self.start[1]:
            return None
        return 100.0 * (now[0] - self.start[0]) / (now[1] - self.start[1])


def write_results(name: str, results: dict[str, Any], markdown: str) -> None:
    """
    Write ``results/<name>.json`` and ``results/<name>.md`` (the Markdown ends with the machine facts), each through
    a temporary file renamed over the record, so that a run killed while writing leaves the record whole.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = "\n".join(f"- {key}: {value}" for key, value in results["machine"].items())
    texts = {"json": json.dumps(results, indent=2) + "\n", "md": markdown + "\n## Machine\n\n" + machine + "\n"}
    for suffix, text in texts.items():
        partial = RESULTS_DIR / f"{name}.{suffix}.tmp"
        partial.write_text(text)
        os.replace(partial, RESULTS_DIR / f"{name}.{suffix}")
    print(f"wrote {RESULTS_DIR / name}.json and .md")


def append_to_record(name: str, runs: list[dict[str, Any]], render: Callable[[dict[str, Any]], None]) -> None:
    """
    Append ``runs`` (each with its ``machine``) to ``results/<name>.json`` and ``render`` the record (write it and its
    summary), holding a lock so that commands running side by side append in turn.
    """
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    results_file = RESULTS_DIR / f"{name}.json"
    with open(RESULTS_DIR / f".{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": []}
        results["runs"] += runs
        results["machine"] = runs[-1]["machine"]
        render(results)


def promote_results(partial_name: str, name: str) -> None:
    """Rename the record ``results/<partial_name>.{json,md}`` of a finished run to ``results/<name>.{json,md}``."""
    for suffix in ("json", "md"):
        os.replace(RESULTS_DIR / f"{partial_name}.{suffix}", RESULTS_DIR / f"{name}.{suffix}")
    print(f"wrote {RESULTS_DIR / name}.json and .md")


def matrix_product_share(operator_times: dict[str, float]) -> float:
    """The share of :data:`MATRIX_PRODUCTS` in the CPU time of profiled operators (``{operator: time}``)."""
    return sum(t for key, t in operator_times.items() if key in MATRIX_PRODUCTS) / sum(operator_times.values())


def legend_labels(names: list[str]) -> list[str | None]:
    """Legend labels for one line per run: ``<name>: <n> run(s)`` on the first run of each name, none on the rest."""
    counts, seen, labels = Counter(names), set(), []
    for name in names:
        labels.append(None if name in seen else f"{name}: {counts[name]} run(s)")
        seen.add(name)
    return labels


def run_one_per_core(
    jobs: list[dict[str, Any]], cores: list[int], start: Callable[[dict[str, Any], int], subprocess.Popen]
) -> Iterator[tuple[dict[str, Any], int, int]]:
    """
    Run ``jobs`` as child processes, keeping one busy on each of ``cores``.

    :param jobs: the jobs, in the order they start
    :param cores: the cores to use, one job each at a time
    :param start: starts one job pinned to a core and returns its process
    :return: yields each job with its core and exit status as it ends
    """
    queue, running = list(jobs), {}
    while queue or running:
        for core in cores:
            if core not in running and queue:
                job = queue.pop(0)
                running[core] = (job, start(job, core))
        pid, status = os.wait()
        core = next(core for core, (_, process) in running.items() if process.pid == pid)
        job, _ = running.pop(core)
        yield job, core, os.waitstatus_to_exitcode(status)


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """
    ``key=value`` pairs, each value read as YAML (``8``, ``0.005``, ``true``, ``[256, 256]``); a learning rate may
    also be a schedule, written as in the entries (``LinearSchedule(start, end, end_fraction)``, ``lin_<rate>``).
    """
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"--set takes key=value pairs, got {pair!r}")
        overrides[key] = yaml.safe_load(value)
        if key.endswith("learning_rate") and isinstance(overrides[key], str):
            from sb3_fasttd3.hyperparams import parse_schedule  # only here: the peers' workers never import FastTD3

            overrides[key] = parse_schedule(f"--set {key}", value)
    return overrides
