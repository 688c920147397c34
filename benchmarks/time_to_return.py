"""
Evaluation return against wall-clock seconds and environment steps on one task, for FastTD3 (our RL Zoo
entry) and its peers with their RL Zoo hyperparameters: SB3 TD3, SB3 SAC, sb3-contrib TQC and SBX TD3/SAC
(JAX on the same device).

    python -m benchmarks.time_to_return --budget 600                 # every algorithm, one after another
    python -m benchmarks.time_to_return --algos fasttd3 sbx_td3 --budget 900 --seed 1   # comparison N of the record
    python -m benchmarks.time_to_return --algos td3 sac tqc --budget 900 --seed 1 --join-invocation N  # the rest, later
    python -m benchmarks.time_to_return --algos fasttd3 --budget 900 --seed 2 --join-invocation N   # another seed
    python -m benchmarks.time_to_return --algos fasttd3 --budget 900 --set n_steps=2 --join-invocation N
    python -m benchmarks.time_to_return --rewrite-markdown         # the summary again, from the JSON results

Each algorithm trains in its own process (JAX and torch never share one) for ``--budget`` seconds of
training; evaluation time is not counted. Results append to the task's record,
``benchmarks/results/time_to_return.json`` for HalfCheetah-v5 and ``time_to_return_<env>.json`` for any other,
and the Markdown summary and PNG plot are rebuilt from every run in that file, so a long comparison can
be built over several invocations: ``--join-invocation N`` adds the runs to comparison N (same task and budget
required, and the same seed unless only FastTD3 joins: its other seeds are compared with the same peer runs).
``--stop-at R`` ends each run at its first evaluation returning at least R. ``--thresholds`` are kept in the record
and used by later invocations on it that do not give their own. ``--set KEY=VALUE`` runs a variant
of FastTD3's entry, named in the results; a learning rate may be a schedule (see ``mujoco_suite``). Peers need
``pip install -e ".[benchmarks]"``.
"""

import argparse
import importlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from stable_baselines3.common.base_class import BaseAlgorithm
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.noise import ActionNoise, NormalActionNoise, OrnsteinUhlenbeckActionNoise

from benchmarks.common import RESULTS_DIR, CpuSteal, legend_labels, machine_info, parse_overrides, write_results

# name -> (module, class, RL Zoo hyperparameter file); FastTD3 uses our own Zoo file
ALGOS = {
    "fasttd3": ("sb3_fasttd3", "FastTD3", None),
    "td3": ("stable_baselines3", "TD3", "td3"),
    "sac": ("stable_baselines3", "SAC", "sac"),
    "tqc": ("sb3_contrib", "TQC", "tqc"),
    "sbx_td3": ("sbx", "TD3", "td3"),
    "sbx_sac": ("sbx", "SAC", "sac"),
}
RESULTS_NAME = "time_to_return"
DEFAULT_ENV = "HalfCheetah-v5"
# The Zoo has one setting for every MuJoCo task it lists (its Hopper entry, per algorithm); tasks it does not list
# (InvertedDoublePendulum, InvertedPendulum, Reacher, Pusher) get that setting
SHARED_MUJOCO_ENTRY = {"td3": "Hopper-v4", "sac": "Hopper-v4", "tqc": "Hopper-v4"}
MUJOCO_V4_IDS = ("InvertedDoublePendulum-v4", "InvertedPendulum-v4", "Reacher-v4", "Pusher-v4")
# The target on HalfCheetah-v5: FastTD3 reaches a return in at most 1/5 of the fastest peer's wall-clock
TARGET_RATIO = 0.2
DEFAULT_THRESHOLDS = [3000.0, 5000.0]
# learn()'s total_timesteps where the budget, not a number of transitions, ends a run
OPEN_ENDED = 10**9


def results_name(env_id: str) -> str:
    """The record of a task: ``time_to_return`` for HalfCheetah-v5, the first task compared, else suffixed by the id."""
    return RESULTS_NAME if env_id == DEFAULT_ENV else f"{RESULTS_NAME}_{env_id}"


