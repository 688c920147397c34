"""Tests for the device replay buffer with n-step returns (``sb3_fasttd3.common.buffers``)."""

from typing import Any

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st
from stable_baselines3.common.buffers import NStepReplayBuffer
from stable_baselines3.common.save_util import load_from_pkl, save_to_pkl
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from tests.device import TEST_DEVICE

OBS_DIM = 8
ACTION_DIM = 2
BOX_OBS_SPACE = spaces.Box(-np.inf, np.inf, shape=(OBS_DIM,), dtype=np.float32)
# Same content as the Box space, split into two keys of different shapes: "a" = obs[:2], "b" = obs[2:].reshape(2, 3)
DICT_OBS_SPACE = spaces.Dict(
    {
        "a": spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32),
        "b": spaces.Box(-np.inf, np.inf, shape=(2, 3), dtype=np.float32),
    }
)
ACTION_SPACE = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)


def make_trajectory(
    rng: np.random.Generator, n_adds: int, n_envs: int, p_terminate: float = 0.15, p_truncate: float = 0.1
) -> list[dict[str, np.ndarray]]:
    """
    Random vectorized-env transitions. Each observation carries its identity:
    ``obs[e, 0] = step * n_envs + e`` (unique id), ``next_obs[e, 0] = id + 0.5``,
    and ``obs[e, 1] = next_obs[e, 1] = episode index`` of env ``e``.
    """
    episode = np.zeros(n_envs)
    steps = []
    for step in range(n_adds):
        ids = step * n_envs + np.arange(n_envs)
        obs = rng.normal(size=(n_envs, OBS_DIM)).astype(np.float32)
        next_obs = rng.normal(size=(n_envs, OBS_DIM)).astype(np.float32)
        obs[:, 0], obs[:, 1] = ids, episode
        next_obs[:, 0], next_obs[:, 1] = ids + 0.5, episode
        terminated = rng.random(n_envs) < p_terminate
        # As in SB3 VecEnvs: "TimeLimit.truncated" is only set when not terminated
        truncated = (rng.random(n_envs) < p_truncate) & ~terminated
        done = terminated | truncated
        steps.append(
            {
                "obs": obs,
                "next_obs": next_obs,
                "action": rng.uniform(-1, 1, size=(n_envs, ACTION_DIM)).astype(np.float32),
                "reward": rng.normal(size=n_envs).astype(np.float32),
                "done": done,
                "truncated": truncated,
            }
        )
        episode = episode + done
    return steps


def to_dict_obs(obs: np.ndarray) -> dict[str, np.ndarray]:
    return {"a": obs[:, :2].copy(), "b": obs[:, 2:].reshape(-1, 2, 3).copy()}


def infos_from(truncated: np.ndarray) -> list[dict[str, Any]]:
    return [{"TimeLimit.truncated": True} if flag else {} for flag in truncated]


def fill(buffer: DeviceNStepReplayBuffer, steps: list[dict[str, np.ndarray]], dict_obs: bool = False) -> None:
    for step in steps:
        obs, next_obs = step["obs"], step["next_obs"]
        if dict_obs:
            obs, next_obs = to_dict_obs(obs), to_dict_obs(next_obs)
        buffer.add(obs, next_obs, step["action"], step["reward"], step["done"], infos_from(step["truncated"]))


def expected_nstep(
    steps: list[dict[str, np.ndarray]], start: int, env: int, n_steps: int, gamma: float, handle_timeout: bool
) -> tuple[float, float, np.ndarray, float]:
    """Brute-force n-step transition starting at insertion step ``start`` of env ``env``."""
    newest = len(steps) - 1
    n_step_return = 0.0
    for k in range(n_steps):
        step = steps[start + k]
        n_step_return += gamma**k * float(step["reward"][env])
        done = bool(step["done"][env])
        timeout = handle_timeout and bool(step["truncated"][env])
        if done or timeout or start + k == newest or k == n_steps - 1:
            return n_step_return, gamma ** (k + 1), step["next_obs"][env], float(done and not timeout)
    raise AssertionError("unreachable")


