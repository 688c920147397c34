"""IsaacLabVecEnv on a stand-in that follows Isaac Lab's RL environment interface (see tests/isaaclab_standin.py)."""

from types import SimpleNamespace

import gymnasium as gym
import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecVideoRecorder

from sb3_fasttd3.vec_env import NumpyVecEnv, TorchVecEnv
from sb3_fasttd3.vec_env.isaaclab import IsaacLabVecEnv
from tests.isaaclab_standin import IsaacLabStandIn, StandInEnvCfg

# One action per env, repeated: env 0 stays at 0 and times out at step 5, env 1 leaves the bound at step 4,
# env 2 at steps 2 and 4, env 3 times out at x=2.5, env 4 reaches x=3.75 at step 5: terminated and timed out.
ACTIONS = th.tensor([[0.0], [1.0], [-2.0], [0.5], [0.75]])


def make_env(clip_actions: float | None = 10.0, render_mode: str | None = None, **cfg_kwargs) -> IsaacLabVecEnv:
    # gym.make() wraps Isaac Lab environments: attributes are read through .unwrapped
    standin = gym.wrappers.OrderEnforcing(IsaacLabStandIn(StandInEnvCfg(**cfg_kwargs), render_mode=render_mode))
    return IsaacLabVecEnv(standin, clip_actions=clip_actions)


def rollout(env: IsaacLabVecEnv, n_steps: int = 5) -> list[tuple]:
    env.reset()
    return [env.step(ACTIONS) for _ in range(n_steps)]


def test_final_observation_and_flags_of_mixed_done_steps():
    env = make_env()
    assert isinstance(env, TorchVecEnv)
    steps = rollout(env)
    obs, rewards, dones, infos = steps[4]
    # Truncated envs 0 and 3 end on their true last state, not on the reset one ([0, 0])
    expected_final = th.tensor([[5.0, 0.0], [1.0, 1.0], [1.0, -2.0], [5.0, 2.5], [5.0, 3.75]])
    th.testing.assert_close(infos["final_observation"], expected_final)
    th.testing.assert_close(obs, th.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, -2.0], [0.0, 0.0], [0.0, 0.0]]))
    # Env 4 terminated and timed out on the same step: terminated wins
    assert infos["truncated"].tolist() == [True, False, False, True, False]
    assert infos["terminated"].tolist() == [False, False, False, False, True]
    assert dones.tolist() == [True, False, False, True, True]
    th.testing.assert_close(rewards, th.tensor([0.0, 1.0, -2.0, 2.5, 3.75]))
    # Step 4: envs 1 and 2 terminate; the others go on (their final observation is the returned one)
    obs, _, dones, infos = steps[3]
    assert infos["terminated"].tolist() == [False, True, True, False, False] and not infos["truncated"].any()
    expected_final = th.tensor([[4.0, 0.0], [4.0, 4.0], [2.0, -4.0], [4.0, 2.0], [4.0, 3.0]])
    th.testing.assert_close(infos["final_observation"], expected_final)
    th.testing.assert_close(infos["final_observation"][~dones], obs[~dones])


def test_stale_final_obs_is_not_used_on_steps_without_reset():
    # The stand-in leaves extras["final_obs"] of step 2 in place at step 3, as Isaac Lab may
    steps = rollout(env := make_env(), n_steps=3)
    assert "final_obs" in env.env.unwrapped.extras
    obs, _, dones, infos = steps[2]
    assert not dones.any()
    th.testing.assert_close(infos["final_observation"], obs)


def test_finite_horizon_time_outs_are_terminations():
    infos = rollout(make_env(is_finite_horizon=True))[4][3]
    assert infos["terminated"].tolist() == [True, False, False, True, True] and not infos["truncated"].any()


def test_policy_group_gives_box_observations():
    env = make_env()
    assert env.observation_space == spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float32)
    obs = env.reset()
    assert obs.shape == (5, 2) and obs.dtype == th.float32 and obs.device == env.device == th.device("cpu")
    obs, rewards, dones, infos = env.step(ACTIONS)
    assert rewards.shape == (5,) and rewards.dtype == th.float32 and dones.dtype == th.bool
    assert infos["terminated"].dtype == infos["truncated"].dtype == th.bool
    assert {tensor.device for tensor in (obs, rewards, dones, infos["final_observation"])} == {env.device}


def test_policy_and_critic_groups_give_dict_observations():
    env = make_env(critic_obs=True)
    assert isinstance(env.observation_space, spaces.Dict)
    assert env.observation_space["policy"].shape == (2,) and env.observation_space["critic"].shape == (3,)
    obs, _, _, infos = rollout(env)[1]
    assert obs["policy"].shape == (5, 2) and obs["critic"].shape == (5, 3)
    # Env 2 terminated at step 2: its critic final observation still counts 0 finished episodes, the reset one 1
    th.testing.assert_close(infos["final_observation"]["critic"][2], th.tensor([2.0, -4.0, 0.0]))
    th.testing.assert_close(obs["critic"][2], th.tensor([0.0, 0.0, 1.0]))
    th.testing.assert_close(infos["final_observation"]["policy"][2], th.tensor([2.0, -4.0]))