def zoo_hyperparams(zoo_file: str, env_id: str) -> tuple[dict[str, Any], int]:
    """
    The RL Zoo 2.9 entry of ``env_id`` (the ``-v4`` entry stands in for ``-v5``) as constructor arguments.

    :param zoo_file: name of the Zoo's hyperparameter file (``td3``, ``sac``, ...)
    :param env_id: Gymnasium id
    :return: keyword arguments and the number of envs
    """
    import rl_zoo3
    import torch as th

    entries = yaml.safe_load((Path(rl_zoo3.__file__).parent / "hyperparams" / f"{zoo_file}.yml").read_text())
    key = env_id if env_id in entries else env_id.replace("-v5", "-v4")
    if key not in entries and env_id.replace("-v5", "-v4") in MUJOCO_V4_IDS:
        key = SHARED_MUJOCO_ENTRY[zoo_file]
    if key not in entries:
        raise ValueError(f"rl_zoo3 has no {zoo_file} entry for env_id={env_id!r}")
    entry = dict(entries[key])
    n_envs = int(entry.pop("n_envs", 1))
    entry.pop("n_timesteps", None)
    for unsupported in ("normalize", "env_wrapper", "frame_stack", "callback"):
        if unsupported in entry:
            raise ValueError(f"the {zoo_file} entry of {key} uses {unsupported!r}, which this benchmark does not apply")
    noise_type, noise_std = entry.pop("noise_type", None), entry.pop("noise_std", None)
    if noise_type is not None:
        if noise_type != "normal":
            raise ValueError(f"noise_type={noise_type!r} is not supported here (only 'normal')")
        # The Zoo builds the noise from the action size once the env exists; see make_model()
        entry["action_noise_std"] = float(noise_std)
    if isinstance(entry.get("policy_kwargs"), str):
        entry["policy_kwargs"] = eval(entry["policy_kwargs"], {"__builtins__": {}, "dict": dict, "nn": th.nn})
    return entry, n_envs


def make_model(algo: str, env_id: str, seed: int, overrides: dict[str, Any] | None = None) -> BaseAlgorithm:
    """
    ``algo`` with its Zoo hyperparameters on ``env_id``.

    :param overrides: hyperparameters replacing the entry's (``n_envs`` among them; ``action_noise_std`` and
        ``action_noise_correlation`` build an SB3 action noise, see :func:`action_noise`)
    """
    module, class_name, zoo_file = ALGOS[algo]
    algo_class = getattr(importlib.import_module(module), class_name)
    if zoo_file is None:
        from sb3_fasttd3.hyperparams import load_hyperparams

        hyperparams, n_envs = load_hyperparams(env_id)
    else:
        hyperparams, n_envs = zoo_hyperparams(zoo_file, env_id)
    overrides = dict(overrides or {})
    n_envs = int(overrides.pop("n_envs", n_envs))
    hyperparams.update(overrides)
    env = make_vec_env(env_id, n_envs=n_envs, seed=seed)
    noise_std = hyperparams.pop("action_noise_std", None)
    correlation = hyperparams.pop("action_noise_correlation", None)
    if noise_std is not None:
        hyperparams["action_noise"] = action_noise(env.action_space.shape[0], noise_std, correlation)
    return algo_class(env=env, seed=seed, verbose=0, **hyperparams)


def budgeted_learn(algo: str, env_id: str, seed: int, pairs: list[str], callback: BaseCallback) -> BaseAlgorithm:
    """
    ``algo`` trained on ``env_id`` until ``callback`` stops it, or until learn()'s ``total_timesteps``: the pair
    ``total_timesteps=N`` where given, else the entry's ``n_timesteps`` where FastTD3's learning rates follow a
    schedule (it progresses over them, as in ``rl_zoo3.train``), else open-ended.

    :param pairs: the ``--set`` pairs, hyperparameters replacing the entry's
    """
    overrides = parse_overrides(pairs)
    total_timesteps = overrides.pop("total_timesteps", None)
    model = make_model(algo, env_id, seed, overrides)
    if total_timesteps is None and algo == "fasttd3":
        from sb3_fasttd3.hyperparams import SCHEDULE_KEYS, zoo_entry

        if any(callable(getattr(model, key)) for key in SCHEDULE_KEYS):
            total_timesteps = zoo_entry(env_id)["n_timesteps"]
    model.learn(total_timesteps=OPEN_ENDED if total_timesteps is None else int(total_timesteps), callback=callback)
    return model


