"""EnvpoolVecEnv against raw envpool runs: episode ends, the reset step, mixed dones, seeding, spaces."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces

envpool = pytest.importorskip("envpool")

from sb3_fasttd3.vec_env import EnvpoolVecEnv  # noqa: E402
from sb3_fasttd3.vec_env.envpool import _DirectStep  # noqa: E402


def raw_pool(task: str, num_envs: int, seed: int, max_episode_steps: int):
    return envpool.make(task, env_type="gymnasium", num_envs=num_envs, seed=seed, max_episode_steps=max_episode_steps)


def random_actions(steps: int, num_envs: int, action_dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-1, 1, (steps, num_envs, action_dim)).astype(np.float32)


def f32(array: np.ndarray) -> th.Tensor:
    return th.as_tensor(array, dtype=th.float32)


def test_truncation_reports_final_obs_and_skips_the_reset_step():
    actions = random_actions(7, 2, 6)
    raw = raw_pool("HalfCheetah-v5", 2, seed=3, max_episode_steps=5)
    raw.reset()
    raw_steps = [raw.step(a) for a in [*actions[:5], actions[5], actions[5]]]  # raw step 5 is envpool's reset step
    env = EnvpoolVecEnv("HalfCheetah-v5", num_envs=2, seed=3, max_episode_steps=5)
    env.reset()
    for t in range(5):
        obs, reward, dones, infos = env.step(th.as_tensor(actions[t]))
        th.testing.assert_close(infos["final_observation"], f32(raw_steps[t][0]))
        th.testing.assert_close(reward, f32(raw_steps[t][1]))
        assert dones.tolist() == infos["truncated"].tolist() == [t == 4] * 2
    assert not infos["terminated"].any()
    assert obs.dtype == reward.dtype == th.float32 and dones.dtype == th.bool
    assert raw_steps[5][1].tolist() == [0, 0]
    th.testing.assert_close(obs, f32(raw_steps[5][0]))  # the reset observation
    obs, reward, dones, infos = env.step(th.as_tensor(actions[5]))  # a real transition from the reset obs
    th.testing.assert_close(obs, f32(raw_steps[6][0]))
    th.testing.assert_close(reward, f32(raw_steps[6][1]))
    assert (reward != 0).all() and not dones.any()


def run_until_done(env: EnvpoolVecEnv, actions: np.ndarray) -> tuple[int, th.Tensor, th.Tensor, dict]:
    env.reset()
    for t, action in enumerate(actions):
        obs, _, dones, infos = env.step(th.as_tensor(action))
        if dones.any():
            return t, obs, dones, infos
    raise AssertionError("no episode ended")


@pytest.mark.parametrize("at_time_limit", [False, True])
def test_termination_wins(at_time_limit: bool):
    actions = random_actions(100, 1, 3)
    raw = raw_pool("Hopper-v5", 1, seed=0, max_episode_steps=1000)
    raw.reset()
    raw_steps = [raw.step(a) for a in actions]
    end = next(t for t, step in enumerate(raw_steps) if step[2][0])
    # On its last allowed step envpool itself says truncated: the termination must still be reported
    limit = end + 1 if at_time_limit else 1000
    t, obs, _, infos = run_until_done(EnvpoolVecEnv("Hopper-v5", seed=0, max_episode_steps=limit), actions)
    assert t == end
    assert infos["terminated"].tolist() == [True] and infos["truncated"].tolist() == [False]
    th.testing.assert_close(infos["final_observation"], f32(raw_steps[end][0]))
    th.testing.assert_close(obs, f32(raw_steps[end + 1][0]))


def per_env_wrapper_run(env: EnvpoolVecEnv, actions: np.ndarray) -> tuple[list[list], list[list], int]:
    """Each env's transitions (obs, final obs, reward, terminated, truncated), the actions it used, mixed steps."""
    transitions, used = [[] for _ in range(env.num_envs)], [[] for _ in range(env.num_envs)]
    env.reset()
    mixed = 0
    for action in actions:
        obs, reward, dones, infos = env.step(th.as_tensor(action))
        mixed += bool(dones.any() and not dones.all())
        for i in range(env.num_envs):
            row = (obs[i], infos["final_observation"][i], reward[i], infos["terminated"][i], infos["truncated"][i])
            transitions[i].append(tuple(x.clone() for x in row))
            used[i].append(action[i])
    return transitions, used, mixed


