"""PlaygroundVecEnv: our auto-reset (final observation, terminated vs truncated), DLPack sharing, seeding, errors."""

import subprocess

import numpy as np
import pytest
import torch as th

pytest.importorskip("mujoco_playground")

import jax
import jax.numpy as jnp
import mujoco
from gymnasium import spaces
from mujoco_playground import State
from mujoco_playground._src import mjx_env

from sb3_fasttd3.vec_env import playground as playground_module
from sb3_fasttd3.vec_env.playground import PlaygroundVecEnv, _actions_for_jax, _Packer, needs_menagerie, playground_tasks

NUM_ENVS, EPISODE_LENGTH = 4, 5


class FakePlaygroundEnv:
    """
    A Playground-like task: x += gain * action; done (float, like Playground) once x[0] >= 1;
    dict observations like the robot tasks; the last action kept in ``info`` like the locomotion tasks.
    """

    action_size = 3

    def __init__(self):
        self._mjx_model = {"gain": jnp.ones(())}

    @property
    def mjx_model(self) -> dict:
        return self._mjx_model

    @property
    def unwrapped(self) -> "FakePlaygroundEnv":
        return self

    def _state(self, x: jax.Array, reward: jax.Array, done: jax.Array, action: jax.Array) -> State:
        obs = {"state": x, "privileged_state": jnp.concatenate([x, 2 * x])}
        return State(data={"x": x}, obs=obs, reward=reward, done=done, metrics={}, info={"last_act": action})

    def reset(self, rng: jax.Array) -> State:
        x = jnp.zeros(3).at[2].set(jax.random.uniform(rng))
        return self._state(x, jnp.zeros(()), jnp.zeros(()), jnp.zeros(3))

    def step(self, state: State, action: jax.Array) -> State:
        x = state.data["x"] + self._mjx_model["gain"] * action
        return self._state(x, x.sum(), (x[0] >= 1.0).astype(float), action)


@pytest.fixture(scope="module")
def cartpole() -> PlaygroundVecEnv:
    return PlaygroundVecEnv("CartpoleBalance", NUM_ENVS, device="cpu", episode_length=EPISODE_LENGTH, seed=0)


def step(env: PlaygroundVecEnv, actions: th.Tensor) -> tuple:
    env.step_async(actions)
    return env.step_wait()


def mujoco_step_obs(env: PlaygroundVecEnv, state: State, actions: np.ndarray) -> np.ndarray:
    """CartpoleBalance's observation after one step from ``state``, computed with MuJoCo's C simulator."""
    model = env.env.mj_model
    data = mujoco.MjData(model)
    observations = []
    for i in range(env.num_envs):
        data.qpos[:], data.qvel[:] = np.asarray(state.data.qpos[i]), np.asarray(state.data.qvel[i])
        data.ctrl[:] = actions[i]
        for _ in range(env.env.n_substeps):
            mujoco.mj_step(model, data)
        # Playground's cartpole: [cart position, pole zz, pole xz, qvel] (xmat of the last forward pass, as mjx.step)
        observations.append(np.concatenate([data.qpos[:1], data.xmat[2:, 8], data.xmat[2:, 2], data.qvel]))
    return np.stack(observations)


def test_spaces(cartpole):
    assert cartpole.observation_space == spaces.Box(-np.inf, np.inf, (5,), np.float32)
    assert cartpole.action_space == spaces.Box(-1.0, 1.0, (1,), np.float32)
    assert cartpole.device == th.device("cpu")


def test_time_limit_truncates_with_true_final_observation(cartpole):
    cartpole.seed(3)
    obs = cartpole.reset()
    first_starts = obs.clone()
    actions = th.linspace(-0.5, 0.5, NUM_ENVS).unsqueeze(1)
    rewards = th.zeros(NUM_ENVS)
    for _ in range(EPISODE_LENGTH - 1):
        obs, reward, dones, infos = step(cartpole, actions)
        rewards += reward
        assert not dones.any()
        assert th.equal(infos["final_observation"], obs)
    before = cartpole.state
    obs, reward, dones, infos = step(cartpole, actions)
    rewards += reward
    assert dones.all() and infos["truncated"].all() and not infos["terminated"].any()
    # Fresh reset states from the pool (refilled for this first episode end), not the first episode's
    assert not th.isclose(obs, first_starts).all(dim=1).any()
    second_starts = obs.clone()
    expected = mujoco_step_obs(cartpole, before, actions.numpy())
    np.testing.assert_allclose(infos["final_observation"].numpy(), expected, atol=1e-4)
    assert not th.allclose(infos["final_observation"], obs)  # obs is the reset one
    episodes, count = cartpole.episode_tracker.drain()
    assert count == NUM_ENVS and [episode["l"] for episode in episodes] == [EPISODE_LENGTH] * NUM_ENVS
    np.testing.assert_allclose([episode["r"] for episode in episodes], rewards.double().numpy(), rtol=1e-5)
    # The counters restarted with the reset: the next episode runs its full length again
    for _ in range(EPISODE_LENGTH - 1):
        assert not step(cartpole, actions)[2].any()
    # and ends with new reset states again (the pool was refilled, not handed out twice)
    obs, _, dones, _ = step(cartpole, actions)
    assert dones.all() and not th.isclose(obs, second_starts).all(dim=1).any()