def storage(buffer: DeviceNStepReplayBuffer) -> dict[str, th.Tensor | None]:
    """Storage tensors of a buffer, dict observations flattened as ``observations/<key>``."""
    result: dict[str, th.Tensor | None] = {}
    names = ("observations", "next_observations", "actions", "rewards", "dones", "timeouts")
    for name in (*names, "n_step_returns", "discounts", "terminals"):
        value = getattr(buffer, name)
        if isinstance(value, dict):
            result.update({f"{name}/{key}": tensor for key, tensor in value.items()})
        else:
            result[name] = value
    return result


def assert_same_storage(buffer_a: DeviceNStepReplayBuffer, buffer_b: DeviceNStepReplayBuffer) -> None:
    storage_a, storage_b = storage(buffer_a), storage(buffer_b)
    assert storage_a.keys() == storage_b.keys()
    for name, tensor in storage_a.items():
        assert tensor is not None and storage_b[name] is not None, name
        assert tensor.dtype == storage_b[name].dtype, name
        assert th.equal(tensor, storage_b[name]), name
    assert (buffer_a.pos, buffer_a.full) == (buffer_b.pos, buffer_b.full)


def assert_same_samples(samples_a, samples_b) -> None:
    for field in samples_a._fields:
        value_a, value_b = getattr(samples_a, field), getattr(samples_b, field)
        if isinstance(value_a, dict):
            assert value_a.keys() == value_b.keys()
            for key in value_a:
                assert th.equal(value_a[key], value_b[key]), f"{field}/{key}"
        else:
            assert th.equal(value_a, value_b), field