def test_returned_tensors_are_not_the_environment_buffers():
    env = make_env(critic_obs=True)
    env.reset()
    obs, rewards, _, infos = env.step(ACTIONS)
    kept = [obs["policy"].clone(), rewards.clone(), infos["terminated"].clone(), infos["truncated"].clone()]
    env.step(ACTIONS)  # the stand-in rewrites its buffers in place
    for before, after in zip(kept, [obs["policy"], rewards, infos["terminated"], infos["truncated"]], strict=True):
        assert th.equal(before, after)


def test_unbounded_action_space_needs_clip_actions():
    with pytest.raises(ValueError, match="clip_actions"):
        make_env(clip_actions=None)


def test_clip_actions_defines_the_space_and_clamps():
    env = make_env(clip_actions=1.0)
    assert env.action_space == spaces.Box(-1.0, 1.0, shape=(1,), dtype=np.float32)
    env.reset()
    actions = th.tensor([[5.0], [-5.0], [0.5], [-1.0], [1.5]])
    env.step(actions)
    assert env.env.unwrapped.last_actions[:, 0].tolist() == [1.0, -1.0, 0.5, -1.0, 1.0]
    assert actions[:, 0].tolist() == [5.0, -5.0, 0.5, -1.0, 1.5]  # the caller's actions are not modified


def test_bounded_action_space_is_kept_and_clamped():
    env = make_env(clip_actions=None, action_bound=0.5)
    assert env.action_space == spaces.Box(-0.5, 0.5, shape=(1,), dtype=np.float32)
    env.reset()
    env.step(ACTIONS)
    assert env.env.unwrapped.last_actions[:, 0].tolist() == [0.0, 0.5, -0.5, 0.5, 0.5]


def test_disabled_final_obs_is_an_error():
    with pytest.raises(ValueError, match=r"compute_final_obs = True"):
        make_env(compute_final_obs=False)


def test_environment_without_the_option_fails_at_the_first_reset():
    standin = IsaacLabStandIn(StandInEnvCfg())
    # An Isaac Lab release without the option: the config has no such field and never publishes final_obs
    standin.cfg = SimpleNamespace(**{k: v for k, v in vars(standin.cfg).items() if k != "compute_final_obs"})
    env = IsaacLabVecEnv(standin, clip_actions=10.0)
    env.reset()
    env.step(ACTIONS)  # no episode ends at step 1
    with pytest.raises(RuntimeError, match="compute_final_obs"):
        env.step(ACTIONS)


def test_only_same_step_autoreset_is_supported():
    standin = IsaacLabStandIn(StandInEnvCfg())
    standin.metadata = {**standin.metadata, "autoreset_mode": gym.vector.AutoresetMode.DISABLED}
    with pytest.raises(ValueError, match="Same-Step"):
        IsaacLabVecEnv(standin, clip_actions=1.0)


def test_episode_tracker_returns_and_lengths():
    env = make_env()
    rollout(env)
    expected = [(-6.0, 2), (10.0, 4), (-6.0, 2), (0.0, 5), (7.5, 5), (11.25, 5)]
    episodes, count = env.episode_tracker.drain()
    assert [(episode["r"], episode["l"]) for episode in episodes] == expected and count == 6


def test_seed_reaches_the_environment_and_close_closes_it():
    env = make_env()
    env.seed(7)
    env.reset()
    env.reset()  # the seed is used once
    standin = env.env.unwrapped
    assert standin.seeds == [7]
    env.close()
    assert standin.closed


def test_rgb_array_render_is_the_viewport_image():
    env = make_env(render_mode="rgb_array")
    env.reset()
    env.step(th.ones(env.num_envs, 1))
    image = env.render()
    assert image.shape == (IsaacLabStandIn.render_height, IsaacLabStandIn.render_width, 3)
    assert (image[..., 0] == env.num_envs).all()  # the stand-in's image of positions summing to num_envs
    assert env.render_mode == "rgb_array" and env.metadata["render_fps"] == IsaacLabStandIn.metadata["render_fps"]


def test_video_recorder_records_through_numpy_vec_env(tmp_path):
    env = VecVideoRecorder(
        NumpyVecEnv(make_env(render_mode="rgb_array")), str(tmp_path), lambda step: step == 0, video_length=4
    )
    env.reset()
    for _ in range(6):
        env.step(np.ones((env.num_envs, 1), dtype=np.float32))
    env.close()
    assert len(list(tmp_path.glob("*.mp4"))) == 1


def test_human_render_draws_once_without_recursion():
    env = make_env(render_mode="human")
    env.reset()
    assert env.render() is None
    assert env.env.unwrapped.human_renders == 1