def test_terminal_step_is_terminated_not_truncated():
    env = PlaygroundVecEnv(FakePlaygroundEnv(), 3, episode_length=4)
    env.reset()
    # x[0] reaches 1 at step 2 (env 0), at the last step 4 (env 1: terminal beats the time limit), never (env 2)
    actions = th.tensor([[0.5, 0.0, 0.0], [0.25, 0.0, 0.0], [0.1, 0.0, 0.0]])
    flags = []
    for _ in range(4):
        obs, reward, dones, infos = step(env, actions)
        flags.append((infos["terminated"].tolist(), infos["truncated"].tolist()))
        final = infos["final_observation"]["state"]
        np.testing.assert_allclose(reward.numpy(), final.sum(1).numpy(), rtol=1e-6)
        assert th.equal(obs["state"][~dones], final[~dones])
        assert (obs["state"][dones, :2] == 0).all()  # restarted
    assert flags[1] == ([True, False, False], [False, False, False])
    assert flags[3] == ([True, True, False], [False, False, True])  # env 0 terminated again
    np.testing.assert_allclose(final[:, 0].numpy(), [1.0, 1.0, 0.4], rtol=1e-6)
    episodes, _ = env.episode_tracker.drain()
    assert [episode["l"] for episode in episodes] == [2, 2, 4, 4]


def test_pool_refilled_only_for_an_env_without_a_prepared_state():
    """The reset runs outside the step, only when a finished env already took its prepared state; none repeats."""
    env = PlaygroundVecEnv(FakePlaygroundEnv(), 3, episode_length=4)
    restarts = []
    restart = env._restart_jit
    env._restart_jit = lambda *args: restarts.append(len(starts)) or restart(*args)
    starts = [env.reset()["state"][:, 2].clone()]
    # env 0 ends every 2 steps (terminated); envs 1 and 2 at step 4, 8, ... (env 1 terminated, env 2 truncated)
    actions = th.tensor([[0.5, 0.0, 0.0], [0.25, 0.0, 0.0], [0.1, 0.0, 0.0]])
    for _ in range(8):
        obs, _, dones, _ = step(env, actions)
        starts.append(obs["state"][dones, 2].clone())
    # The pool starts used up (step 2); env 0 again at step 4 and 8 (envs 1 and 2 take theirs in the step at 4)
    assert restarts == [2, 4, 6, 8]
    fresh = th.cat(starts)
    assert len(fresh) == 3 + 1 + 3 + 1 + 3 and len(th.unique(fresh)) == len(fresh)


def test_numpy_and_dlpack_actions_step_alike():
    """CPU actions reach the jitted step as NumPy views; other devices import them through DLPack (checked here on
    the CPU): same results, one compiled step for both, after a reset too."""
    actions = th.tensor([[0.5, 0.0, 0.0], [0.25, 0.0, 0.0], [0.1, 0.0, 0.0]])
    assert isinstance(_actions_for_jax(actions), np.ndarray)
    runs = []
    for to_jax in (_actions_for_jax, lambda tensor: jax.dlpack.from_dlpack(tensor.contiguous())):
        env = PlaygroundVecEnv(FakePlaygroundEnv(), 3, episode_length=4)
        env.reset()
        for _ in range(3):
            env._packed, env._obs, (reward, flags) = env._step_jit(env._packed, to_jax(actions))
        env.reset()
        env._packed, env._obs, (reward, flags) = env._step_jit(env._packed, to_jax(actions))
        runs.append([np.asarray(reward), np.asarray(flags), np.asarray(env.observation_arrays["state"])])
        assert env._step_jit._cache_size() == 1
    for ours, dlpack in zip(*runs, strict=True):
        np.testing.assert_array_equal(ours, dlpack)


