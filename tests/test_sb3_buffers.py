"""SB3's own replay buffers in FastTD3: ReplayBuffer, DictReplayBuffer, NStepReplayBuffer and HerReplayBuffer."""

import numpy as np
import pytest
import torch as th
from stable_baselines3 import HerReplayBuffer
from stable_baselines3.common.buffers import DictReplayBuffer, NStepReplayBuffer, ReplayBuffer
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.envs import BitFlippingEnv
from stable_baselines3.common.save_util import save_to_pkl

from sb3_fasttd3 import FastTD3
from tests.buffer_data import sample_columns, stored_samples
from tests.envs import CountingTorchVecEnv
from tests.test_checkpoints import assert_same_parameters
from tests.test_fasttd3 import TINY, counting_env, make_model


def transitions(samples, gamma: float) -> set[tuple[float, ...]]:
    """The transitions of ``samples`` as tuples (observation keys in order), rounded to float32's precision."""
    if samples.discounts is None:  # a one-step buffer's
        samples = samples._replace(discounts=th.full_like(samples.rewards, gamma))
    return {tuple(round(x, 5) for x in row) for row in sample_columns(samples).tolist()}


def every_transition(model: FastTD3):
    """Every stored transition of a one-env model's buffer, as its samples."""
    buffer = model.replay_buffer
    if isinstance(buffer, ReplayBuffer):
        return buffer._get_samples(np.arange(buffer.pos))
    return stored_samples(buffer)


def bit_flipping(n_envs: int = 2, seed: int = 0):
    return make_vec_env(lambda: BitFlippingEnv(n_bits=4, continuous=True), n_envs=n_envs, seed=seed)


def her_model(env=None, **kwargs) -> FastTD3:
    her = dict(replay_buffer_class=HerReplayBuffer, replay_buffer_kwargs=dict(n_sampled_goal=2))
    return FastTD3(
        "MultiInputPolicy", env or bit_flipping(), **{**TINY, "n_steps": 1, "v_min": -4.0, "v_max": 0.0, **her, **kwargs}
    )


@pytest.mark.parametrize(
    "buffer_class, n_steps, dict_obs",
    [(ReplayBuffer, 1, False), (NStepReplayBuffer, 3, False), (DictReplayBuffer, 1, True)],
)
def test_sb3s_buffers_sample_the_transitions_fasttd3s_own_buffer_samples(buffer_class, n_steps, dict_obs):
    # Before learning_starts nothing is trained, so both models act alike and store the same episodes, truncated
    # and terminated ones included; SB3's n-step returns are computed when sampled, FastTD3's when stored
    # (each model is built, seeding the global RNGs, right before it learns)
    kwargs = dict(n_steps=n_steps, learning_starts=1000, seed=1, dict_obs=dict_obs)
    own = make_model(1, **kwargs).learn(95)
    sb3 = make_model(1, replay_buffer_class=buffer_class, **kwargs).learn(95)
    assert type(sb3.replay_buffer) is buffer_class
    expected = transitions(every_transition(own), own.gamma)
    assert len(expected) == 95 and transitions(every_transition(sb3), sb3.gamma) == expected


def test_sb3s_n_step_windows_end_where_learn_resets_the_envs():
    # learn() twice: the second call resets the envs inside the second episode (of 10 steps), so the windows of the
    # newest rows stored before it must stop at the last of them, as FastTD3's own buffer's do
    kwargs = dict(n_steps=3, learning_starts=1000, seed=1)
    own = make_model(1, **kwargs).learn(14).learn(6)
    sb3 = make_model(1, replay_buffer_class=NStepReplayBuffer, **kwargs).learn(14).learn(6)
    expected = transitions(every_transition(own), own.gamma)
    assert len(expected) == 20 and transitions(every_transition(sb3), sb3.gamma) == expected


def test_sb3s_buffers_train():
    model = make_model(2, replay_buffer_class=ReplayBuffer, learning_starts=20)
    before = th.cat([parameter.detach().flatten() for parameter in model.critic.parameters()])
    model.learn(60)
    after = th.cat([parameter.detach().flatten() for parameter in model.critic.parameters()])
    assert model._n_updates > 0 and not th.equal(before, after)


@pytest.mark.parametrize("buffer_class", [ReplayBuffer, HerReplayBuffer])
def test_one_step_buffers_refuse_n_step_returns(buffer_class):
    env = bit_flipping() if buffer_class is HerReplayBuffer else None
    policy = "MultiInputPolicy" if env is not None else "MlpPolicy"
    with pytest.raises(ValueError, match=f"n_steps=3 needs .* replay_buffer_class={buffer_class.__name__}"):
        FastTD3(policy, env or "Pendulum-v1", replay_buffer_class=buffer_class, n_steps=3)


def test_a_class_that_is_no_replay_buffer_is_refused():
    with pytest.raises(ValueError, match="replay_buffer_class must be DeviceNStepReplayBuffer"):
        FastTD3("MlpPolicy", "Pendulum-v1", replay_buffer_class=dict)


