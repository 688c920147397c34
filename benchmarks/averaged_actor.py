"""
Whether an averaged actor holds a gait better than the live one. FastTD3's entry trains once per seed, pinned to
one core with one thread as in ``mujoco_suite``; at every evaluation (every ``--eval-every`` steps and past each
mark, evaluation time kept off the training clock) the live actor, the target actor (where the entry has one) and
exponential moving averages of the live actor play the same evaluation episodes: each has its own evaluation env,
seeded alike. Training is the entry's: the averages are only read. The live actor is evaluated as such, and an
entry with ``actor_average_tau`` (what its ``predict()`` acts with) adds its own average to the others.

    python -m benchmarks.averaged_actor run --env Hopper-v5 --seeds 0 1 --cores 0 1 --budget 1150 --spans 4000 20000
    python -m benchmarks.averaged_actor report

A span is the number of transitions over which a past actor's weight in the average decays to 1/e: the average
moves towards the live actor by ``n_envs / span`` of the way after every vector step. Runs append to
``benchmarks/results/averaged_actor.{json,md}``; the summary gives, per actor, the transitions to its first evaluation
at the task's top threshold in ``mujoco_suite``, and counts the evaluations from the last mark on that fall below it.
"""

import argparse
import copy
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch as th
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy

from benchmarks.common import RESULTS_DIR, CpuSteal, append_to_record, machine_info, run_one_per_core, write_results
from benchmarks.mujoco_suite import (
    MARKS,
    THRESHOLDS,
    MarkedEvaluation,
    add_budget_arguments,
    add_worker_parser,
    carry_out,
    format_return,
    start_job,
    value_at,
)
from benchmarks.time_to_return import budgeted_learn, first_reaching

RESULTS_NAME = "averaged_actor"


class AveragedActorEvaluation(MarkedEvaluation):
    """
    :class:`MarkedEvaluation` of the live actor that also evaluates, at the same points and on the same episodes,
    the target actor and exponential moving averages of the actor, one per span (in transitions).
    """

    def __init__(self, env_id: str, seed: int, spans: list[int], *args: Any, **kwargs: Any):
        super().__init__(make_vec_env(env_id, n_envs=1, seed=seed), *args, **kwargs)
        self.make_eval_env = lambda: make_vec_env(env_id, n_envs=1, seed=seed)
        self.spans = spans
        self.curves: dict[str, list[dict[str, float]]] = {"live": self.curve}

    def _on_training_start(self) -> None:
        super()._on_training_start()
        policy = self.model.policy
        self.actors = {"target": policy.actor_target} if policy.actor_target is not None else {}
        if policy.actor_average is not None:
            self.actors[f"actor_average_tau={self.model.actor_average_tau}"] = policy.actor_average
        self.averages = {}
        for span in self.spans:
            average = copy.deepcopy(policy.actor).requires_grad_(False)
            average.obs_normalizer = policy.obs_normalizer  # the live statistics, as the target actor reads them
            self.averages[span] = average
            self.actors[f"average over {span}"] = average
        self.eval_envs = {name: self.make_eval_env() for name in self.actors}
        # Each average's weights with the fraction of the way it moves after a vector step, listed once
        self.live_params = list(policy.actor.parameters())
        self.average_params = [
            (list(average.parameters()), min(1.0, self.model.n_envs / span)) for span, average in self.averages.items()
        ]
        self.curves.update({name: [] for name in self.actors})

    def _on_step(self) -> bool:
        with th.no_grad():
            for params, weight in self.average_params:
                th._foreach_lerp_(params, self.live_params, weight)
        return super()._on_step()

    def evaluated(self) -> Any:
        """The live actor, whatever the model's ``predict()`` acts with."""
        return self.model.policy.actor

    def evaluate(self) -> None:
        super().evaluate()
        point, start = self.curve[-1], self.training_seconds()
        for name, actor in self.actors.items():
            mean_return, _ = evaluate_policy(actor, self.eval_envs[name], n_eval_episodes=self.eval_episodes)
            self.curves[name].append({**point, "return": float(mean_return)})
        self.eval_seconds += self.training_seconds() - start
        print("    " + ", ".join(f"{name} {curve[-1]['return']:.1f}" for name, curve in self.curves.items()), flush=True)


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train the entry under the budget, evaluating every actor (called in a child process pinned to one core)."""
    callback = AveragedActorEvaluation(
        args.env, args.seed + 1000, args.spans, args.budget, args.eval_every, args.eval_episodes, marks=args.marks
    )
    budgeted_learn("fasttd3", args.env, args.seed, args.set, callback)
    # The marks' evaluations carry "mark" in the live curve only: mark them in every curve
    for curve in callback.curves.values():
        for point, live_point in zip(curve, callback.curve, strict=True):
            point["mark"] = live_point.get("mark", False)
    return {"curves": callback.curves, "torch_threads": th.get_num_threads()}


def hold_row(env_id: str, seed: int, name: str, curve: list[dict[str, float]], mark: float) -> str:
    """
    One Markdown row: an actor's returns at the marks, the transitions to its first evaluation at the task's top
    threshold, and how it holds that threshold from ``mark``.
    """
    threshold = THRESHOLDS.get(env_id, (float("inf"),))[-1]
    held = [point["return"] for point in curve if point["seconds"] >= mark]
    at_marks = " | ".join(format_return(value_at(curve, m)) for m in MARKS)
    reached = first_reaching(curve, threshold)
    first = f"{reached['steps']:.0f}" if reached else "not reached"
    below = f"{sum(value < threshold for value in held)} of {len(held)}" if held else "-"
    lowest = f"{min(held):.0f}" if held else "-"
    return f"| {seed} | {name} | {at_marks} | {first} | {lowest} | {below} | {curve[-1]['return']:.0f} |"


def summarize(runs: list[dict[str, Any]]) -> str:
    """A Markdown table per task: each run's actors at the marks, and from the last mark on."""
    lines = ["# An averaged actor against the live one", ""]
    lines.append(
        "Each run trains the entry once and evaluates every actor at the same points, on the same episodes. "
        "The spans are in transitions (a past actor's weight in the average decays to 1/e over a span)."
    )
    mark = MARKS[-1]
    for env_id in sorted({run["env"] for run in runs}):
        threshold = THRESHOLDS.get(env_id, (float("inf"),))[-1]
        lines += ["", f"## {env_id}", ""]
        marks = " | ".join(f"after {m:g} s" for m in MARKS)
        lines.append(
            f"| seed | actor | {marks} | to {threshold:g}: steps | lowest from {mark:g} s | below {threshold:g} from"
            f" {mark:g} s | last |"
        )
        lines.append("| --- | --- | " + " | ".join("---" for _ in MARKS) + " | --- | --- | --- | --- |")
        for run in (run for run in runs if run["env"] == env_id):
            for name, curve in run["curves"].items():
                lines.append(hold_row(env_id, run["seed"], name, curve, mark))
    return "\n".join(lines) + "\n"