def test_dict_observations_and_actions_not_aliased():
    env = PlaygroundVecEnv(FakePlaygroundEnv(), 2, episode_length=10)
    assert env.observation_space == spaces.Dict(
        {
            "state": spaces.Box(-np.inf, np.inf, (3,), np.float32),
            "privileged_state": spaces.Box(-np.inf, np.inf, (6,), np.float32),
        }
    )
    obs = env.reset()
    assert set(obs) == {"state", "privileged_state"} and obs["privileged_state"].shape == (2, 6)
    actions = th.full((2, 3), 0.1)
    obs, *_ = step(env, actions)
    assert obs["state"].data_ptr() == env.observation_arrays["state"].unsafe_buffer_pointer()
    # The env keeps the action in its state: it must be JAX's own copy, not the caller's torch memory
    last_act = env.state.info["last_act"]
    assert last_act.unsafe_buffer_pointer() != actions.data_ptr()
    actions.fill_(0.7)
    np.testing.assert_allclose(np.asarray(last_act), 0.1)


def test_zero_copy_and_jax_state_untouched(cartpole):
    obs = cartpole.reset()
    state = cartpole.state
    assert obs.data_ptr() == cartpole.observation_arrays.unsafe_buffer_pointer()
    snapshot, obs_snapshot = [np.array(leaf) for leaf in jax.tree.leaves(state)], obs.numpy().copy()
    for _ in range(EPISODE_LENGTH):  # includes the auto-reset step and the episode tracker's updates
        new_obs, reward, dones, infos = step(cartpole, th.ones(NUM_ENVS, 1))
    arrays = cartpole.observation_arrays  # observations then final observations, each a torch view
    assert new_obs.data_ptr() == arrays.unsafe_buffer_pointer()
    assert infos["final_observation"].data_ptr() == new_obs.data_ptr() + new_obs.numel() * new_obs.element_size()
    assert reward.dtype == th.float32 and dones.dtype == th.bool
    for before, leaf in zip(snapshot, jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), before)
    np.testing.assert_array_equal(obs.numpy(), obs_snapshot)


def test_seeding(cartpole):
    cartpole.seed(7)
    first = cartpole.reset().clone()
    cartpole.seed(7)
    assert th.equal(cartpole.reset(), first)
    assert not th.equal(cartpole.reset(), first)  # no seed: the key stream goes on
    cartpole.seed(8)
    assert not th.allclose(cartpole.reset(), first)
    assert not th.allclose(first[0], first[1])  # each env has its own key


def test_randomized_episode_start():
    env = PlaygroundVecEnv(FakePlaygroundEnv(), 8, episode_length=6, randomize_episode_start=True, seed=1)
    env.reset()
    for _ in range(6):
        step(env, th.zeros(8, 3))
    episodes, count = env.episode_tracker.drain()
    lengths = [episode["l"] for episode in episodes]
    assert count == 8 and all(1 <= length <= 6 for length in lengths) and len(set(lengths)) > 1


def test_domain_randomization_passthrough():
    def randomize(model: dict, rng: jax.Array) -> tuple[dict, dict]:
        return {"gain": jax.vmap(lambda key: jax.random.uniform(key, minval=0.5, maxval=2.0))(rng)}, {"gain": 0}

    env = PlaygroundVecEnv(FakePlaygroundEnv(), 4, episode_length=10, randomization_fn=randomize)
    env.reset()
    obs, *_ = step(env, th.full((4, 3), 0.1))
    gains = obs["state"][:, 0] / 0.1
    assert ((gains >= 0.5) & (gains <= 2.0)).all() and len(set(gains.tolist())) == 4


def test_render(cartpole):
    cartpole.reset()
    try:
        images = cartpole.get_images()
    except RuntimeError as error:  # no OpenGL backend in this process
        assert "MUJOCO_GL" in str(error)
    else:
        assert len(images) == NUM_ENVS and images[0].shape == (*cartpole.render_size, 3)


def test_robot_task_without_menagerie(monkeypatch, tmp_path):
    calls = []

    def offline_clone(url: str, path: str, commit: str) -> None:
        calls.append(url)
        raise subprocess.CalledProcessError(128, ["git", "clone", url])

    monkeypatch.setattr(mjx_env, "EXTERNAL_DEPS_PATH", tmp_path)
    monkeypatch.setattr(mjx_env, "MENAGERIE_PATH", tmp_path / "mujoco_menagerie")
    monkeypatch.setattr(mjx_env, "_clone_with_progress", offline_clone)
    with pytest.raises(RuntimeError, match="Menagerie") as error:
        PlaygroundVecEnv("Go1JoystickFlatTerrain", 2)
    assert calls and str(tmp_path / "mujoco_menagerie") in str(error.value) and "git clone" in str(error.value)


