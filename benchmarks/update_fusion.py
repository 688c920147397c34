"""
Whether fusing more of FastTD3's update pays on a CPU. The entry's update as it runs (the critic's loss compiled,
its backward, the AdamW steps and the target update eager, the actor's loss eager on a CPU) against:

- ``one graph``: the whole update (both losses, both backward passes through compiled autograd, both AdamW steps
  and the target update) compiled as one function;
- ``max-autotune``: the critic's loss compiled with ``mode="max-autotune-no-cudagraphs"`` (inductor tries its own
  GEMM kernels against ATen's).

Each variant updates its own copy of the entry's model (same seed, same replay buffer), in interleaved rounds in
a new random order each, pinned to one thread as the MuJoCo runs are. The first update of each variant starts from
the same state on the same batch: its critic loss is compared with the entry's.

    python -m benchmarks.update_fusion --rounds 7

Writes ``benchmarks/results/update_fusion.{json,md}``.
"""

import argparse
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np
import torch as th

from benchmarks.common import CpuSteal, machine_info, write_results
from benchmarks.time_to_return import make_model
from sb3_fasttd3 import FastTD3
from sb3_fasttd3.fasttd3.fasttd3 import _compile_for_this_model

Update = Callable[[Any], None]  # one update (critic and actor) on a batch


def entry_update(model: FastTD3) -> Update:
    """The update as ``train()`` runs it."""
    return partial(model._update, update_actor=True)


def one_graph_update(model: FastTD3) -> Update:
    """The same update, written as one function and compiled whole (backward passes by compiled autograd)."""

    def update(batch: Any) -> None:
        with model._autocast():
            critic_loss, q_mean = model._critic_loss(batch)
        model.critic.optimizer.zero_grad(set_to_none=True)
        critic_loss.backward(inputs=model._critic_params)
        model.critic.optimizer.step()
        model._update_statistics.add_critic_update(critic_loss, q_mean)
        with model._autocast():
            actor_loss = model._actor_loss(batch.observations)
        model.actor.optimizer.zero_grad(set_to_none=True)
        actor_loss.backward(inputs=model._actor_params)
        model.actor.optimizer.step()
        model._update_statistics.add_actor_update(actor_loss)
        with th.no_grad():
            th._foreach_lerp_(model._critic_target_params, model._critic_polyak_params, model.tau)

    th._dynamo.config.compiled_autograd = True  # read when the function is traced; eager backward passes keep theirs
    return th.compile(update)


def max_autotune_update(model: FastTD3) -> Update:
    """The entry's update with the critic's loss compiled by inductor's autotuning mode."""
    model._critic_loss_fn = _compile_for_this_model(model._critic_loss, "max-autotune-no-cudagraphs")
    return entry_update(model)


VARIANTS = {"entry": entry_update, "one graph": one_graph_update, "max-autotune": max_autotune_update}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env", default="HalfCheetah-v5")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--updates", type=int, default=200, help="updates per round and variant")
    parser.add_argument("--warmup", type=int, default=2000, help="transitions trained before timing")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    th.set_num_threads(args.threads)

    steal = CpuSteal()
    updates, first_losses = {}, {}
    batches = None
    for name, make_update in VARIANTS.items():
        model = make_model("fasttd3", args.env, seed=0)
        model.learn(model.learning_starts + args.warmup)
        model.policy.set_training_mode(True)
        if batches is None:  # drawn once: every variant updates on the same batches
            batches = [next(model._sample_batches(1, model.batch_size)) for _ in range(16)]
        updates[name] = make_update(model)
        model._update_statistics.means()  # forgets the warm-up's updates
        updates[name](batches[0])  # also compiles
        first_losses[name] = model._update_statistics.means()["critic_loss"]
        for batch in batches:
            updates[name](batch)
    seconds: dict[str, list[float]] = {name: [] for name in VARIANTS}
    rng = np.random.default_rng(0)
    for round_ in range(args.rounds):
        for name in rng.permutation(list(VARIANTS)):
            start = time.perf_counter()
            for i in range(args.updates):
                updates[name](batches[i % len(batches)])
            seconds[name].append((time.perf_counter() - start) / args.updates)
        print(f"round {round_ + 1}/{args.rounds} done", flush=True)

    reference = np.array(seconds["entry"])
    rows = [
        {
            "variant": name,
            "ms_per_update": 1e3 * float(np.median(times)),
            "speedup": float(np.median(reference / np.array(times))),
            "first_critic_loss": first_losses[name],
            "seconds": times,
        }
        for name, times in seconds.items()
    ]
    results = {"env": args.env, "threads": args.threads, "rows": rows, "cpu_steal_percent": steal.percent()}
    lines = [
        f"# Fusing more of the {args.env} entry's update",
        "",
        f"Milliseconds per update (actor step included), medians of {args.rounds} interleaved rounds of "
        f"{args.updates} updates, {args.threads} thread(s); speed-ups are per-round ratios to the entry's update. "
        f"The first critic loss of each variant, from the same state on the same batch, checks that it computes "
        f"the same update. CPU steal {steal.percent():.1f}%.",
        "",
        "| variant | ms per update | speed-up | first critic loss |",
        "| --- | --- | --- | --- |",
    ]
    lines += [
        f"| {row['variant']} | {row['ms_per_update']:.2f} | {row['speedup']:.2f}x | {row['first_critic_loss']:.6f} |"
        for row in rows
    ]
    write_results("update_fusion", {**results, "machine": machine_info()}, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