def render(results: dict[str, Any]) -> None:
    """Write the record and its Markdown summary."""
    write_results(RESULTS_NAME, results, summarize(results["runs"]))


def run_jobs(args: argparse.Namespace) -> None:
    """One job per seed, one per free core at a time; the results are written as each job ends."""
    jobs = [{"env": args.env, "seed": seed, "set": args.set, "spans": args.spans} for seed in args.seeds]
    outputs: dict[int, tuple[str, CpuSteal, dict[str, Any]]] = {}  # per core: the job's output, CPU steal, machine

    def start(job: dict[str, Any], core: int) -> Any:
        outputs[core] = (tempfile.mkstemp(suffix=".json")[1], CpuSteal(), machine_info())
        spans = ("--spans", *map(str, args.spans))
        job = {**job, "algo": "fasttd3", "label": "averaged actor"}
        return start_job(job, core, args, outputs[core][0], module="benchmarks.averaged_actor", extra=spans)

    for job, core, status in run_one_per_core(jobs, args.cores, start):
        output, steal, machine = outputs.pop(core)
        if status != 0:
            print(f"core {core}: {job} failed with exit status {status}", flush=True)
            continue
        run = {**job, "budget": args.budget, "core": core, **json.loads(Path(output).read_text())}
        os.unlink(output)
        append_to_record(RESULTS_NAME, [{**run, "cpu_steal_percent": steal.percent(), "machine": machine}], render)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="train one run per seed and append its curves")
    run.add_argument("--env", default="Hopper-v5")
    run.add_argument("--seeds", type=int, nargs="+", default=[0])
    run.add_argument("--cores", type=int, nargs="+", default=[0], help="one job at a time on each")
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="hyperparameters to replace")
    worker = add_worker_parser(commands, ["fasttd3"])
    for command in (run, worker):
        command.add_argument("--spans", type=int, nargs="+", default=[4000, 20000], help="averages' spans, transitions")
        add_budget_arguments(command, budget=1150.0)
    commands.add_parser("report", help="rewrite the Markdown from the JSON")
    carry_out(parser.parse_args(), run_worker, run_jobs, report)


def report() -> None:
    """Rewrite the Markdown from the JSON."""
    render(json.loads((RESULTS_DIR / f"{RESULTS_NAME}.json").read_text()))


if __name__ == "__main__":
    sys.exit(main())
