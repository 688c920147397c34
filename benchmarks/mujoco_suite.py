"""
FastTD3's RL Zoo entries against their peers on several MuJoCo tasks at equal wall-clock: each run is pinned to
one CPU core with one thread, so runs on different cores go side by side without sharing a core.

    python -m benchmarks.mujoco_suite run --envs Hopper-v5 Swimmer-v5 --algos sbx_td3 sbx_sac --cores 1
    python -m benchmarks.mujoco_suite run --envs Hopper-v5 --seeds 0 1 2 --cores 0 1
    python -m benchmarks.mujoco_suite run --envs Hopper-v5 --label layernorm --set "policy_kwargs={layer_norm: true}"
    python -m benchmarks.mujoco_suite run --envs Hopper-v5 --label decay --set total_timesteps=200000 \
        "critic_learning_rate=LinearSchedule(0.0003, 0.0001, 1.0)"
    python -m benchmarks.mujoco_suite report             # the Markdown table and one plot per task, from the JSON

``run`` queues one job per (task, algorithm, seed) and keeps one job per listed core busy; each job trains for
``--budget`` seconds of training (evaluation excluded, as in ``time_to_return``) and also evaluates at the
first step past each of ``MARKS`` seconds. Runs append to ``benchmarks/results/mujoco_suite.json`` under a file
lock, so two ``run`` commands on different cores can share it. A FastTD3 variant is the entry with ``--set``
replacements, told apart by ``--label``. Each task's plot colours the peers and the runs of the task's entry,
named in the JSON's ``entry_labels`` (task id to labels; ``fasttd3`` where a task has none), and draws the other
variants in grey. A learning rate may be a schedule, written as in the entries (``LinearSchedule(start, end,
end_fraction)``); a run with one learns over the entry's ``n_timesteps``, as in ``rl_zoo3.train``, or over
``--set total_timesteps=N``, and stops there (runs are otherwise open-ended: the budget ends them). ``--stop-at R``
ends each run at its first evaluation returning at least R: the transitions to a return, where its time does not
matter (a lever screened for a faster machine).
Peers need ``pip install -e ".[benchmarks]"``.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.env_util import make_vec_env

from benchmarks.common import (
    RESULTS_DIR,
    CpuSteal,
    append_to_record,
    legend_labels,
    machine_info,
    parse_overrides,
    run_one_per_core,
    write_results,
)
from benchmarks.time_to_return import ALGOS, BudgetedEvaluation, budgeted_learn, first_reaching

RESULTS_NAME = "mujoco_suite"
MARKS = [300.0, 600.0]  # the budgets compared: return after 5 and 10 minutes of training
# Returns whose first crossing the report times, per task
THRESHOLDS = {
    "HalfCheetah-v5": (3000.0, 5000.0),
    "Hopper-v5": (2000.0, 3000.0),
    "Swimmer-v5": (100.0, 200.0),
    "InvertedDoublePendulum-v5": (5000.0, 9000.0),
}


class MarkedEvaluation(BudgetedEvaluation):
    """:class:`BudgetedEvaluation` that also evaluates at the first step past each of ``marks`` training seconds."""

    def __init__(self, *args: Any, marks: list[float], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.pending = sorted(mark for mark in marks if mark < self.budget)  # the budget's own evaluation serves it

    def _on_step(self) -> bool:
        if self.pending and self.training_seconds() >= self.pending[0]:
            self.pending.pop(0)
            self.evaluate()
            self.curve[-1]["mark"] = True
            if self.reached_stop_at():
                return False
        return super()._on_step()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one algorithm under the budget (called in a child process pinned to one core)."""
    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    callback = MarkedEvaluation(
        eval_env, args.budget, args.eval_every, args.eval_episodes, stop_at=args.stop_at, marks=args.marks
    )
    budgeted_learn(args.worker, args.env, args.seed, args.set, callback)
    return {"curve": callback.curve, "torch_threads": th.get_num_threads()}