def action_noise(n_actions: int, std: float, correlation: float | None = None) -> ActionNoise:
    """
    Gaussian action noise of standard deviation ``std``, or, with ``correlation``, Ornstein-Uhlenbeck noise with
    the same stationary standard deviation whose correlation decays by 1/e over ``correlation`` steps.
    """
    mean, scale = np.zeros(n_actions), np.ones(n_actions)
    if correlation is None:
        return NormalActionNoise(mean, std * scale)
    theta = 1.0 / correlation
    return OrnsteinUhlenbeckActionNoise(mean, std * np.sqrt(2.0 * theta) * scale, theta=theta, dt=1.0)


class BudgetedEvaluation(BaseCallback):
    """
    Evaluate every ``eval_every`` environment steps and stop after ``budget`` seconds of training.
    The evaluation time is kept off the training clock.

    :param eval_env: the environment to evaluate on
    :param budget: training seconds
    :param eval_every: environment steps (over all envs) between evaluations
    :param eval_episodes: episodes per evaluation
    :param stop_at: also stop at the first evaluation returning at least this (None: train for the whole budget)
    """

    def __init__(self, eval_env, budget: float, eval_every: int, eval_episodes: int, stop_at: float | None = None):
        super().__init__()
        self.eval_env, self.budget, self.eval_every, self.eval_episodes = eval_env, budget, eval_every, eval_episodes
        self.stop_at = stop_at
        self.curve: list[dict[str, float]] = []

    def _on_training_start(self) -> None:
        self.start, self.eval_seconds, self.next_eval = time.perf_counter(), 0.0, self.eval_every

    def training_seconds(self) -> float:
        return time.perf_counter() - self.start - self.eval_seconds

    def evaluated(self) -> Any:
        """What plays the evaluation episodes: the model, through its ``predict()``."""
        return self.model

    def evaluate(self) -> None:
        seconds, eval_start = self.training_seconds(), time.perf_counter()
        mean_return, _ = evaluate_policy(self.evaluated(), self.eval_env, n_eval_episodes=self.eval_episodes)
        self.curve.append({"seconds": seconds, "steps": self.num_timesteps, "return": float(mean_return)})
        print(f"  {seconds:7.1f} s {self.num_timesteps:8d} steps  return {mean_return:8.1f}", flush=True)
        self.eval_seconds += time.perf_counter() - eval_start

    def reached_stop_at(self) -> bool:
        """Whether the last evaluation returned at least ``stop_at``."""
        return self.stop_at is not None and self.curve[-1]["return"] >= self.stop_at

    def _on_step(self) -> bool:
        if self.num_timesteps >= self.next_eval:
            self.next_eval += self.eval_every
            self.evaluate()
            if self.reached_stop_at():
                return False
        if self.training_seconds() >= self.budget:
            self.evaluate()
            return False
        return True

    def _on_training_end(self) -> None:
        if not self.curve or self.curve[-1]["steps"] != self.num_timesteps:  # learn() reached total_timesteps
            self.evaluate()


def run_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Train one algorithm under the budget (called in a child process)."""
    import torch as th

    eval_env = make_vec_env(args.env, n_envs=1, seed=args.seed + 1000)
    callback = BudgetedEvaluation(eval_env, args.budget, args.eval_every, args.eval_episodes, stop_at=args.stop_at)
    budgeted_learn(args.worker, args.env, args.seed, args.set, callback)
    run = {"algo": args.worker, "env": args.env, "seed": args.seed, "budget": args.budget, "curve": callback.curve}
    return {
        **run,
        **evaluation_settings(args),
        "set": args.set,
        "stop_at": args.stop_at,
        "torch_threads": th.get_num_threads(),
    }


def evaluation_settings(args: argparse.Namespace) -> dict[str, int]:
    """How a run evaluates: recorded with it, and checked when a run joins its comparison."""
    return {"eval_every": args.eval_every, "eval_episodes": args.eval_episodes}


def run_name(run: dict[str, Any]) -> str:
    """The algorithm, and the hyperparameters ``--set`` replaced in FastTD3's entry, if any."""
    return run["algo"] + (f" ({', '.join(run['set'])})" if run.get("set") else "")


