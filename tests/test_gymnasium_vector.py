"""Gymnasium's vector envs as SB3 VecEnvs: FastTD3 stores what it stores from SB3's own, and SB3 algorithms run."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from stable_baselines3 import SAC
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.vec_env import DummyVecEnv, VecMonitor

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.vec_env import GymnasiumVecEnv
from sb3_fasttd3.vec_env.gymnasium_vector import unbatch_infos
from tests.buffer_data import sample_columns, stored_samples
from tests.envs import CountingEnv
from tests.test_fasttd3 import TINY, counting_env


def sync_vector_env(n_envs: int, mode: AutoresetMode, dict_obs: bool = False, copy: bool = True) -> SyncVectorEnv:
    return SyncVectorEnv([lambda: CountingEnv(dict_obs=dict_obs) for _ in range(n_envs)], autoreset_mode=mode, copy=copy)


class CallCountingEnv(CountingEnv):
    """Counts the calls of :meth:`bump`, and renders an image of that count."""

    metadata = {"render_modes": ["rgb_array"]}

    def __init__(self):
        super().__init__()
        self.render_mode, self.calls = "rgb_array", 0

    def bump(self) -> int:
        self.calls += 1
        return self.calls

    def render(self) -> np.ndarray:
        return np.full((4, 6, 3), self.calls, dtype=np.uint8)


class InfoEnv(CountingEnv):
    """Reset infos count the resets, step infos the steps of the episode."""

    resets = 0

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[np.ndarray, dict]:
        obs, _ = super().reset(seed=seed)
        self.resets += 1
        return obs, {"reset_no": self.resets}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        obs, reward, terminated, truncated, _ = super().step(action)
        return obs, reward, terminated, truncated, {"step_t": self.t}


def every_transition(model: FastTD3) -> list[list[float]]:
    return sorted(sample_columns(stored_samples(model.replay_buffer)).tolist())


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
@pytest.mark.parametrize("dict_obs", [False, True])
@pytest.mark.parametrize("copy", [True, False])  # copy=False: the env overwrites its arrays at its next step or reset
def test_fasttd3_stores_from_a_vector_env_what_it_stores_from_sb3s_vec_env(mode, dict_obs, copy):
    # Uniform actions and episodes that end by termination (x leaves [-5, 5]) and by truncation (10 steps)
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    kwargs = {**TINY, "learning_starts": 1000, "n_steps": 3, "seed": 0}
    model = FastTD3(policy, sync_vector_env(3, mode, dict_obs, copy), **kwargs)
    assert isinstance(model.get_env(), VecMonitor) and isinstance(model.get_env().venv, GymnasiumVecEnv)
    model.learn(150)
    reference = FastTD3(policy, counting_env(3, dict_obs), **kwargs).learn(150)
    done = reference.replay_buffer.dones[:, : reference.replay_buffer.size()]
    assert done.sum() > 10 and (reference.replay_buffer.timeouts[:, : reference.replay_buffer.size()] < done).any()
    assert every_transition(model) == every_transition(reference)
    assert [info["l"] for info in model.ep_info_buffer] == [info["l"] for info in reference.ep_info_buffer]


def test_gymnasiums_default_autoreset_is_refused_with_how_to_make_the_env():
    env = gym.make_vec("Pendulum-v1", num_envs=2)
    with pytest.raises(ValueError, match=r"autoreset_mode=AutoresetMode.NEXT_STEP, one step late.*SAME_STEP"):
        FastTD3("MlpPolicy", env)
    with pytest.raises(TypeError, match="GymnasiumVecEnv wraps a gymnasium VectorEnv, got CountingEnv"):
        GymnasiumVecEnv(CountingEnv())


def test_sb3_algorithms_and_evaluation_run_on_it():
    vector_kwargs = dict(autoreset_mode=AutoresetMode.SAME_STEP)
    env = VecMonitor(GymnasiumVecEnv(gym.make_vec("Pendulum-v1", num_envs=2, vector_kwargs=vector_kwargs)))
    model = SAC("MlpPolicy", env, learning_starts=20, batch_size=16, policy_kwargs=dict(net_arch=[8])).learn(60)
    returns, lengths = evaluate_policy(model, env, n_eval_episodes=2, return_episode_rewards=True)
    assert lengths == [200, 200] and all(np.isfinite(returns))
    assert env.env_is_wrapped(gym.wrappers.TimeLimit) == [True, True]
    assert env.get_attr("spec")[0].id == "Pendulum-v1" and env.env_method("get_wrapper_attr", "dt", indices=1) == [0.05]


def test_batched_infos_become_one_dict_per_env():
    infos = {
        "a": np.array([1, 0, 3]),
        "_a": np.array([True, False, True]),
        "episode": {"r": np.array([0.0, 2.5, 0.0]), "_r": np.array([False, True, False])},
        "_episode": np.array([False, True, False]),
    }
    assert unbatch_infos(infos, 3) == [{"a": 1}, {"episode": {"r": 2.5}}, {"a": 3}]


def test_calls_reach_the_envs_below_gymnasiums_vector_wrappers():
    vector_env = SyncVectorEnv(
        [lambda: gym.wrappers.TimeLimit(CallCountingEnv(), 50) for _ in range(3)], autoreset_mode=AutoresetMode.SAME_STEP
    )
    env = GymnasiumVecEnv(gym.wrappers.vector.ClipAction(gym.wrappers.vector.RecordEpisodeStatistics(vector_env)))
    assert env.env_method("bump", indices=[1]) == [1] and env.get_attr("calls") == [0, 1, 0]  # env 1's only
    env.set_attr("calls", 5, indices=2)
    assert env.get_attr("calls", indices=[1, 2]) == [1, 5] and env.env_method("max_steps") == [10, 10, 10]
    assert env.env_is_wrapped(gym.wrappers.TimeLimit) == [True, True, True]
    env.reset()
    assert env.render_mode == "rgb_array" and env.render().shape == (8, 12, 3)  # three images tiled 2 x 2


@pytest.mark.parametrize("mode", [AutoresetMode.SAME_STEP, AutoresetMode.DISABLED])
def test_step_and_reset_infos_are_kept_apart_as_in_dummy_vec_env(mode):
    results = []
    for env in (DummyVecEnv([InfoEnv]), GymnasiumVecEnv(SyncVectorEnv([InfoEnv], autoreset_mode=mode))):
        env.reset()
        for _ in range(10):  # truncated at the tenth step
            _, _, dones, infos = env.step(np.zeros((1, 1), dtype=np.float32))
        info = {key: value for key, value in infos[0].items() if key != "terminal_observation"}
        results.append((bool(dones[0]), info, env.reset_infos))
    assert results[0] == (True, {"step_t": 10, "TimeLimit.truncated": True}, [{"reset_no": 2}])
    assert results[1] == results[0]


def test_wrappers_that_partial_resets_break_are_refused_in_disabled_mode():
    for wrapper in (gym.wrappers.vector.RecordEpisodeStatistics, gym.wrappers.vector.NormalizeReward):
        with pytest.raises(ValueError, match=f"{wrapper.__name__} around .*DISABLED.*SAME_STEP"):
            inner = wrapper(sync_vector_env(2, AutoresetMode.DISABLED))
            FastTD3("MlpPolicy", gym.wrappers.vector.RescaleAction(inner, min_action=-1.0, max_action=1.0))
        GymnasiumVecEnv(wrapper(sync_vector_env(2, AutoresetMode.SAME_STEP)))