def per_env_raw_run(raw, used: list[list]) -> list[list]:
    """The same per env with raw envpool, feeding each env its own actions; its reset steps give the reset obs."""
    num_envs, steps = len(used), len(used[0])
    transitions, taken = [[] for _ in range(num_envs)], [0] * num_envs
    pending = np.zeros(num_envs, dtype=bool)  # the last recorded step ended an episode: this raw step resets
    raw.reset()
    for _ in range(2 * steps):
        obs, reward, terminated, truncated, _ = raw.step(
            np.stack([used[i][min(taken[i], steps - 1)] for i in range(num_envs)])
        )
        for i in range(num_envs):
            if pending[i]:
                transitions[i][-1] = (f32(obs[i]), *transitions[i][-1][1:])
                pending[i] = False
            elif taken[i] < steps:
                flags = th.tensor(terminated[i]), th.tensor(truncated[i])
                transitions[i].append((f32(obs[i]), f32(obs[i]), f32(reward[i]), *flags))
                taken[i] += 1
                pending[i] = terminated[i] or truncated[i]
    return transitions


def test_mixed_dones_leave_other_envs_untouched():
    actions = random_actions(60, 4, 3, seed=1)
    env = EnvpoolVecEnv("Hopper-v5", num_envs=4, seed=5, max_episode_steps=30)
    transitions, used, mixed = per_env_wrapper_run(env, actions)
    expected = per_env_raw_run(raw_pool("Hopper-v5", 4, seed=5, max_episode_steps=30), used)
    assert mixed > 0
    ends = [sum(bool(x[3]) for x in env_rows) for env_rows in transitions]
    cuts = [sum(bool(x[4]) for x in env_rows) for env_rows in transitions]
    assert sum(ends) > 0 and sum(cuts) > 0
    for i in range(4):
        for got, want in zip(transitions[i], expected[i], strict=True):
            for x, y in zip(got, want, strict=True):
                th.testing.assert_close(x, y)


def trajectory(env: EnvpoolVecEnv, actions: np.ndarray) -> th.Tensor:
    observations = [env.reset()]
    observations += [env.step(th.as_tensor(action))[0] for action in actions]
    return th.stack(observations)


@pytest.mark.parametrize("task, dict_keys", [("HalfCheetah-v5", None), ("CheetahRun-v1", ["position", "velocity"])])
def test_direct_step_matches_public_step(task: str, dict_keys: list[str] | None):
    """
    envpool's C++ binding, called directly, steps exactly as ``pool.step``, envpool's own reset steps included
    (its flags are envpool's ``done``, terminated or truncated, and ``truncated``).
    """
    direct_pool, public_pool = (raw_pool(task, 3, seed=2, max_episode_steps=4) for _ in range(2))
    direct = _DirectStep.of(direct_pool, dict_keys)
    assert direct is not None
    direct_pool.reset(), public_pool.reset()
    elapsed = set()
    for action in random_actions(11, 3, 6):
        obs, reward, terminated, truncated, info = public_pool.step(action)
        elapsed.update(info["elapsed_step"].tolist())
        public = (obs, reward, terminated | truncated, truncated, info["elapsed_step"])
        for got, want in zip(direct(action), public, strict=True):
            if dict_keys is not None and isinstance(want, dict):
                assert list(got) == dict_keys
                got, want = np.concatenate(list(got.values()), 1), np.concatenate([want[key] for key in dict_keys], 1)
            np.testing.assert_array_equal(got, want)
            assert got.dtype == want.dtype
    assert {0, 4} <= elapsed  # episodes were cut and restarted by envpool on the way
    assert _DirectStep.of(object(), None) is None  # an unknown layout falls back to pool.step
    assert isinstance(EnvpoolVecEnv(task)._raw_step, _DirectStep)