def render(results: dict[str, Any]) -> None:
    """Write the record, its Markdown summary and its plots."""
    write_results(RESULTS_NAME, results, summarize(results["runs"], results.get("entry_labels")))
    plot(results["runs"], results.get("entry_labels", {}))


def start_job(
    job: dict[str, Any],
    core: int,
    args: argparse.Namespace,
    output: str,
    module: str = "benchmarks.mujoco_suite",
    extra: tuple[str, ...] = (),
) -> subprocess.Popen:
    """
    One training run as a child process on ``core``, one thread.

    :param module: the benchmark whose ``worker`` command trains it
    :param extra: more arguments of that command
    """
    command = [sys.executable, "-m", module, "worker", "--worker", job["algo"], "--output", output, *extra]
    command += ["--env", job["env"], "--seed", str(job["seed"]), "--budget", str(args.budget)]
    command += ["--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes)]
    command += ["--marks", *map(str, args.marks), "--set", *job["set"]]
    threads = {name: "1" for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")}
    env = {**os.environ, **threads}  # JAX (the SBX peers) sizes its thread pool by the cores taskset leaves it
    print(f"core {core}: {job['env']} {job['label']} seed {job['seed']}", flush=True)
    return subprocess.Popen(["taskset", "-c", str(core), *command], env=env)


def plan_jobs(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (task, algorithm, seed) job of the command line; ``--label`` and ``--set`` make FastTD3's a variant."""
    jobs = []
    for env_id in args.envs:
        for algo in args.algos:
            variant = algo == "fasttd3"
            label = args.label if variant and args.label else algo
            for seed in args.seeds if variant else args.peer_seeds:
                jobs.append({"env": env_id, "algo": algo, "label": label, "seed": seed, "set": args.set if variant else []})
    return jobs


def run_jobs(args: argparse.Namespace) -> None:
    """Every job of :func:`plan_jobs`, one per free core at a time."""
    jobs = plan_jobs(args)
    outputs: dict[int, tuple[str, CpuSteal, dict[str, Any]]] = {}  # per core: the job's output, CPU steal, machine

    stop = () if args.stop_at is None else ("--stop-at", str(args.stop_at))

    def start(job: dict[str, Any], core: int) -> subprocess.Popen:
        outputs[core] = (tempfile.mkstemp(suffix=".json")[1], CpuSteal(), machine_info())
        return start_job(job, core, args, outputs[core][0], extra=stop)

    for job, core, status in run_one_per_core(jobs, args.cores, start):
        output, steal, machine = outputs.pop(core)
        if status != 0:
            print(f"core {core}: {job} failed with exit status {status}", flush=True)
            continue
        run = {**job, "budget": args.budget, "marks": args.marks, "stop_at": args.stop_at, "core": core}
        run.update(json.loads(Path(output).read_text()))
        os.unlink(output)
        append_to_record(RESULTS_NAME, [{**run, "cpu_steal_percent": steal.percent(), "machine": machine}], render)


def value_at(curve: list[dict[str, float]], seconds: float) -> float | None:
    """The return of the last evaluation at or before ``seconds`` of training (None if the run stopped earlier)."""
    if curve[-1]["seconds"] < seconds:
        return None
    before = [point for point in curve if point["seconds"] <= seconds + 1.0]
    return before[-1]["return"] if before else None


def standings(runs: list[dict[str, Any]]) -> list[str]:
    """
    Per task, mark (and CPU, where the runs came from several): each FastTD3 label's returns over its seeds against
    the best peer's on the same CPU, and whether every seed is ahead of it.
    """
    cpus = cpu_labels(runs)
    several = len(cpus) > 1
    lines = [
        "| task | mark |" + " CPU |" * several + " best peer | FastTD3 label: returns over seeds (every seed ahead?) |",
        "| --- | --- |" + " --- |" * several + " --- | --- |",
    ]
    for env_id in dict.fromkeys(run["env"] for run in runs):
        task_runs = [run for run in runs if run["env"] == env_id]
        for mark in sorted({mark for run in task_runs for mark in run.get("marks", MARKS)}):
            for cpu, name in cpus.items():
                cpu_runs = [run for run in task_runs if cpu_key(run) == cpu]
                cells, peer = mark_standing(cpu_runs, mark)
                if cells:
                    cpu_cell = f" {name[0]} |" * several
                    lines.append(f"| {env_id} | {mark:g} s |{cpu_cell} {peer} | {'; '.join(cells)} |")
    return lines


def mark_standing(runs: list[dict[str, Any]], mark: float) -> tuple[list[str], str]:
    """Each FastTD3 label's returns at ``mark`` (and whether every seed beats the best peer), and that peer."""
    peer_values = {run["label"]: value_at(run["curve"], mark) for run in runs if run["algo"] != "fasttd3"}
    peer_values = {label: value for label, value in peer_values.items() if value is not None}
    best = max(peer_values.values(), default=None)
    cells = []
    for label in dict.fromkeys(run["label"] for run in runs if run["algo"] == "fasttd3"):
        values = [value_at(run["curve"], mark) for run in runs if run["label"] == label]
        values = [value for value in values if value is not None]
        if values:
            ahead = "" if best is None else (" (yes)" if min(values) > best else " (no)")
            cells.append(f"{label}: {', '.join(f'{value:.0f}' for value in values)}{ahead}")
    peer = "-" if best is None else f"{max(peer_values, key=peer_values.get)} {best:.0f}"
    return cells, peer


def cpu_key(run: dict[str, Any]) -> tuple[str, tuple[str, ...]]:
    """The CPU a run came from: its model name and flags."""
    return run["machine"]["cpu"], tuple(run["machine"]["cpu_flags"])


def cpu_labels(runs: list[dict[str, Any]]) -> dict[tuple[str, tuple[str, ...]], str]:
    """
    A letter for each CPU the runs came from (its model name and flags), and the CPU as the record names it:
    by the flags that tell it from the others.
    """
    cpus = dict.fromkeys(cpu_key(run) for run in runs)
    names = {}
    for letter, (model, flags) in zip("ABCDEFGH", cpus, strict=False):
        others = set().union(*(set(other) for _, other in cpus if other != flags)) if len(cpus) > 1 else set()
        own, missing = sorted(set(flags) - others), sorted(others - set(flags))
        described = [f"with {', '.join(own)}"] * bool(own) + [f"without {', '.join(missing)}"] * bool(missing)
        names[model, flags] = f"{letter}: {model} {' and '.join(described)}".rstrip()
    return names


def summarize(runs: list[dict[str, Any]], entry_labels: dict[str, list[str]] | None = None) -> str:
    """
    The standings; each task's entry and peers alone (the runs of its labels in ``entry_labels``, default
    ``fasttd3``); then per task every run: its return at the marks and seconds to each threshold (and its CPU, where
    the runs came from several: seconds compare only between runs on one CPU).
    """
    lines = ["# FastTD3 against its peers across MuJoCo tasks", ""]
    cpus = cpu_labels(runs)
    if len(cpus) > 1:
        lines += ["CPUs of the runs (the CPU columns; seconds and returns at a mark compare only on one CPU):", ""]
        lines += [f"- {name}" for name in cpus.values()] + [""]
    lines += [*standings(runs), ""]
    env_ids = list(dict.fromkeys(run["env"] for run in runs))
    lines += ["## The entries and their peers", ""]
    for env_id in env_ids:
        shown = [run for run in runs if run["env"] == env_id and is_entry_or_peer(run, entry_labels or {})]
        if shown:
            lines += [f"{env_id}:", "", *run_table(shown, cpus), ""]
    for env_id in env_ids:
        lines += [f"## {env_id}", "", f"![curves]({RESULTS_NAME}_{env_id}.png)", ""]
        task_runs = [run for run in runs if run["env"] == env_id]
        lines += [*run_table(task_runs, cpus), ""]
        lines += [f"- {run['label']}, seed {run['seed']}: {run['note']}" for run in sort_runs(task_runs) if run.get("note")]
        lines.append("")
    lines += [
        "Each run: one CPU core and one thread (`taskset`, `OMP_NUM_THREADS=1`), two runs side by side on the two "
        "cores of the machine below. Returns are the mean of the evaluation episodes (deterministic policy); "
        "evaluation time is not counted. A return at a mark is the last evaluation at or before it.",
        "",
    ]
    return "\n".join(lines)


def is_entry_or_peer(run: dict[str, Any], entry_labels: dict[str, list[str]]) -> bool:
    """Whether a run is a peer's or one of its task's entry (its labels in ``entry_labels``, default ``fasttd3``)."""
    return run["algo"] != "fasttd3" or run["label"] in entry_labels.get(run["env"], ["fasttd3"])


def sort_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs by label, then seed."""
    return sorted(runs, key=lambda run: (run["label"], run["seed"]))


def run_table(runs: list[dict[str, Any]], cpus: dict[tuple[str, tuple[str, ...]], str]) -> list[str]:
    """One task's runs, one row each: the return at each mark, the seconds (steps) to each threshold, and more."""
    thresholds = THRESHOLDS.get(runs[0]["env"], ())
    marks = sorted({mark for run in runs for mark in run.get("marks", MARKS)})
    header = "| algorithm | seed | " + " | ".join(f"return at {mark:g} s" for mark in marks)
    header += "".join(f" | to {threshold:g}: s (steps)" for threshold in thresholds)
    header += " | steps at budget | steal % | commit |" + " CPU |" * (len(cpus) > 1)
    lines = [header, "|" + " --- |" * (5 + len(marks) + len(thresholds) + (len(cpus) > 1))]
    for run in sort_runs(runs):
        cells = [format_return(value_at(run["curve"], mark)) for mark in marks]
        for threshold in thresholds:
            point = first_reaching(run["curve"], threshold)
            cells.append(f"{point['seconds']:.0f} ({point['steps']:.0f})" if point else "not reached")
        steal = run.get("cpu_steal_percent")
        cpu = f" {cpus[cpu_key(run)][0]} |" * (len(cpus) > 1)
        lines.append(
            f"| {run['label']} | {run['seed']} | " + " | ".join(cells) + f" | {run['curve'][-1]['steps']:.0f}"
            f" | {'n/a' if steal is None else f'{steal:.0f}'} | {run['machine']['commit']} |{cpu}"
        )
    return lines


def format_return(value: float | None) -> str:
    """A return as a table cell."""
    return "-" if value is None else f"{value:.0f}"


def plot(runs: list[dict[str, Any]], entry_labels: dict[str, list[str]]) -> None:
    """
    One PNG per task: return against training seconds, one line per run. The peers and the runs of the task's
    entry (its labels in ``entry_labels``, default ``fasttd3``) get a colour per label and CPU; the other variants
    are grey lines without a legend entry each, so that the levers screened do not hide the entry, and are cut at
    the entry's and the peers' longest run.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cpus = cpu_labels(runs)
    for env_id in dict.fromkeys(run["env"] for run in runs):
        task_runs = [run for run in runs if run["env"] == env_id]
        shown, others = [], []  # the peers and the entry's runs; the levers screened
        for run in task_runs:
            (shown if is_entry_or_peer(run, entry_labels) else others).append(run)
        names = [f"{run['label']}, CPU {cpus[cpu_key(run)][0]}" for run in shown]
        colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}
        fig, axis = plt.subplots(figsize=(7, 4.5))
        for i, run in enumerate(others):
            label = f"other variants (levers): {len(others)} run(s)" if i == 0 else None
            axis.plot(*curve_xy(run), color="lightgrey", linewidth=0.7, label=label, zorder=1)
        for run, name, label in zip(shown, names, legend_labels(names), strict=True):
            axis.plot(*curve_xy(run), color=colors[name], alpha=0.9, label=label, zorder=2)
        for mark in sorted({mark for run in task_runs for mark in run.get("marks", MARKS)}):
            axis.axvline(mark, color="grey", linewidth=0.5)
        axis.set(xlabel="training wall-clock, one core (s)", ylabel="evaluation return", title=env_id)
        if shown:  # the span of the entry and the peers: a lever run for longer must not squeeze their curves
            axis.set_xlim(0.0, 1.02 * max(run["curve"][-1]["seconds"] for run in shown))
        axis.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(RESULTS_DIR / f"{RESULTS_NAME}_{env_id}.png", dpi=90)
        plt.close(fig)


def curve_xy(run: dict[str, Any]) -> tuple[list[float], list[float]]:
    """A run's training seconds and evaluation returns."""
    return [point["seconds"] for point in run["curve"]], [point["return"] for point in run["curve"]]


def carry_out(
    args: argparse.Namespace,
    worker: Callable[[argparse.Namespace], dict[str, Any]],
    jobs: Callable[[argparse.Namespace], None],
    report: Callable[[], None],
) -> None:
    """Carry out a parsed ``worker`` (its run to ``--output``), ``run`` (``--set`` checked first) or ``report``."""
    if args.command == "worker":
        Path(args.output).write_text(json.dumps(worker(args)))
    elif args.command == "run":
        parse_overrides(args.set)  # a malformed pair fails before any run
        jobs(args)
    else:
        report()


def add_worker_parser(commands: Any, algos: list[str]) -> argparse.ArgumentParser:
    """The ``worker`` command that :func:`start_job` runs for one job."""
    worker = commands.add_parser("worker")
    worker.add_argument("--worker", choices=algos, required=True)
    worker.add_argument("--output", required=True)
    worker.add_argument("--env", required=True)
    worker.add_argument("--seed", type=int, required=True)
    worker.add_argument("--set", nargs="*", default=[])
    return worker


def add_budget_arguments(command: argparse.ArgumentParser, budget: float) -> None:
    """The training budget and the evaluations, which ``run`` hands to each ``worker``."""
    command.add_argument("--budget", type=float, default=budget, help="training seconds per run")
    command.add_argument("--eval-every", type=int, default=5000, help="environment steps between evaluations")
    command.add_argument("--eval-episodes", type=int, default=5)
    command.add_argument("--marks", type=float, nargs="+", default=MARKS, help="also evaluate at these seconds")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train the jobs and append their curves")
    run.add_argument("--envs", nargs="+", default=list(THRESHOLDS))
    run.add_argument("--algos", nargs="+", choices=list(ALGOS), default=["fasttd3"])
    run.add_argument("--seeds", type=int, nargs="+", default=[0], help="FastTD3's seeds")
    run.add_argument("--peer-seeds", type=int, nargs="+", default=[0])
    run.add_argument("--cores", type=int, nargs="+", default=[0], help="one job at a time on each")
    run.add_argument("--label", help="name of a FastTD3 variant (default: fasttd3)")
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="FastTD3 hyperparameters to replace")
    worker = add_worker_parser(commands, list(ALGOS))
    for command in (run, worker):
        add_budget_arguments(command, budget=600.0)
        command.add_argument("--stop-at", type=float, help="end each run at its first evaluation returning at least this")
    commands.add_parser("report", help="rewrite the Markdown and plots from the JSON")
    carry_out(parser.parse_args(), run_worker, run_jobs, report)


def report() -> None:
    """Rewrite the Markdown and the plots from the JSON."""
    render(json.loads((RESULTS_DIR / f"{RESULTS_NAME}.json").read_text()))


if __name__ == "__main__":
    main()