def first_reaching(curve: list[dict[str, float]], threshold: float) -> dict[str, float] | None:
    """The first evaluation point whose return is at least ``threshold``."""
    return next((point for point in curve if point["return"] >= threshold), None)


def summarize(runs: list[dict[str, Any]], thresholds: list[float]) -> str:
    """A Markdown table of every run and, per invocation, FastTD3's speed-up over its fastest peer."""
    header = "| invocation | algo | seed | budget s | " + " | ".join(f"to {t:g}: s (steps)" for t in thresholds)
    header += " | return at budget | steps at budget | CPU steal % | CPU | commit |"
    lines = [header, "|" + " --- |" * (9 + len(thresholds))]
    for run in sorted(runs, key=lambda run: run["invocation"]):  # joined runs next to their comparison
        cells = []
        for threshold in thresholds:
            point = first_reaching(run["curve"], threshold)
            cells.append(f"{point['seconds']:.0f} ({point['steps']:.0f})" if point else "not reached")
        last = run["curve"][-1]
        stopped = " (stopped)" if run.get("stop_at") is not None and last["return"] >= run["stop_at"] else ""
        lines.append(
            f"| {run['invocation']} | {run_name(run)} | {run['seed']} | {run['budget']:g} | "
            + " | ".join(cells)
            + f" | {last['return']:.0f}{stopped} | {last['steps']:.0f} | {steal_cell(run)} | {run['machine']['cpu']}"
            + f" | {run['machine']['commit']} |"
        )
    lines += [
        "",
        "CPU steal: the share of the machine's CPU time the hypervisor gave to other guests during the run "
        "(not recorded before invocation 5). Compare wall-clock times between runs of similar steal, on the same CPU, "
        "and within an invocation: the machine also has slow spells that steal does not show (FastTD3's runs of one "
        "seed on one CPU compute the same returns at the same steps, so their seconds per step show them). "
        "(stopped): the run ended at its first evaluation reaching `--stop-at`, before its budget.",
        "",
    ]
    noted = [run for run in runs if run.get("note")]
    if noted:
        lines += ["Notes on runs:", ""]
        lines += [f"- invocation {run['invocation']}, {run_name(run)} seed {run['seed']}: {run['note']}" for run in noted]
        lines += [""]
    lines += [
        "FastTD3's time to a return against the fastest peer of the same invocation:",
        "",
    ]
    for invocation in sorted({run["invocation"] for run in runs}):
        group = [run for run in runs if run["invocation"] == invocation]
        ours = [run for run in group if run["algo"] == "fasttd3"]
        peers = [run for run in group if run["algo"] != "fasttd3"]
        if not ours or not peers:
            continue
        for run in ours:  # several when FastTD3 joined a comparison again: another seed or a later commit
            label = f"invocation {invocation}"
            if len(ours) > 1:
                label += f", {run_name(run).replace('fasttd3', 'FastTD3')} seed {run['seed']} at {run['machine']['commit']}"
            for threshold in thresholds:
                lines.append(f"- {label}, return {threshold:g}: " + speedup(run, peers, threshold))
    lines += [
        "",
        "Where FastTD3's time per transition goes (updating, and within an update): `python -m benchmarks.entry_speed`, "
        "`entry_speed.md`.",
    ]
    return "\n".join(lines)


def steal_cell(run: dict[str, Any]) -> str:
    """The run's CPU steal as a table cell ("n/a" for runs made before it was recorded)."""
    steal = run.get("cpu_steal_percent")
    return "n/a" if steal is None else f"{steal:.0f}"