def test_seeding_reproducible():
    actions = random_actions(12, 2, 3)
    first = EnvpoolVecEnv("Hopper-v5", num_envs=2, seed=7, max_episode_steps=4)
    second = EnvpoolVecEnv("Hopper-v5", num_envs=2, seed=7, max_episode_steps=4)
    reference = trajectory(first, actions)
    th.testing.assert_close(trajectory(second, actions), reference)
    first.seed(7)
    th.testing.assert_close(trajectory(first, actions), reference)  # re-seeding restarts the same streams
    first.seed(8)
    other = trajectory(first, actions)
    assert not th.allclose(other[0], reference[0])
    assert not th.allclose(trajectory(first, actions)[0], other[0])  # no seed: the streams go on


def test_spaces_and_dict_observations():
    cheetah = EnvpoolVecEnv("CheetahRun-v1", num_envs=2)
    assert cheetah.observation_space == spaces.Box(-np.inf, np.inf, (17,), np.float32)
    assert cheetah.action_space == spaces.Box(-1, 1, (6,), np.float32)
    raw = raw_pool("CheetahRun-v1", 2, seed=0, max_episode_steps=1001)
    raw_obs, _ = raw.reset()
    th.testing.assert_close(cheetah.reset(), f32(np.concatenate([raw_obs["position"], raw_obs["velocity"]], axis=1)))
    as_dict = EnvpoolVecEnv("CheetahRun-v1", num_envs=2, flatten_obs=False)
    obs, *_ = as_dict.step(th.zeros(2, 6))
    assert set(obs) == {"position", "velocity"} and obs["velocity"].shape == (2, 9) and obs["velocity"].dtype == th.float32
    with pytest.raises(ValueError, match="unknown envpool task id"):
        EnvpoolVecEnv("HalfCheetah-v99", max_episode_steps=5)


@pytest.mark.parametrize("max_episode_steps", [0, -5, 2.5, True])
def test_max_episode_steps_below_one_or_not_an_integer_is_refused(max_episode_steps):
    with pytest.raises(ValueError, match=r"max_episode_steps must be an integer >= 1 or None, got"):
        EnvpoolVecEnv("Hopper-v5", max_episode_steps=max_episode_steps)
    assert EnvpoolVecEnv("Hopper-v5", max_episode_steps=np.int64(3)).max_episode_steps == 3


def test_scalar_features_of_a_dict_observation_are_vectors_of_one():
    from sb3_fasttd3 import FastTD3

    env = EnvpoolVecEnv("WalkerWalk-v1", num_envs=2, seed=0, flatten_obs=False, max_episode_steps=10)
    assert env.observation_space["height"] == spaces.Box(-np.inf, np.inf, (1,), np.float32)
    raw_obs, _ = raw_pool("WalkerWalk-v1", 2, seed=0, max_episode_steps=1001).reset()
    obs = env.reset()
    assert all(obs[key].shape == (2, *space.shape) for key, space in env.observation_space.spaces.items())
    th.testing.assert_close(obs["height"], f32(raw_obs["height"])[:, None])
    model = FastTD3("MultiInputPolicy", env, learning_starts=8, batch_size=8, num_atoms=11, policy_kwargs=dict(net_arch=[8]))
    model.learn(24)
    assert model.replay_buffer.size() == 12  # rows of 2 envs


def test_fasttd3_on_envpool_bootstraps_from_final_observations():
    from sb3_fasttd3 import FastTD3

    env = EnvpoolVecEnv("HalfCheetah-v5", num_envs=2, seed=0, max_episode_steps=6)
    model = FastTD3("MlpPolicy", env, learning_starts=12, batch_size=8, num_atoms=11, policy_kwargs=dict(net_arch=[8]))
    model.learn(36)
    buffer, rows = model.replay_buffer, model.replay_buffer.size()
    truncated = buffer.timeouts[:, :rows]
    assert rows == 18 and truncated.sum() == 6 and not (buffer.dones[:, :rows] & ~truncated).any()
    # The reset step is not a transition: each row's observation is the previous row's next one, except after
    # a time limit, where the next episode starts from the reset observation instead of the final one
    same = th.isclose(buffer.next_observations[:, : rows - 1], buffer.observations[:, 1:rows]).all(dim=-1)
    assert same[~truncated[:, : rows - 1]].all() and not same[truncated[:, : rows - 1]].any()
