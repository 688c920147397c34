"""Re-laying a replay buffer for another number of envs (``DeviceNStepReplayBuffer.relaid``), in either layout."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from tests.buffer_data import ACTION_SPACE, BOX_SPACE, DICT_SPACE, Episodes, add, sample_columns, stored_samples
from tests.test_normalized_samples import vec_normalize

SPACES = {"box": BOX_SPACE, "dict": DICT_SPACE}


def transitions(buffer: DeviceNStepReplayBuffer) -> th.Tensor:
    """Every stored transition, all fields as float64 columns, in a canonical (sorted) order."""
    columns = sample_columns(stored_samples(buffer))
    order = np.lexsort(columns.numpy().T[::-1])
    return columns[th.from_numpy(order)]


def filled(space: str, n_envs: int, rows: int, lean: bool, n_steps: int, n_adds: int, seed: int, **episode_kwargs):
    buffer = DeviceNStepReplayBuffer(
        rows * n_envs, SPACES[space], ACTION_SPACE, "cpu", n_envs, optimize_memory_usage=lean, n_steps=n_steps, gamma=0.9
    )
    episodes = Episodes(SPACES[space], n_envs, seed, **episode_kwargs)
    for _ in range(n_adds):
        add([buffer], episodes.step())
    return buffer


@settings(max_examples=40, deadline=None)
@given(
    space=st.sampled_from(sorted(SPACES)),
    n_envs=st.sampled_from([(1, 4), (4, 1), (3, 2), (2, 3), (4, 2), (3, 3)]),
    layouts=st.sampled_from([(False, False), (True, True), (False, True), (True, False)]),
    n_steps=st.sampled_from([1, 3]),
    n_adds=st.integers(min_value=1, max_value=25),
    p_end=st.sampled_from([0.05, 0.3]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_relaid_buffer_holds_every_transition(
    space: str, n_envs: tuple[int, int], layouts: tuple[bool, bool], n_steps: int, n_adds: int, p_end: float, seed: int
) -> None:
    source = filled(space, n_envs[0], 6, layouts[0], n_steps, n_adds, seed, p_terminate=p_end, p_truncate=p_end)
    before = transitions(source)
    relaid = source.relaid(n_envs[1], buffer_size=10, optimize_memory_usage=layouts[1])
    assert relaid.n_envs == n_envs[1] and relaid.optimize_memory_usage == layouts[1]
    # Nothing lost, nothing changed, nothing added; rows for buffer_size transitions (as a new buffer of buffer_size
    # would have), and for every stored one
    assert relaid.n_transitions == source.n_transitions
    assert relaid.buffer_size >= 10 // n_envs[1] and relaid.buffer_size * n_envs[1] >= source.n_transitions
    assert th.equal(transitions(relaid), before)
    assert th.equal(transitions(source), before)  # the source is left as it was
    assert not relaid.open_windows.any()
    # Sampling draws stored transitions only (an env may hold one row fewer)
    set_random_seed(seed)
    stored = {tuple(row) for row in before.tolist()}
    assert {tuple(row) for row in sample_columns(relaid.sample(200)).tolist()} <= stored
    # Its windows are closed: adding more transitions changes none of those stored (until they are overwritten)
    episodes = Episodes(SPACES[space], n_envs[1], seed + 1)
    free_rows = relaid.buffer_size - relaid.size()
    for _ in range(free_rows):
        add([relaid], episodes.step())
    assert stored <= {tuple(row) for row in transitions(relaid).tolist()}


@pytest.mark.parametrize("lean", [False, True])
def test_relaid_twice_with_a_short_env(lean: bool) -> None:
    # 3 envs of 7 rows -> 2 envs (11 and 10 rows) -> 4 envs: transitions and samples survive both
    source = filled("box", 3, 7, lean, n_steps=3, n_adds=9, seed=0, p_terminate=0.1)
    once = source.relaid(2, buffer_size=0)
    assert once.size() == 11 and once.n_transitions == 21 and once.buffer_size == 11
    twice = once.relaid(4)
    assert th.equal(transitions(twice), transitions(source))
    episodes = Episodes(BOX_SPACE, 4, seed=1)
    for _ in range(20):  # wraps around: the oldest rows (the short env's included) are overwritten
        add([twice], episodes.step())
    assert twice.full and twice.n_transitions == twice.buffer_size * 4


def test_lean_relay_stays_lean() -> None:
    # Long episodes, 4 envs -> 2 envs: each new env's rows are two old envs' rows one after the other; only the
    # windows that end at an old env's newest row (one per row of the window: n_steps) keep their next observation
    # in the store, not the 200 transitions
    source = filled("box", 4, 50, True, n_steps=3, n_adds=80, seed=0, p_terminate=0.0, p_truncate=0.0)
    relaid = source.relaid(2)
    stored = int(relaid._final_obs.head - relaid._final_obs.tail)
    assert stored == 4 * 3, stored
    assert th.equal(transitions(relaid), transitions(source))


def test_vec_normalize_refuses_split_windows_while_they_are_stored() -> None:
    # 1 env -> 2 envs: the windows that reach over the cut have lost the rows of their one-step rewards
    source = filled("box", 1, 12, False, n_steps=3, n_adds=12, seed=0, p_terminate=0.0, p_truncate=0.0)
    relaid = source.relaid(2)
    env = vec_normalize(BOX_SPACE, seed=0)
    with pytest.raises(ValueError, match="re-laid for another n_envs"):
        relaid.sample(8, env)
    # Observations alone normalize
    env.norm_reward = False
    relaid.sample(8, env)
    # Once the split windows are overwritten, rewards normalize again
    env.norm_reward = True
    episodes = Episodes(BOX_SPACE, 2, seed=1)
    for _ in range(relaid.buffer_size):
        add([relaid], episodes.step())
    relaid.sample(8, env)
    # 4 envs -> 2 envs cuts no window (each new env gets whole old envs)
    assert not filled("box", 4, 6, False, n_steps=3, n_adds=9, seed=0).relaid(2)._has_split_windows


def test_relaid_empty_buffer_stays_unallocated() -> None:
    source = DeviceNStepReplayBuffer(12, BOX_SPACE, ACTION_SPACE, "cpu", 2, n_steps=2)
    relaid = source.relaid(3, buffer_size=30)
    assert not relaid.is_allocated and relaid.buffer_size == 10 and relaid.n_envs == 3
    small = source.relaid(5, buffer_size=1)  # a window needs n_steps + 1 rows
    assert small.buffer_size == 3


def test_relaid_image_observations() -> None:
    space = spaces.Box(0, 255, (3, 3, 1), np.uint8)
    source = DeviceNStepReplayBuffer(20, space, ACTION_SPACE, "cpu", 2, optimize_memory_usage=True, n_steps=2)
    rng = np.random.default_rng(0)
    obs = rng.integers(0, 256, (2, 3, 3, 1), dtype=np.uint8)
    for step in range(13):
        next_obs = rng.integers(0, 256, (2, 3, 3, 1), dtype=np.uint8)
        done = np.array([step % 4 == 3, False])
        source.add(obs, next_obs, np.zeros((2, 2)), np.ones(2), done, [{}, {}])
        obs = np.where(done[:, None, None, None], rng.integers(0, 256, (2, 3, 3, 1), dtype=np.uint8), next_obs)
    for lean in (False, True):
        relaid = source.relaid(3, optimize_memory_usage=lean)
        assert relaid._images.dtype == th.uint8
        assert th.equal(transitions(relaid), transitions(source))