def speedup(ours: dict[str, Any], peers: list[dict[str, Any]], threshold: float) -> str:
    """
    FastTD3's time against the fastest peer's, or the bound the budget gives when a peer never got there; on
    HalfCheetah-v5, with the verdict on the 1/5 target and, where missed, what it is made of.
    """
    judged = ours.get("env") == DEFAULT_ENV
    our_point = first_reaching(ours["curve"], threshold)
    if our_point is None:
        return "FastTD3 did not reach it"
    peer_times = {peer["algo"]: first_reaching(peer["curve"], threshold) for peer in peers}
    reached = {algo: point["seconds"] for algo, point in peer_times.items() if point is not None}
    if not reached:
        budget = min(peer["budget"] for peer in peers)
        bound = our_point["seconds"] / budget
        return (
            f"FastTD3 {our_point['seconds']:.0f} s; no peer within {budget:g} s (ratio <= {bound:.3f}{verdict(bound, judged)})"
        )
    fastest = min(reached, key=reached.get)
    ratio = our_point["seconds"] / reached[fastest]
    line = (
        f"FastTD3 {our_point['seconds']:.0f} s, fastest peer {fastest} {reached[fastest]:.0f} s "
        f"(ratio {ratio:.3f}{verdict(ratio, judged)})"
    )
    if not judged or ratio <= TARGET_RATIO:
        return line
    return line + "\n  " + ratio_breakdown(our_point, peer_times[fastest], fastest)


def ratio_breakdown(ours: dict[str, float], peer: dict[str, float], peer_name: str) -> str:
    """
    A missed ratio as the product of its two factors: how many transitions FastTD3 needed, and how long each took
    (on average up to that point: acting, stepping, updating, compilation), both against the peer.
    """
    steps, seconds = ours["steps"] / peer["steps"], ours["seconds"] / ours["steps"] / (peer["seconds"] / peer["steps"])
    return (
        f"= {steps:.2f}x {peer_name}'s transitions ({ours['steps']:.0f} against {peer['steps']:.0f}) "
        f"x {seconds:.2f}x its seconds per transition ({1e3 * ours['seconds'] / ours['steps']:.1f} against "
        f"{1e3 * peer['seconds'] / peer['steps']:.1f} s per 1k); 1/{1 / TARGET_RATIO:g} needs "
        f"{steps * seconds / TARGET_RATIO:.2f}x less time."
    )


def verdict(ratio: float, judged: bool) -> str:
    """Whether a ratio to the fastest peer meets the 1/5 target (nothing where the task has no such target)."""
    if not judged:
        return ""
    return f"; target <= {TARGET_RATIO}: " + ("met" if ratio <= TARGET_RATIO else "not met")


def join_invocation(runs: list[dict[str, Any]], args: argparse.Namespace) -> int:
    """
    ``args.join_invocation``, once checked to be a comparison on the same task, budget and evaluations (where its
    runs record them), and the same seed unless only FastTD3 joins (its other seeds are compared with the same peer
    runs).
    """
    joined = [run for run in runs if run["invocation"] == args.join_invocation]
    if not joined:
        raise SystemExit(f"--join-invocation {args.join_invocation}: no such comparison in the results file")
    wanted = {"env": args.env, "budget": args.budget}
    # The seed is the peers' runs' (FastTD3's other seeds may have joined), or that of the first run without peers
    seeded = [run for run in joined if run["algo"] != "fasttd3"] or joined[:1]
    for run in joined:
        seed = {"seed": args.seed} if set(args.algos) != {"fasttd3"} and any(run is other for other in seeded) else {}
        expected = {**wanted, **seed, **{key: value for key, value in evaluation_settings(args).items() if key in run}}
        found = {key: run[key] for key in expected}
        if found != expected:
            raise SystemExit(
                f"--join-invocation {args.join_invocation} ran with {found}, not {expected}: same settings needed"
            )
    return args.join_invocation