def test_task_lists_and_errors():
    tasks = playground_tasks()
    assert "CartpoleBalance" in tasks["dm_control_suite"] and "Go1JoystickFlatTerrain" in tasks["locomotion"]
    assert needs_menagerie("T1JoystickFlatTerrain") and not needs_menagerie("CheetahRun")
    with pytest.raises(ValueError, match="task="):
        PlaygroundVecEnv("NoSuchTask", 2)
    with pytest.raises(ValueError, match="config_overrides"):
        PlaygroundVecEnv(FakePlaygroundEnv(), 2, config_overrides={"episode_length": 3})
    if not any(device.platform == "gpu" for device in jax.devices()):
        with pytest.raises(ValueError, match="device="):
            PlaygroundVecEnv(FakePlaygroundEnv(), 2, device="cuda")


def test_fasttd3_stores_true_final_observations_and_leaves_jax_state_alone(cartpole):
    from sb3_fasttd3 import FastTD3

    model = FastTD3(
        "MlpPolicy", cartpole, learning_starts=8, batch_size=8, num_atoms=11, policy_kwargs=dict(net_arch=[8]), seed=0
    )
    model.learn(2 * NUM_ENVS * EPISODE_LENGTH)
    state = cartpole.state
    snapshot = [np.array(leaf) for leaf in jax.tree.leaves(state)]
    model.learn(NUM_ENVS * EPISODE_LENGTH, reset_num_timesteps=False)  # normalizer, buffer, acting on views
    for before, leaf in zip(snapshot, jax.tree.leaves(state), strict=True):
        np.testing.assert_array_equal(np.asarray(leaf), before)

    buffer, rows = model.replay_buffer, model.replay_buffer.size()
    truncated = buffer.timeouts[:, :rows]
    assert truncated.sum() == 3 * NUM_ENVS and not (buffer.dones[:, :rows] & ~truncated).any()
    # Within an episode the next observation is the next row's observation; at the time limit it is not
    # the reset observation that the next row starts from
    same = th.isclose(buffer.next_observations[:, : rows - 1], buffer.observations[:, 1:rows]).all(dim=-1)
    assert same[~truncated[:, : rows - 1]].all() and not same[truncated[:, : rows - 1]].any()


def test_eval_callback_on_a_playground_env(cartpole, tmp_path):
    from stable_baselines3.common.callbacks import EvalCallback

    from sb3_fasttd3 import FastTD3
    from sb3_fasttd3.vec_env import NumpyVecEnv

    eval_env = NumpyVecEnv(PlaygroundVecEnv("CartpoleBalance", 2, device="cpu", episode_length=EPISODE_LENGTH, seed=1))
    callback = EvalCallback(eval_env, eval_freq=EPISODE_LENGTH, n_eval_episodes=2, log_path=str(tmp_path), verbose=0)
    model = FastTD3("MlpPolicy", cartpole, learning_starts=8, batch_size=8, num_atoms=11, policy_kwargs=dict(net_arch=[8]))
    model.learn(2 * NUM_ENVS * EPISODE_LENGTH, callback=callback)
    assert len(callback.evaluations_results) == 2
    # CartpoleBalance pays at most 1 per step: a 5-step episode returns between 0 and 5
    assert all(0 <= value <= EPISODE_LENGTH for result in callback.evaluations_results for value in result)
    assert all(length == [EPISODE_LENGTH] * 2 for length in callback.evaluations_length)


def test_packer_round_trip_keeps_every_leaf(cartpole):
    tree = {
        "x": jnp.arange(6, dtype=jnp.float32).reshape(2, 3),
        "n": jnp.array([3, -1], dtype=jnp.int32),
        "key": jax.random.split(jax.random.PRNGKey(5), 2),
        "flag": jnp.array(True),
        "nested": (jnp.full((2, 1, 2), 0.5, dtype=jnp.float32), jnp.zeros((0,), dtype=jnp.int32)),
    }
    packer = _Packer(jax.eval_shape(lambda: tree))
    packed = jax.jit(packer.pack)(tree)
    assert len(packed) == 4  # one array per dtype: bool, float32, int32, uint32
    back = jax.jit(packer.unpack)(packed)
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for original, restored in zip(jax.tree.leaves(tree), jax.tree.leaves(back), strict=True):
        assert original.dtype == restored.dtype and original.shape == restored.shape
        np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))
    # The env's own batch (states, reset pool, counters, keys) crosses the jit boundary as a few arrays
    cartpole.reset()
    assert len(cartpole._packed) <= 5
    assert len(jax.tree.leaves(cartpole.state)) > 50


@pytest.mark.parametrize("release", ["0.1.0", "0.3.0", "1.0"])
def test_another_playground_release_fails_with_a_clear_error(monkeypatch, release):
    monkeypatch.setattr(playground_module, "version", lambda name: release)
    with pytest.raises(ImportError, match=rf"private modules as of playground>=0.2,<0.3, found {release}: install"):
        playground_module._private_playground_modules()