@pytest.mark.device
@settings(max_examples=30, deadline=None)
@given(
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([1, 3, 5]),
    rows_per_env=st.sampled_from([6, 7]),
    n_adds=st.integers(min_value=1, max_value=25),
    gamma=st.sampled_from([0.5, 0.9, 1.0]),
    handle_timeout=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_nstep_matches_brute_force(
    n_envs: int, n_steps: int, rows_per_env: int, n_adds: int, gamma: float, handle_timeout: bool, seed: int
) -> None:
    steps = make_trajectory(np.random.default_rng(seed), n_adds, n_envs)
    buffer = DeviceNStepReplayBuffer(
        rows_per_env * n_envs,
        BOX_OBS_SPACE,
        ACTION_SPACE,
        device=TEST_DEVICE,
        n_envs=n_envs,
        handle_timeout_termination=handle_timeout,
        n_steps=n_steps,
        gamma=gamma,
    )
    fill(buffer, steps)
    assert buffer.size() == min(n_adds, rows_per_env)

    set_random_seed(seed)
    batch_size = 64
    samples = buffer.sample(batch_size)
    assert samples.observations.shape == (batch_size, OBS_DIM)
    assert samples.next_observations.shape == (batch_size, OBS_DIM)
    assert samples.actions.shape == (batch_size, ACTION_DIM)
    for field in ("rewards", "dones", "discounts"):
        assert getattr(samples, field).shape == (batch_size, 1), field
    for tensor in samples:
        assert tensor.dtype == th.float32

    oldest_stored = max(0, n_adds - rows_per_env)
    for i in range(batch_size):
        sample_id = round(float(samples.observations[i, 0]))
        start, env = divmod(sample_id, n_envs)
        # Only transitions that are still stored can be sampled
        assert oldest_stored <= start < n_adds
        np.testing.assert_array_equal(samples.observations[i].cpu().numpy(), steps[start]["obs"][env])
        np.testing.assert_array_equal(samples.actions[i].cpu().numpy(), steps[start]["action"][env])

        n_step_return, discount, next_obs, done = expected_nstep(steps, start, env, n_steps, gamma, handle_timeout)
        np.testing.assert_allclose(float(samples.rewards[i, 0]), n_step_return, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(float(samples.discounts[i, 0]), discount, rtol=1e-6)
        np.testing.assert_array_equal(samples.next_observations[i].cpu().numpy(), next_obs)
        assert float(samples.dones[i, 0]) == done


@settings(max_examples=15, deadline=None)
@given(
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([3, 5]),
    n_adds=st.integers(min_value=1, max_value=30),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_no_sample_crosses_write_pointer(n_envs: int, n_steps: int, n_adds: int, seed: int) -> None:
    # Rare terminations: long windows, that often reach the newest row
    steps = make_trajectory(np.random.default_rng(seed), n_adds, n_envs, p_terminate=0.05, p_truncate=0.05)
    rows_per_env = 7
    buffer = DeviceNStepReplayBuffer(
        rows_per_env * n_envs, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=n_envs, n_steps=n_steps
    )
    fill(buffer, steps)
    timeouts_before = buffer.timeouts.clone()

    set_random_seed(seed)
    samples = buffer.sample(256)
    # Sampling does not modify the storage (the newest row is only treated as truncated while sampling)
    assert th.equal(buffer.timeouts, timeouts_before)

    start_ids = samples.observations[:, 0].round().long().numpy()
    last_ids = (samples.next_observations[:, 0] - 0.5).round().long().numpy()
    start_steps, start_envs = np.divmod(start_ids, n_envs)
    last_steps, last_envs = np.divmod(last_ids, n_envs)
    np.testing.assert_array_equal(last_envs, start_envs)
    assert np.all(last_steps >= start_steps)
    assert np.all(last_steps - start_steps < n_steps)
    # Never past the newest row, nor into data older than the oldest stored row
    assert np.all(last_steps <= n_adds - 1)
    assert np.all(start_steps >= n_adds - rows_per_env)
    # Same episode (column 1 is the episode index)
    np.testing.assert_array_equal(samples.next_observations[:, 1].numpy(), samples.observations[:, 1].numpy())


def make_hand_trajectory() -> list[dict[str, np.ndarray]]:
    """
    One env, 7 steps with rewards 1, 2, 4, ..., 64:
    step 2 is truncated (time limit), step 4 is terminated, step 6 is the newest row.
    """
    steps = []
    for step in range(7):
        obs = np.array([[step, 0.0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
        next_obs = np.array([[step + 0.5, 0.0, 0, 0, 0, 0, 0, 0]], dtype=np.float32)
        if step == 2:
            next_obs[0, 2:] = [7.0, -7.0, 3.0, 1.0, 2.0, 9.0]  # the stored final observation of the truncated episode
        steps.append(
            {
                "obs": obs,
                "next_obs": next_obs,
                "action": np.zeros((1, ACTION_DIM), dtype=np.float32),
                "reward": np.array([2.0**step], dtype=np.float32),
                "done": np.array([step in (2, 4)]),
                "truncated": np.array([step == 2]),
            }
        )
    return steps


@pytest.mark.parametrize("handle_timeout", [True, False])
def test_truncation_bootstraps_termination_does_not(handle_timeout: bool) -> None:
    steps = make_hand_trajectory()
    buffer = DeviceNStepReplayBuffer(
        10, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", handle_timeout_termination=handle_timeout, n_steps=3, gamma=0.5
    )
    fill(buffer, steps)
    truncation_done = 0.0 if handle_timeout else 1.0
    # start row: (n-step return, discount, id of the last row used, done), computed by hand with gamma = 0.5
    expected = {
        0: (1 + 0.5 * 2 + 0.25 * 4, 0.125, 2, truncation_done),
        1: (2 + 0.5 * 4, 0.25, 2, truncation_done),
        2: (4.0, 0.5, 2, truncation_done),
        3: (8 + 0.5 * 16, 0.25, 4, 1.0),
        4: (16.0, 0.5, 4, 1.0),
        5: (32 + 0.5 * 64, 0.25, 6, 0.0),  # the newest row bootstraps
        6: (64.0, 0.5, 6, 0.0),
    }
    set_random_seed(0)
    samples = buffer.sample(300)
    seen = set()
    for i in range(300):
        start = round(float(samples.observations[i, 0]))
        seen.add(start)
        n_step_return, discount, last_row, done = expected[start]
        assert float(samples.rewards[i, 0]) == n_step_return
        assert float(samples.discounts[i, 0]) == discount
        assert float(samples.next_observations[i, 0]) == last_row + 0.5
        assert float(samples.dones[i, 0]) == done
        if last_row == 2:
            np.testing.assert_array_equal(samples.next_observations[i].numpy(), steps[2]["next_obs"][0])
    assert seen == set(expected)


@settings(max_examples=10, deadline=None)
@given(
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([1, 3]),
    n_adds=st.integers(min_value=1, max_value=15),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_dict_observations_match_box(n_envs: int, n_steps: int, n_adds: int, seed: int) -> None:
    steps = make_trajectory(np.random.default_rng(seed), n_adds, n_envs)
    kwargs = dict(device="cpu", n_envs=n_envs, n_steps=n_steps, gamma=0.9)
    box_buffer = DeviceNStepReplayBuffer(6 * n_envs, BOX_OBS_SPACE, ACTION_SPACE, **kwargs)
    dict_buffer = DeviceNStepReplayBuffer(6 * n_envs, DICT_OBS_SPACE, ACTION_SPACE, **kwargs)
    fill(box_buffer, steps)
    fill(dict_buffer, steps, dict_obs=True)
    assert isinstance(dict_buffer.observations, dict)
    assert dict_buffer.observations["b"].shape == (n_envs, 6, 2, 3)

    set_random_seed(seed)
    box_samples = box_buffer.sample(40)
    set_random_seed(seed)
    dict_samples = dict_buffer.sample(40)
    assert isinstance(dict_samples.observations, dict) and isinstance(dict_samples.next_observations, dict)
    for field in ("observations", "next_observations"):
        box_obs, dict_obs = getattr(box_samples, field), getattr(dict_samples, field)
        assert dict_obs["a"].shape == (40, 2) and dict_obs["b"].shape == (40, 2, 3)
        assert th.equal(dict_obs["a"], box_obs[:, :2])
        assert th.equal(dict_obs["b"], box_obs[:, 2:].reshape(40, 2, 3))
    for field in ("actions", "rewards", "dones", "discounts"):
        assert th.equal(getattr(dict_samples, field), getattr(box_samples, field)), field


@pytest.mark.parametrize("dict_obs", [False, True])
def test_numpy_and_torch_inputs_identical(dict_obs: bool) -> None:
    n_envs = 3
    steps = make_trajectory(np.random.default_rng(1), 9, n_envs, p_terminate=0.3, p_truncate=0.3)
    assert any(step["truncated"].any() for step in steps)
    observation_space = DICT_OBS_SPACE if dict_obs else BOX_OBS_SPACE
    kwargs = dict(device="cpu", n_envs=n_envs, n_steps=3)
    numpy_buffer = DeviceNStepReplayBuffer(7 * n_envs, observation_space, ACTION_SPACE, **kwargs)
    torch_buffer = DeviceNStepReplayBuffer(7 * n_envs, observation_space, ACTION_SPACE, **kwargs)
    truncated_buffer = DeviceNStepReplayBuffer(7 * n_envs, observation_space, ACTION_SPACE, **kwargs)
    fill(numpy_buffer, steps, dict_obs=dict_obs)
    for step in steps:
        obs, next_obs = step["obs"].astype(np.float64), step["next_obs"].astype(np.float64)
        if dict_obs:
            obs, next_obs = to_dict_obs(obs), to_dict_obs(next_obs)
            torch_obs = {key: th.from_numpy(value) for key, value in obs.items()}
            torch_next_obs = {key: th.from_numpy(value) for key, value in next_obs.items()}
        else:
            torch_obs, torch_next_obs = th.from_numpy(obs), th.from_numpy(next_obs)
        torch_buffer.add(
            torch_obs,
            torch_next_obs,
            th.from_numpy(step["action"]),
            th.from_numpy(step["reward"]),
            th.from_numpy(step["done"].astype(np.float32)),  # float dones, as stored by SB3
            infos_from(step["truncated"]),
        )
        # truncation given explicitly (as a tensor), with infos that do not carry it
        truncated_buffer.add(
            obs,
            next_obs,
            step["action"],
            step["reward"],
            step["done"],
            [{} for _ in range(n_envs)],
            truncated=th.from_numpy(step["truncated"]),
        )
    assert_same_storage(numpy_buffer, torch_buffer)
    assert_same_storage(numpy_buffer, truncated_buffer)
    # The storage holds what was added, env-major: (n_envs, rows, ...); 9 adds wrapped over 7 rows
    assert numpy_buffer.pos == 2 and numpy_buffer.full
    np.testing.assert_array_equal(numpy_buffer.timeouts[:, 1].numpy(), steps[8]["truncated"])
    np.testing.assert_array_equal(numpy_buffer.dones[:, 5].numpy(), steps[5]["done"])
    np.testing.assert_array_equal(numpy_buffer.rewards[:, 4].numpy(), steps[4]["reward"])
    np.testing.assert_array_equal(numpy_buffer.actions[:, 3].numpy(), steps[3]["action"])
    if not dict_obs:
        np.testing.assert_array_equal(numpy_buffer.observations[:, 0].numpy(), steps[7]["obs"])
        # The newest row's window holds only itself
        np.testing.assert_array_equal(numpy_buffer.next_observations[:, 1].numpy(), steps[8]["next_obs"])


def test_truncation_ignored_without_timeout_handling() -> None:
    buffer = DeviceNStepReplayBuffer(8, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", handle_timeout_termination=False, n_steps=1)
    obs = np.zeros((1, OBS_DIM), dtype=np.float32)
    action = np.zeros((1, ACTION_DIM), dtype=np.float32)
    buffer.add(obs, obs, action, np.ones(1), np.array([True]), [{"TimeLimit.truncated": True}])
    buffer.add(obs, obs, action, np.ones(1), np.array([True]), [{}], truncated=np.array([True]))
    assert buffer.dones[0, :2].tolist() == [True, True]
    assert buffer.timeouts[0, :2].tolist() == [False, False]


def test_add_does_not_track_gradients() -> None:
    buffer = DeviceNStepReplayBuffer(8, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_steps=1)
    action = th.zeros((1, ACTION_DIM), requires_grad=True)
    obs = th.ones((1, OBS_DIM), requires_grad=True)
    buffer.add(obs * 2, obs, action + 1, np.ones(1), np.zeros(1), [{}])
    for name, tensor in storage(buffer).items():
        assert not tensor.requires_grad, name
    assert buffer.observations[0, 0].tolist() == [2.0] * OBS_DIM
    assert buffer.actions[0, 0].tolist() == [1.0] * ACTION_DIM


@pytest.mark.parametrize("observation_space", [BOX_OBS_SPACE, DICT_OBS_SPACE])
def test_lazy_allocation(observation_space: spaces.Space) -> None:
    buffer = DeviceNStepReplayBuffer(12, observation_space, ACTION_SPACE, device="cpu", n_envs=2, n_steps=3)
    assert buffer.size() == 0
    assert not buffer.is_allocated
    assert all(tensor is None for tensor in storage(buffer).values())
    with pytest.raises(ValueError, match="empty"):
        buffer.sample(4)

    steps = make_trajectory(np.random.default_rng(0), 1, 2)
    fill(buffer, steps, dict_obs=isinstance(observation_space, spaces.Dict))
    assert buffer.is_allocated
    assert buffer.size() == 1
    assert all(isinstance(tensor, th.Tensor) for tensor in storage(buffer).values())
    assert buffer.rewards.shape == (2, 6)


def test_size_counts_rows_per_env_and_reset() -> None:
    n_envs = 3
    # buffer_size counts transitions over all envs: 20 // 3 = 6 rows per env
    buffer = DeviceNStepReplayBuffer(20, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=n_envs, n_steps=2)
    assert buffer.buffer_size == 6
    steps = make_trajectory(np.random.default_rng(0), 10, n_envs)
    sizes = []
    for step in steps:
        fill(buffer, [step])
        sizes.append(buffer.size())
    assert sizes == [1, 2, 3, 4, 5, 6, 6, 6, 6, 6]
    assert buffer.rewards.shape == (n_envs, 6)
    buffer.reset()
    assert buffer.size() == 0
    with pytest.raises(ValueError):
        buffer.sample(4)
    # After a reset, only the new data is sampled
    fill(buffer, steps[9:])
    set_random_seed(0)
    samples = buffer.sample(30)
    assert set((samples.observations[:, 0].round().long() // n_envs).tolist()) == {9}


def test_sample_rejects_an_env_that_is_not_a_vec_normalize() -> None:
    buffer = DeviceNStepReplayBuffer(8, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_steps=1)
    fill(buffer, make_trajectory(np.random.default_rng(0), 2, 1))
    with pytest.raises(TypeError, match="env must be a VecNormalize"):
        buffer.sample(4, env=object())  # type: ignore[arg-type]


def test_to_device() -> None:
    buffer = DeviceNStepReplayBuffer(8, DICT_OBS_SPACE, ACTION_SPACE, device="cpu", n_steps=1)
    buffer.to("meta")  # before allocation: only the device changes
    assert buffer.device == th.device("meta") and not buffer.is_allocated
    buffer.to("cpu")
    fill(buffer, make_trajectory(np.random.default_rng(0), 2, 1), dict_obs=True)
    buffer.to("meta")
    assert buffer.device == th.device("meta")
    for name, tensor in storage(buffer).items():
        assert tensor.device == th.device("meta"), name


@pytest.mark.parametrize("dict_obs", [False, True])
def test_pickle_round_trip(tmp_path, dict_obs: bool) -> None:
    n_envs = 3
    observation_space = DICT_OBS_SPACE if dict_obs else BOX_OBS_SPACE
    buffer = DeviceNStepReplayBuffer(21, observation_space, ACTION_SPACE, device="cpu", n_envs=n_envs, n_steps=3)
    fill(buffer, make_trajectory(np.random.default_rng(3), 10, n_envs), dict_obs=dict_obs)

    save_to_pkl(tmp_path / "buffer.pkl", buffer)
    loaded = load_from_pkl(tmp_path / "buffer.pkl")
    assert isinstance(loaded, DeviceNStepReplayBuffer)
    assert_same_storage(buffer, loaded)
    assert (loaded.n_steps, loaded.gamma, loaded.n_envs, loaded.buffer_size) == (3, 0.99, n_envs, 7)
    assert loaded.device == buffer.device

    set_random_seed(123)
    samples = buffer.sample(50)
    set_random_seed(123)
    loaded_samples = loaded.sample(50)
    assert_same_samples(samples, loaded_samples)

    # A buffer saved before its first add stays unallocated
    save_to_pkl(tmp_path / "empty.pkl", DeviceNStepReplayBuffer(21, observation_space, ACTION_SPACE, device="cpu"))
    empty = load_from_pkl(tmp_path / "empty.pkl")
    assert not empty.is_allocated and empty.size() == 0


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(buffer_size=11, n_envs=3, n_steps=3), ValueError, "buffer_size"),  # 11 // 3 = 3 rows < 4
        (dict(buffer_size=3, n_envs=1, n_steps=3), ValueError, "buffer_size"),
        (dict(buffer_size=100, n_steps=0), ValueError, "n_steps"),
        (dict(buffer_size=100, n_steps=-2), ValueError, "n_steps"),
        (dict(buffer_size=100, gamma=0.0), ValueError, "gamma"),
        (dict(buffer_size=100, gamma=-0.5), ValueError, "gamma"),
        (dict(buffer_size=100, gamma=1.01), ValueError, "gamma"),
        (dict(buffer_size=100, observation_space=spaces.Tuple([BOX_OBS_SPACE])), TypeError, "observation_space"),
        (
            dict(buffer_size=100, observation_space=spaces.Dict({"a": BOX_OBS_SPACE, "b": spaces.Dict({"c": BOX_OBS_SPACE})})),
            TypeError,
            "observation_space",
        ),
        (dict(buffer_size=100, action_space=spaces.Discrete(4)), TypeError, "action_space"),
    ],
)
def test_constructor_errors(kwargs: dict[str, Any], error: type[Exception], match: str) -> None:
    kwargs = {"observation_space": BOX_OBS_SPACE, "action_space": ACTION_SPACE, "device": "cpu", **kwargs}
    with pytest.raises(error, match=match):
        DeviceNStepReplayBuffer(**kwargs)


def test_integer_observations_are_stored_exactly() -> None:
    # Discrete, MultiDiscrete and MultiBinary keys come back with SB3's buffer shapes and their exact values
    space = spaces.Dict(
        {"box": BOX_OBS_SPACE, "d": spaces.Discrete(7), "md": spaces.MultiDiscrete([3, 5]), "mb": spaces.MultiBinary(4)}
    )
    space.seed(0)
    buffer = DeviceNStepReplayBuffer(40, space, ACTION_SPACE, device="cpu", n_envs=2)
    stored = []
    for _ in range(20):
        obs = [space.sample() for _ in range(2)]
        batch = {key: np.stack([np.asarray(o[key]) for o in obs]) for key in space.spaces}
        buffer.add(batch, batch, np.zeros((2, *ACTION_SPACE.shape)), np.zeros(2), np.zeros(2), [{}, {}])
        stored.append(batch)
    samples = buffer.sample(64)
    shapes = {"box": BOX_OBS_SPACE.shape, "d": (1,), "md": (2,), "mb": (4,)}
    for key, shape in shapes.items():
        assert samples.observations[key].shape == (64, *shape)
    # Every sampled row is one of the stored observations, value for value
    rows = {tuple(np.concatenate([np.ravel(b[k][e]) for k in shapes])) for b in stored for e in range(2)}
    for i in range(64):
        assert tuple(np.concatenate([samples.observations[k][i].numpy().ravel() for k in shapes])) in rows


@pytest.mark.parametrize("n_envs, n_steps", [(1, 1), (3, 3), (2, 5)])
def test_constructor_accepts_boundaries(n_envs: int, n_steps: int) -> None:
    # Smallest valid buffer, and the boundary values of gamma
    buffer = DeviceNStepReplayBuffer(
        n_envs * (n_steps + 1), BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=n_envs, n_steps=n_steps, gamma=1.0
    )
    assert buffer.buffer_size == n_steps + 1
    DeviceNStepReplayBuffer(100, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", gamma=1e-6)


@pytest.mark.skipif(th.cuda.is_available(), reason="checks the fallback when the saved device is not available")
def test_unpickling_falls_back_to_cpu_when_device_unavailable(tmp_path) -> None:
    buffer = DeviceNStepReplayBuffer(8, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_steps=1)
    fill(buffer, make_trajectory(np.random.default_rng(0), 3, 1))
    # Pretend the buffer lives on a GPU (its tensors are on the CPU, so pickling works on this machine)
    buffer.device = th.device("cuda")
    save_to_pkl(tmp_path / "buffer.pkl", buffer)
    loaded = load_from_pkl(tmp_path / "buffer.pkl")
    assert loaded.device == th.device("cpu")
    buffer.device = th.device("cpu")
    assert_same_storage(buffer, loaded)


@settings(max_examples=30, deadline=None)
@given(
    n_envs=st.sampled_from([1, 3]),
    n_steps=st.sampled_from([1, 2, 4]),
    n_adds=st.integers(min_value=1, max_value=20),
    gamma=st.sampled_from([0.5, 0.99]),
    handle_timeout=st.booleans(),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_same_samples_as_sb3_nstep_buffer(
    n_envs: int, n_steps: int, n_adds: int, gamma: float, handle_timeout: bool, seed: int
) -> None:
    # The windows kept up to date at each add give what SB3 computes at sampling time, wrap-around included
    steps = make_trajectory(np.random.default_rng(seed), n_adds, n_envs)
    kwargs = dict(device="cpu", n_envs=n_envs, handle_timeout_termination=handle_timeout, n_steps=n_steps, gamma=gamma)
    ours = DeviceNStepReplayBuffer(6 * n_envs, BOX_OBS_SPACE, ACTION_SPACE, **kwargs)
    reference = NStepReplayBuffer(6 * n_envs, BOX_OBS_SPACE, ACTION_SPACE, **kwargs)
    fill(ours, steps)
    fill(reference, steps)
    batch_inds = np.random.default_rng(seed).integers(0, reference.size(), size=50)
    np.random.seed(seed % 2**32)
    expected = reference._get_samples(batch_inds)
    np.random.seed(seed % 2**32)
    env_inds = np.random.randint(0, n_envs, size=batch_inds.shape)  # the draw SB3 made
    samples = ours._get_samples(th.from_numpy(batch_inds), env_inds=th.from_numpy(env_inds))
    for field in ("observations", "actions", "next_observations", "dones"):
        assert th.equal(getattr(samples, field), getattr(expected, field)), field
    # Sums and powers in another order: float32 rounding
    th.testing.assert_close(samples.rewards, expected.rewards, rtol=1e-6, atol=1e-6)
    th.testing.assert_close(samples.discounts, expected.discounts.float(), rtol=1e-6, atol=0.0)


def test_close_windows_stops_returns_at_the_newest_rows() -> None:
    steps = make_trajectory(np.random.default_rng(0), 6, 1, p_terminate=0.0, p_truncate=0.0)
    buffer = DeviceNStepReplayBuffer(8, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_steps=4, gamma=0.5)
    fill(buffer, steps[:3])
    buffer.close_windows()
    fill(buffer, steps[3:])
    rewards = [float(step["reward"][0]) for step in steps]
    samples = buffer._get_samples(th.arange(6), env_inds=th.zeros(6, dtype=th.int64))
    # Rows 0 to 2 end at row 2, bootstrapping from its next observation (a truncation, not a termination)
    expected = [rewards[0] + 0.5 * rewards[1] + 0.25 * rewards[2], rewards[1] + 0.5 * rewards[2], rewards[2]]
    expected += [rewards[3] + 0.5 * rewards[4] + 0.25 * rewards[5], rewards[4] + 0.5 * rewards[5], rewards[5]]
    th.testing.assert_close(samples.rewards[:, 0], th.tensor(expected))
    assert samples.next_observations[:3, 0].tolist() == [2.5, 2.5, 2.5]
    assert samples.discounts[:, 0].tolist() == [0.125, 0.25, 0.5] * 2
    assert not samples.dones.any()


def test_cpu_sampling_draws_from_numpy_uniformly() -> None:
    n_envs, n_adds = 3, 4
    buffer = DeviceNStepReplayBuffer(30, BOX_OBS_SPACE, ACTION_SPACE, device="cpu", n_envs=n_envs, n_steps=2)
    fill(buffer, make_trajectory(np.random.default_rng(0), n_adds, n_envs))
    # As SB3's buffers: NumPy's global RNG (seeded by set_random_seed) picks the indices, torch's does not
    np.random.seed(5)
    th.manual_seed(1)
    first = buffer.sample(6000).observations[:, 0]
    np.random.seed(5)
    th.manual_seed(2)
    second = buffer.sample(6000).observations[:, 0]
    assert th.equal(first, second)
    # Every stored transition (ids 0..11), none other, each about equally often
    counts = th.bincount(first.round().long(), minlength=n_adds * n_envs)
    assert len(counts) == n_adds * n_envs
    assert counts.min() > 400 and counts.max() < 600, counts