def plot(runs: list[dict[str, Any]], path: Path) -> None:
    """
    Return against training seconds and against environment steps: one line per run, one colour and legend entry
    per algorithm or variant (variants dashed).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    names = [run_name(run) for run in runs]
    colors = {name: f"C{i % 10}" for i, name in enumerate(dict.fromkeys(names))}
    for run, name, label in zip(runs, names, legend_labels(names), strict=True):
        style = {"color": colors[name], "linestyle": "--" if run.get("set") else "-", "label": label}
        for axis, key in zip(axes, ("seconds", "steps"), strict=True):
            values = [point[key] for point in run["curve"]]
            axis.plot(values, [point["return"] for point in run["curve"]], **style)
    axes[0].set(xlabel="training wall-clock (s, evaluation excluded)", ylabel="evaluation return")
    axes[1].set(xlabel="environment steps")
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{runs[-1]['env']}: evaluation return")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", nargs="+", choices=list(ALGOS), default=list(ALGOS))
    parser.add_argument("--env", default=DEFAULT_ENV)
    parser.add_argument("--budget", type=float, default=600.0, help="training seconds per algorithm")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-every", type=int, default=5000, help="environment steps between evaluations")
    parser.add_argument("--eval-episodes", type=int, default=3)
    parser.add_argument(
        "--thresholds", type=float, nargs="+", help="returns to time (kept in the record; default: the record's, or 3000 5000)"
    )
    parser.add_argument("--stop-at", type=float, help="end each run at its first evaluation returning at least this")
    parser.add_argument(
        "--join-invocation",
        type=int,
        help="add the runs to this earlier comparison (same task and budget; same seed unless only fasttd3 joins)",
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="FastTD3 hyperparameters replacing its entry's (a variant)"
    )
    parser.add_argument("--rewrite-markdown", action="store_true", help="only re-render the summary from the JSON")
    parser.add_argument("--worker", choices=list(ALGOS), help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.set and set(args.algos) != {"fasttd3"} and args.worker is None:
        parser.error("--set replaces hyperparameters of FastTD3's entry: give it with --algos fasttd3 only")
    parse_overrides(args.set)  # a malformed pair fails before any run
    if args.worker is not None:
        Path(args.output).write_text(json.dumps(run_worker(args)))
        return

    results_file = RESULTS_DIR / f"{results_name(args.env)}.json"
    results = json.loads(results_file.read_text()) if results_file.exists() else {"runs": []}
    if args.thresholds is not None:
        results["thresholds"] = args.thresholds
    args.thresholds = results.get("thresholds", DEFAULT_THRESHOLDS)
    if args.rewrite_markdown:
        if not results["runs"]:
            raise SystemExit(f"--rewrite-markdown: no runs on {args.env} in {results_file}")
        write_summary(results, args)
        return
    invocation = 1 + max((run["invocation"] for run in results["runs"]), default=0)
    if args.join_invocation is not None:
        invocation = join_invocation(results["runs"], args)
    for algo in args.algos:
        print(f"{algo}: {args.budget:g} s on {args.env}", flush=True)
        with tempfile.NamedTemporaryFile(suffix=".json") as output:
            worker = [sys.executable, "-m", "benchmarks.time_to_return", "--worker", algo, "--output", output.name]
            options = ["--env", args.env, "--budget", str(args.budget), "--seed", str(args.seed)]
            options += ["--eval-every", str(args.eval_every), "--eval-episodes", str(args.eval_episodes)]
            options += [] if args.stop_at is None else ["--stop-at", str(args.stop_at)]
            options += ["--set", *args.set] if args.set else []
            steal, machine = CpuSteal(), machine_info()  # the commit the run starts on
            subprocess.run(worker + options, check=True)
            run = json.loads(Path(output.name).read_text())
        run["cpu_steal_percent"] = steal.percent()
        results["runs"].append({**run, "invocation": invocation, "machine": machine})
        # Save after every algorithm: a long comparison interrupted halfway keeps what it measured
        results["machine"] = machine_info()
        write_summary(results, args)
        plot(results["runs"], RESULTS_DIR / f"{results_name(args.env)}.png")


def write_summary(results: dict[str, Any], args: argparse.Namespace) -> None:
    """The JSON results and their Markdown summary."""
    name = results_name(args.env)
    markdown = f"# Time to return on {args.env}\n\n" + summarize(results["runs"], args.thresholds)
    write_results(name, results, markdown + f"\n\n![curves]({name}.png)\n")


if __name__ == "__main__":
    main()
