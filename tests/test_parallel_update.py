"""``parallel_actor_update``: the actor's gradient on the critic before its step, the halves on two threads."""

import threading
from contextlib import contextmanager

import pytest
import torch as th

from sb3_fasttd3.common.half_threads import HalfThreads
from tests.test_fasttd3 import make_model
from tests.test_sb3_compat import BatchNormExtractor


@contextmanager
def torch_threads(n: int):
    before = th.get_num_threads()
    th.set_num_threads(n)
    try:
        yield
    finally:
        th.set_num_threads(before)


def trained_in_place(threads: int, updates: int = 6, **kwargs):
    """A model that collected without updating, then ran ``updates`` updates with ``threads`` torch threads."""
    model = make_model(2, learning_starts=1000, **{"policy_delay": 1, **kwargs})
    with torch_threads(1):
        model.learn(60)
    with torch_threads(threads):
        model.train(gradient_steps=updates, batch_size=16)
        assert th.get_num_threads() == threads  # restored after the halves
    return model


def params(model) -> list[th.Tensor]:
    return [*model.critic.parameters(), *model.actor.parameters(), *model.critic_target.parameters()]


def assert_same(first, second) -> None:
    for a, b in zip(params(first), params(second), strict=True):
        assert th.equal(a, b)


def test_two_threads_give_the_one_thread_result():
    # Each half runs on one thread of two, as the sequential halves do on one: the same numbers
    on_two = trained_in_place(2, parallel_actor_update=True)
    on_one = trained_in_place(1, parallel_actor_update=True)
    assert on_two._half_threads is not None and on_one._halves is None
    assert_same(on_two, on_one)


def test_the_actor_reads_the_critic_before_its_step():
    # With a frozen critic both orders are the same update; otherwise only the actor's step differs
    frozen = dict(critic_learning_rate=0.0)
    assert_same(trained_in_place(1, parallel_actor_update=True, **frozen), trained_in_place(1, **frozen))
    parallel, sequential = trained_in_place(1, 1, parallel_actor_update=True), trained_in_place(1, 1)
    for a, b in zip(parallel.critic.parameters(), sequential.critic.parameters(), strict=True):
        assert th.equal(a, b)
    assert not all(th.equal(a, b) for a, b in zip(parallel.actor.parameters(), sequential.actor.parameters(), strict=True))


def test_no_second_thread_with_batch_norm_or_one_thread():
    norm = trained_in_place(2, parallel_actor_update=True, policy_kwargs=dict(features_extractor_class=BatchNormExtractor))
    assert norm._halves is None and norm._half_threads is None
    assert trained_in_place(1, parallel_actor_update=True)._half_threads is None


def test_the_policy_delay_holds_and_both_halves_are_counted():
    model = trained_in_place(2, updates=6, parallel_actor_update=True, policy_delay=2)
    sums = dict(zip(model._update_statistics.FIELDS, model._update_statistics.sums.tolist(), strict=True))
    assert (sums["critic_updates"], sums["actor_updates"]) == (6, 3)
    assert sums["critic_loss"] > 0 and sums["actor_loss"] != 0


def test_learns_through_learn_on_two_threads():
    model = make_model(2, parallel_actor_update=True, learning_starts=20)
    before = [param.clone() for param in model.actor.parameters()]
    with torch_threads(2):
        model.learn(60)
    assert model._half_threads is not None
    assert not any(th.equal(a, b) for a, b in zip(model.actor.parameters(), before, strict=True))


def test_half_threads_runs_both_and_shares_the_threads():
    seen = {}

    def record(name):
        seen[name] = (threading.current_thread().name, th.get_num_threads())
        return name

    halves = HalfThreads()
    with torch_threads(2):
        with pytest.raises(RuntimeError, match="halved"):
            halves.run(lambda: None, lambda: None)
        with halves.halved():
            assert halves.run(lambda: record("main"), lambda: record("side")) == ("main", "side")
            with halves.halved():  # nested: unchanged
                assert th.get_num_threads() == 1
        assert th.get_num_threads() == 2 and not halves.active
    assert seen["main"] == (threading.current_thread().name, 1)
    assert seen["side"][0] != seen["main"][0] and seen["side"][1] == 1


def test_half_threads_waits_for_the_side_and_raises_its_error():
    finished = threading.Event()

    def side():
        finished.wait(5)
        raise RuntimeError("side failed")

    halves = HalfThreads()
    with torch_threads(2), pytest.raises(RuntimeError, match="side failed"), halves.halved():
        halves.run(finished.set, side)
    assert th.get_num_threads() == 2
