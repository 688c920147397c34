"""
Every MuJoCo entry of FastTD3's RL Zoo file trained briefly through the Zoo itself, to show that each one runs
(``python -m rl_zoo3.train --algo fasttd3 --env <id> -n <transitions>``), one run per listed core:

    python -m benchmarks.zoo_entries --transitions 20000 --cores 0 1
    python -m benchmarks.zoo_entries --envs Walker2d-v5 Ant-v5 --transitions 2000

Each run's exit status, wall-clock seconds and the mean return of the last episodes of training (the Zoo's
Monitor files) go to ``benchmarks/results/zoo_entries.{json,md}``.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from benchmarks.common import machine_info, run_one_per_core, write_results
from sb3_fasttd3.hyperparams import HYPERPARAMS_FILE

RESULTS_NAME = "zoo_entries"
TUNED = ("HalfCheetah-v5", "Hopper-v5", "Swimmer-v5", "InvertedDoublePendulum-v5")


def untuned_mujoco_ids() -> list[str]:
    """The ``-v5`` ids of the Zoo file other than the tuned ones (the ``-v4`` ids share their entries)."""
    entries = yaml.safe_load(HYPERPARAMS_FILE.read_text())
    return [env_id for env_id in entries if env_id.endswith("-v5") and env_id not in TUNED]


def last_returns(log_dir: Path, episodes: int = 10) -> float | None:
    """The mean return of the last ``episodes`` training episodes in the Monitor files under ``log_dir``."""
    returns: list[tuple[float, float]] = []
    for monitor in log_dir.rglob("*.monitor.csv"):
        rows = np.atleast_2d(np.loadtxt(monitor, delimiter=",", skiprows=2, ndmin=2))
        returns += [(row[2], row[0]) for row in rows]  # (time, return)
    if not returns:
        return None
    return float(np.mean([value for _, value in sorted(returns)[-episodes:]]))


def start(env_id: str, core: int, transitions: int, log_dir: Path) -> subprocess.Popen:
    """The Zoo's training of ``env_id`` on ``core`` with one thread."""
    command = [sys.executable, "-m", "rl_zoo3.train", "--algo", "fasttd3", "--env", env_id, "-n", str(transitions)]
    command += ["-f", str(log_dir), "--eval-freq", "-1", "--seed", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(["taskset", "-c", str(core), *command], env=env, stdout=subprocess.DEVNULL)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--envs", nargs="+", default=untuned_mujoco_ids())
    parser.add_argument("--transitions", type=int, default=20_000)
    parser.add_argument("--cores", type=int, nargs="+", default=[0])
    args = parser.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as logs:
        started: dict[str, float] = {}

        def start_env(job: dict[str, Any], core: int) -> subprocess.Popen:
            print(f"core {core}: {job['env']}", flush=True)
            started[job["env"]] = time.perf_counter()
            return start(job["env"], core, args.transitions, Path(logs) / job["env"])

        for job, _, status in run_one_per_core([{"env": env_id} for env_id in args.envs], args.cores, start_env):
            env_id = job["env"]
            row: dict[str, Any] = {"env": env_id, "transitions": args.transitions, "exit_status": status}
            row.update(seconds=time.perf_counter() - started[env_id], last_returns=last_returns(Path(logs) / env_id))
            print(row, flush=True)
            rows.append(row)
    lines = [
        f"# FastTD3's RL Zoo entries trained briefly ({args.transitions} transitions each)",
        "",
        "`python -m rl_zoo3.train --algo fasttd3 --env <id> -n <transitions> --eval-freq -1 --seed 0`, one run per core "
        "with one thread. Return: mean of the last 10 training episodes (exploration noise included).",
        "",
        "| task | exit status | seconds | return |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        value = "-" if row["last_returns"] is None else f"{row['last_returns']:.1f}"
        lines.append(f"| {row['env']} | {row['exit_status']} | {row['seconds']:.0f} | {value} |")
    lines.append("")
    write_results(RESULTS_NAME, {"rows": rows, "machine": machine_info()}, "\n".join(lines))


if __name__ == "__main__":
    main()