def test_sb3s_buffers_refuse_a_torch_vec_env():
    model = FastTD3("MlpPolicy", CountingTorchVecEnv(2), replay_buffer_class=ReplayBuffer, **TINY)
    with pytest.raises(ValueError, match="TorchVecEnv keeps its transitions on its device"):
        model.learn(10)
    assert model.replay_buffer.pos == 0


class OpenEpisodes(BaseCallback):
    """Records, when training starts, which envs' HER episodes are still open."""

    def _on_training_start(self) -> None:
        buffer = self.model.replay_buffer
        self.open = buffer._current_ep_start != buffer.pos

    def _on_step(self) -> bool:
        return True


@pytest.mark.parametrize("reset_num_timesteps", [True, False])
def test_her_episodes_end_where_learn_resets_the_envs(recwarn, reset_num_timesteps):
    # BitFlippingEnv's episodes last 4 steps: after 6 vector steps every env is inside one
    model = her_model(learning_starts=8)
    model.learn(12)
    assert (model.replay_buffer._current_ep_start != model.replay_buffer.pos).all()
    callback = OpenEpisodes()
    model.learn(12, callback=callback, reset_num_timesteps=reset_num_timesteps)
    assert callback.open.any() != reset_num_timesteps
    assert not [w for w in recwarn if "truncated" in str(w.message)]


def test_a_lean_sb3_buffer_marks_its_newest_row_done_where_learn_resets_the_envs():
    lean = dict(optimize_memory_usage=True, replay_buffer_kwargs=dict(handle_timeout_termination=False))  # as SB3 needs
    model = FastTD3("MlpPolicy", counting_env(1, bound=1e9), seed=0, replay_buffer_class=ReplayBuffer, **{**TINY, **lean})
    model.learn(14)  # inside the second episode of 10 steps (x is unbounded: episodes are truncated, never terminated)
    assert model.replay_buffer.dones[13, 0] == 0
    model.learn(5)
    assert model.replay_buffer.dones[13, 0] == 1


def test_her_model_save_load_predict_and_learn(tmp_path):
    model = her_model(learning_starts=8)
    model.learn(40)
    model.save(tmp_path / "model")
    with pytest.raises(
        ValueError,
        match=r"relabels goals with the env's compute_reward: pass env \(to load a model, FastTD3\.load\(path, env=env\)\)",
    ):
        FastTD3.load(tmp_path / "model")
    env = bit_flipping()
    loaded = FastTD3.load(tmp_path / "model", env=env)
    obs = env.reset()
    assert np.array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    loaded.learn(20)
    assert loaded.replay_buffer.env is env


def test_her_relabels_with_the_env_set_env_gives():
    model = her_model(learning_starts=8)
    model.learn(20)
    env = bit_flipping()
    model.set_env(env)
    assert model.replay_buffer.env is env
    model.learn(20)


def test_her_replay_buffer_save_load(tmp_path):
    model = her_model(learning_starts=8)
    model.learn(40)
    while (model.replay_buffer._current_ep_start == model.replay_buffer.pos).all():  # until an episode is open
        model.learn(2, reset_num_timesteps=False)
    model.save_replay_buffer(tmp_path / "buffer")
    observations = model.replay_buffer.observations["observation"].copy()

    other = her_model(env=bit_flipping(3))
    with pytest.raises(ValueError, match="saved with n_envs=2, but the model has n_envs=3"):
        other.load_replay_buffer(tmp_path / "buffer")
    assert other.replay_buffer.pos == 0

    env = bit_flipping()
    other = her_model(env=env, learning_starts=8)
    with pytest.warns(UserWarning, match="will be truncated"):  # SB3's warning: episodes were open when saved
        other.load_replay_buffer(tmp_path / "buffer")
    assert other.replay_buffer.env is env and np.array_equal(other.replay_buffer.observations["observation"], observations)
    other.learn(20)


def test_a_file_without_a_replay_buffer_is_refused(tmp_path):
    save_to_pkl(tmp_path / "not_a_buffer", {"observations": []})
    model = make_model(1)
    with pytest.raises(TypeError, match=r"Expected a replay buffer in .*not_a_buffer, got dict"):
        model.load_replay_buffer(tmp_path / "not_a_buffer")


def test_her_checkpoint_resumes_exactly(tmp_path):
    model = her_model(learning_starts=8, seed=0)
    model.learn(40)
    path = model.save_checkpoint(tmp_path / "at_40.zip")
    model.learn(40, reset_num_timesteps=False)

    resumed = FastTD3.load_checkpoint(path, device="cpu")
    assert resumed.replay_buffer.env is resumed.env
    resumed.learn(40, reset_num_timesteps=False)
    assert_same_parameters(model.policy.state_dict(), resumed.policy.state_dict())
