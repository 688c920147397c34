"""
The replay buffer's two layouts (``optimize_memory_usage``) and its uint8 image storage: the lean layout gives the
full layout's samples on the same data, the sampling kernels give the plain path's samples, and the lean layout
stores about what a transition needs.
"""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common import row_sampling
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.final_observations import FinalObservationStore
from sb3_fasttd3.common.replay_layout import LAG_BASE
from tests.buffer_data import (
    ACTION_SPACE,
    BOX_SPACE,
    DICT_SPACE,
    IMAGE_SPACE,
    Episodes,
    add,
    assert_same_samples,
    sample_columns,
    stored_samples,
)
from tests.envs import CountingEnv

SPACES = {"box": BOX_SPACE, "image": IMAGE_SPACE, "dict": DICT_SPACE}


def both_layouts(space: spaces.Space, rows: int, n_envs: int, **kwargs) -> list[DeviceNStepReplayBuffer]:
    return [
        DeviceNStepReplayBuffer(rows * n_envs, space, ACTION_SPACE, "cpu", n_envs, optimize_memory_usage=lean, **kwargs)
        for lean in (False, True)
    ]


@settings(max_examples=40, deadline=None)
@given(
    space=st.sampled_from(sorted(SPACES)),
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([1, 3]),
    rows=st.sampled_from([4, 7]),
    n_adds=st.integers(min_value=1, max_value=60),
    # From episodes of one step to long ones
    p_end=st.sampled_from([0.0, 0.15, 1.0]),
    handle_timeout=st.booleans(),
    closes=st.lists(st.integers(min_value=0, max_value=60), max_size=3),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_lean_layout_samples_what_the_full_layout_samples(
    space: str,
    n_envs: int,
    n_steps: int,
    rows: int,
    n_adds: int,
    p_end: float,
    handle_timeout: bool,
    closes: list[int],
    seed: int,
) -> None:
    # Same adds (wrapping around the ring many times, terminations and truncations in the middle of windows,
    # windows closed and envs reset in the middle of episodes), the same transitions: every field equal
    if n_steps >= rows:
        n_steps = rows - 1
    buffers = both_layouts(SPACES[space], rows, n_envs, n_steps=n_steps, gamma=0.9, handle_timeout_termination=handle_timeout)
    episodes = Episodes(SPACES[space], n_envs, seed, p_terminate=p_end / 2, p_truncate=p_end / 2)
    for step in range(n_adds):
        if step in closes:
            for buffer in buffers:
                buffer.close_windows()
            episodes.reset()
        add(buffers, episodes.step())
    full, lean = buffers
    assert full.n_transitions == lean.n_transitions == n_envs * min(n_adds, rows)
    assert lean.ring_rows == rows + 1 and lean.buffer_size == full.buffer_size == rows
    # Final observations of overwritten rows are released: at most one entry per stored transition
    assert int(lean._final_obs.head - lean._final_obs.tail) <= lean.n_transitions
    assert_same_samples(stored_samples(full), stored_samples(lean))
    # Both draw the same transitions from the same seed
    set_random_seed(seed)
    full_batch = full.sample(64)
    set_random_seed(seed)
    assert_same_samples(full_batch, lean.sample(64))
    # Closing the windows changes no sample
    for buffer in buffers:
        buffer.close_windows()
    assert_same_samples(stored_samples(full), stored_samples(lean))


@settings(max_examples=30, deadline=None)
@given(
    space=st.sampled_from(sorted(SPACES)),
    lean=st.booleans(),
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([2, 3]),
    rows=st.sampled_from([4, 7]),
    one_step=st.lists(st.one_of(st.booleans(), st.integers(min_value=0, max_value=7)), min_size=1, max_size=30),
    p_end=st.sampled_from([0.0, 0.15]),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_one_step_returns_for_the_rows_added_while_asked(
    space: str, lean: bool, n_envs: int, n_steps: int, rows: int, one_step: list[bool | int], p_end: float, seed: int
) -> None:
    # A row added with one_step_returns (for all envs, or for its env in a mask, an int's bits here) samples as with
    # n_steps=1, any other as with n_steps, whenever the flag or the mask changes
    def make(steps: int) -> DeviceNStepReplayBuffer:
        kwargs = dict(optimize_memory_usage=lean, n_steps=steps, gamma=0.9)
        return DeviceNStepReplayBuffer(rows * n_envs, SPACES[space], ACTION_SPACE, "cpu", n_envs, **kwargs)

    one, full, switched = make(1), make(n_steps), make(n_steps)
    episodes = Episodes(SPACES[space], n_envs, seed, p_terminate=p_end / 2, p_truncate=p_end / 2)
    masks = []
    for flag in one_step:
        mask = th.full((n_envs,), flag) if isinstance(flag, bool) else (flag >> th.arange(n_envs)) % 2 == 1
        switched.one_step_returns = flag if isinstance(flag, bool) else mask
        masks.append(mask)
        add([one, full, switched], episodes.step())
    kept = min(len(one_step), rows)
    row_is_one_step = th.stack(masks[-kept:]).reshape(-1, 1)
    expected = th.where(row_is_one_step, sample_columns(stored_samples(one)), sample_columns(stored_samples(full)))
    assert th.equal(sample_columns(stored_samples(switched)), expected)


@pytest.mark.parametrize("space", sorted(SPACES))
def test_samples_have_the_spaces_shapes_and_dtypes(space: str) -> None:
    for buffer in both_layouts(SPACES[space], 6, 2, n_steps=2):
        episodes = Episodes(SPACES[space], 2, seed=0)
        for _ in range(9):
            add([buffer], episodes.step())
        samples = buffer.sample(10)
        for field in ("observations", "next_observations"):
            value = getattr(samples, field)
            if space == "dict":
                assert value["state"].shape == (10, 5) and value["state"].dtype == th.float32
                assert value["pixels"].shape == (10, 4, 3, 2) and value["pixels"].dtype == th.uint8
                assert value["count"].shape == (10, 1) and value["count"].dtype == th.float32
            elif space == "image":
                assert value.shape == (10, 4, 3, 2) and value.dtype == th.uint8
            else:
                assert value.shape == (10, 5) and value.dtype == th.float32
        # Images are stored as uint8, not float32
        if space != "box":
            assert buffer._images is not None and buffer._images.dtype == th.uint8
            observations = buffer.observations
            pixels = observations["pixels"] if space == "dict" else observations
            assert pixels.dtype == th.uint8 and pixels.shape == (2, buffer.ring_rows, 4, 3, 2)


@pytest.mark.skipif(row_sampling._kernels() is None, reason="needs the sampling kernels")
@pytest.mark.parametrize("space", ["image", "dict"])
@pytest.mark.parametrize("lean", [False, True])
def test_kernels_and_plain_path_give_the_same_samples(monkeypatch: pytest.MonkeyPatch, space: str, lean: bool) -> None:
    n_envs = 3
    buffer = DeviceNStepReplayBuffer(
        20 * n_envs, SPACES[space], ACTION_SPACE, "cpu", n_envs, optimize_memory_usage=lean, n_steps=3
    )
    episodes = Episodes(SPACES[space], n_envs, seed=1, p_terminate=0.2)
    for _ in range(50):
        add([buffer], episodes.step())
    set_random_seed(2)
    samples = buffer.sample(5000)  # draws, gathers and finds the next observations in the kernels
    set_random_seed(2)
    draws = row_sampling.kernel_indices(row_sampling.draw_seed(), buffer.n_transitions, 5000)
    flat = (draws + buffer._oldest()) % (buffer.ring_rows * n_envs)
    monkeypatch.setenv("SB3_FASTTD3_NATIVE_SAMPLING", "0")
    row_sampling._kernels.cache_clear()
    try:
        assert_same_samples(samples, stored_samples(buffer, flat))
    finally:
        row_sampling._kernels.cache_clear()


@pytest.mark.parametrize("space", ["box", "dict"])
def test_lean_layout_pickles_and_moves(tmp_path, space: str) -> None:
    _, lean = both_layouts(SPACES[space], 5, 2, n_steps=3)
    episodes = Episodes(SPACES[space], 2, seed=3, p_terminate=0.3)
    for _ in range(13):
        add([lean], episodes.step())
    save_to_pkl(tmp_path / "buffer.pkl", lean)
    loaded = load_from_pkl(tmp_path / "buffer.pkl")
    assert loaded.optimize_memory_usage and loaded.n_transitions == lean.n_transitions
    assert_same_samples(stored_samples(lean), stored_samples(loaded))
    # Adding to both goes on the same way (the final-observation store came along)
    for _ in range(7):
        add([lean, loaded], episodes.step())
    assert_same_samples(stored_samples(lean), stored_samples(loaded))
    loaded.to("meta")
    assert all(tensor.device == th.device("meta") for tensor in loaded._final_obs.tensors())


def test_lean_layout_has_no_next_observation_storage() -> None:
    _, lean = both_layouts(BOX_SPACE, 5, 1)
    add([lean], Episodes(BOX_SPACE, 1, seed=0).step())
    with pytest.raises(ValueError, match="optimize_memory_usage=True"):
        _ = lean.next_observations


def test_lean_layout_bytes_per_transition() -> None:
    # Long episodes: obs + action + 3 scalars, and the one-step reward and flags (5 bytes) beside them
    obs_dim, action_dim, n_envs, rows = 17, 6, 2, 3000
    observation_space = spaces.Box(-np.inf, np.inf, (obs_dim,), np.float32)
    action_space = spaces.Box(-1, 1, (action_dim,), np.float32)
    sizes = {}
    for lean in (False, True):
        buffer = DeviceNStepReplayBuffer(
            rows * n_envs, observation_space, action_space, "cpu", n_envs, optimize_memory_usage=lean, n_steps=3
        )
        rng = np.random.default_rng(0)
        obs = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
        for step in range(rows + rows // 2):
            next_obs = rng.normal(size=(n_envs, obs_dim)).astype(np.float32)
            done = np.full(n_envs, step % 1000 == 999)
            buffer.add(obs, next_obs, np.zeros((n_envs, action_dim)), np.ones(n_envs), done, [{}] * n_envs)
            obs = next_obs
        sizes[lean] = buffer.storage_nbytes() / buffer.n_transitions
    needed = (obs_dim + action_dim + 3) * 4
    assert sizes[True] <= 1.1 * needed, sizes
    assert sizes[False] >= needed + obs_dim * 4, sizes


def test_final_observation_store_keeps_its_entries_through_resizes() -> None:
    store = FinalObservationStore(float_width=2, image_width=3, n_envs=4, device=th.device("cpu"), check_every=2)
    assert store.capacity == 8
    references, values = [], []
    for step in range(40):
        mask = th.tensor([True, step % 2 == 0, False, True])
        floats = th.arange(8, dtype=th.float32).reshape(4, 2) + 10 * step
        images = (th.arange(12).reshape(4, 3) + step).to(th.uint8)
        refs = store.append(floats, images, mask)
        references += refs[mask].tolist()
        values += [(f.tolist(), i.tolist()) for f, i in zip(floats[mask], images[mask], strict=True)]
    assert int(store.head) == len(references) == 100 and store.capacity >= 100
    # Every entry is where its reference says, after the resizes
    slots = store.slots(th.tensor(references, dtype=th.int32))
    floats, images = store.tables()
    assert [(f.tolist(), i.tolist()) for f, i in zip(floats[slots], images[slots], strict=True)] == values
    assert all(ref < LAG_BASE for ref in references)
    # Released entries free their room: the ring shrinks at a later check
    store.release(th.tensor(96))
    for _ in range(4):
        store.append(th.zeros(4, 2), th.zeros(4, 3, dtype=th.uint8), th.zeros(4, dtype=th.bool))
    assert store.capacity < 100 and int(store.head) == 100
    kept = store.slots(th.tensor(references[96:], dtype=th.int32))
    assert [(f.tolist(), i.tolist()) for f, i in zip(store.floats[kept], store.images[kept], strict=True)] == values[96:]


def test_fasttd3_trains_the_same_with_either_layout() -> None:
    # Same seed: the layouts store, draw and sample the same transitions, so the updates are the same
    parameters = {}
    for lean in (False, True):
        env = make_vec_env(CountingEnv, n_envs=4, seed=0, env_kwargs=dict(max_steps=7))
        model = FastTD3(
            "MlpPolicy",
            env,
            seed=0,
            n_steps=3,
            buffer_size=200,  # wraps around
            optimize_memory_usage=lean,
            batch_size=16,
            learning_starts=20,
            num_atoms=11,
            policy_kwargs=dict(net_arch=dict(pi=[16], qf=[32, 16])),
        )
        model.learn(400)
        assert model.replay_buffer.optimize_memory_usage == lean
        parameters[lean] = th.cat([parameter.detach().flatten() for parameter in model.policy.parameters()])
    assert th.equal(parameters[False], parameters[True])


def test_lean_layout_accepts_lists() -> None:
    _, lean = both_layouts(spaces.Box(-1, 1, (2,), np.float32), 5, 1, n_steps=2)
    for done in ([False], [True], [False]):
        lean.add([[0.0, 1.0]], [[1.0, 2.0]], [[0.0, 0.0]], [1.0], done, [{}])
    assert th.equal(lean.sample(4).next_observations, th.tensor([[1.0, 2.0]] * 4))
