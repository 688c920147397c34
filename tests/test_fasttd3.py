"""FastTD3 as an SB3 algorithm: save/load/predict/set_env/resume, callbacks, logging, updates."""

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.callbacks import BaseCallback, CheckpointCallback, EvalCallback, StopTrainingOnRewardThreshold
from stable_baselines3.common.env_util import make_vec_env
from stable_baselines3.common.evaluation import evaluate_policy
from stable_baselines3.common.logger import configure
from stable_baselines3.common.type_aliases import ReplayBufferSamples
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import DummyVecEnv, SubprocVecEnv, VecMonitor

from sb3_fasttd3 import FastTD3
from tests.envs import CountingEnv, CountingTorchVecEnv

TINY = dict(
    batch_size=16,
    learning_starts=20,
    num_atoms=11,
    v_min=-50.0,
    v_max=10.0,
    policy_kwargs=dict(net_arch=dict(pi=[16], qf=[32, 16])),
)


def counting_env(n_envs: int = 1, dict_obs: bool = False, **kwargs) -> DummyVecEnv:
    return make_vec_env(CountingEnv, n_envs=n_envs, seed=0, env_kwargs=dict(dict_obs=dict_obs, **kwargs))


def make_model(n_envs: int = 1, dict_obs: bool = False, **kwargs) -> FastTD3:
    policy = "MultiInputPolicy" if dict_obs else "MlpPolicy"
    return FastTD3(policy, counting_env(n_envs, dict_obs), **{"seed": 0, **TINY, **kwargs})


def observations(env, n: int = 5):
    env.reset()
    samples = [env.observation_space.sample() for _ in range(n)]
    if isinstance(samples[0], dict):
        return {key: np.stack([s[key] for s in samples]) for key in samples[0]}
    return np.stack(samples)


@pytest.mark.parametrize("n_envs", [1, 4])
@pytest.mark.parametrize("dict_obs", [False, True])
def test_save_load_predict_resume(tmp_path, n_envs, dict_obs):
    model = make_model(n_envs, dict_obs)
    model.learn(120)
    assert model._n_updates > 0
    obs = observations(model.get_env())
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "model")

    # Another number of envs, device given explicitly
    other_n_envs = 4 if n_envs == 1 else 1
    loaded = FastTD3.load(tmp_path / "model", env=counting_env(other_n_envs, dict_obs), device="cpu")
    assert loaded.n_envs == other_n_envs
    # The loaded policy normalizes with the training statistics: same deterministic actions
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)
    normalizer = loaded.policy.obs_normalizer
    counts = [normalizer.count] if not dict_obs else [n.count for n in normalizer.normalizers.values()]
    assert all(count.item() > 0 for count in counts)
    # Optimizers are restored: training resumes where it stopped
    for name in ("actor", "critic"):
        saved_state = getattr(model, name).optimizer.state_dict()["state"]
        loaded_state = getattr(loaded, name).optimizer.state_dict()["state"]
        assert saved_state.keys() == loaded_state.keys() and len(saved_state) > 0
        for key in saved_state:
            th.testing.assert_close(saved_state[key]["exp_avg"], loaded_state[key]["exp_avg"])
    n_updates, num_timesteps = loaded._n_updates, loaded.num_timesteps
    loaded.learn(40 * other_n_envs, reset_num_timesteps=False)
    assert loaded._n_updates > n_updates and loaded.num_timesteps == num_timesteps + 40 * other_n_envs
    assert loaded.exploration_noise.sigmas.shape == (other_n_envs, 1)


def test_predict_only_load_allocates_no_replay_buffer(tmp_path):
    model = make_model()
    model.learn(60)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    assert loaded.replay_buffer.size() == 0 and not loaded.replay_buffer.is_allocated
    loaded.predict(np.zeros((2, 3), dtype=np.float32), deterministic=True)
    assert not loaded.replay_buffer.is_allocated


def test_load_overrides_hyperparameters(tmp_path):
    make_model().save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model", std_max=0.2, gradient_steps=3, target_policy_noise=0.3)
    assert (loaded.std_max, loaded.gradient_steps, loaded.target_policy_noise) == (0.2, 3, 0.3)
    with pytest.raises(ValueError, match="num_atoms"):
        FastTD3.load(tmp_path / "model", num_atoms=1)


def test_set_env_and_parameters_round_trip():
    model = make_model(2)
    model.learn(60)
    params = model.get_parameters()
    other = make_model(2, seed=1)
    other.set_parameters(params)
    obs = observations(model.get_env())
    np.testing.assert_allclose(other.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    model.set_env(counting_env(2))
    model.learn(40, reset_num_timesteps=False)
    assert model.num_timesteps == 100


def test_replay_buffer_save_load_round_trip(tmp_path):
    model = make_model(2)
    model.learn(60)
    model.save_replay_buffer(tmp_path / "buffer")
    other = make_model(2)
    other.load_replay_buffer(tmp_path / "buffer")
    assert other.replay_buffer.size() == model.replay_buffer.size() == 30
    th.testing.assert_close(other.replay_buffer.observations, model.replay_buffer.observations)
    th.testing.assert_close(other.replay_buffer.rewards, model.replay_buffer.rewards)
    # Its windows were computed with n_steps and gamma: refused by a model with others, nothing replaced
    for kwargs, match in ((dict(n_steps=2), "n_steps=1 with gamma=0.99"), (dict(gamma=0.9), "n_steps=1, gamma=0.9")):
        fourth = make_model(2, **kwargs)
        kept = fourth.replay_buffer
        with pytest.raises(ValueError, match=match):
            fourth.load_replay_buffer(tmp_path / "buffer")
        assert fourth.replay_buffer is kept


class WideActionEnv(CountingEnv):
    """CountingEnv with a second action (that it ignores)."""

    def __init__(self):
        super().__init__()
        self.action_space = spaces.Box(-2.0, 2.0, shape=(2,), dtype=np.float32)


def stored_transitions(model: FastTD3) -> set[tuple[float, ...]]:
    """Every transition the model's buffer stores, as tuples of its fields' values."""
    buffer = model.replay_buffer
    flat = (buffer._oldest() + th.arange(buffer.n_transitions)) % (buffer.ring_rows * buffer.n_envs)
    rows = [table.index_select(0, flat) for table in buffer._flat_tables()]
    samples = buffer._samples(flat, rows, None)
    columns = [value.reshape(len(flat), -1).double() for value in samples]
    return {tuple(row) for row in th.cat(columns, dim=1).tolist()}


@pytest.mark.parametrize("n_envs, lean", [(3, False), (1, True), (4, True)])
def test_replay_buffer_loads_into_another_number_of_envs(tmp_path, n_envs, lean):
    # Saved with 2 envs in the full layout: re-laid for the model's envs and layout, every transition kept
    model = make_model(2, n_steps=3)
    model.learn(60)
    model.save_replay_buffer(tmp_path / "buffer")
    other = make_model(n_envs, n_steps=3, buffer_size=16, optimize_memory_usage=lean)
    other.load_replay_buffer(tmp_path / "buffer")
    buffer = other.replay_buffer
    assert buffer.n_envs == n_envs and buffer.optimize_memory_usage == lean and buffer.n_transitions == 60
    assert buffer.buffer_size * n_envs >= 60 and not buffer.open_windows.any()
    assert stored_transitions(other) == stored_transitions(model)
    other.learn(20 * n_envs, reset_num_timesteps=False)
    assert other.replay_buffer.n_transitions == 60 + 20 * n_envs or other.replay_buffer.full


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(dict_obs=True), r"observation_space=Box\(.*\) but the model has observation_space=Dict"),
        (dict(wide_action=True), r"action_space=Box\(.*\(1,\).*\) but the model has action_space=Box\(.*\(2,\)"),
        (
            dict(replay_buffer_kwargs=dict(handle_timeout_termination=False)),
            "handle_timeout_termination=True but the model has handle_timeout_termination=False",
        ),
    ],
)
def test_replay_buffer_of_other_spaces_is_refused(tmp_path, kwargs, match):
    make_model(2).save_replay_buffer(tmp_path / "buffer")  # saved empty: still checked
    if kwargs.pop("wide_action", False):
        other = FastTD3("MlpPolicy", make_vec_env(WideActionEnv, n_envs=2, seed=0), seed=0, **TINY)
    else:
        other = make_model(2, **kwargs)
    kept = other.replay_buffer
    with pytest.raises(ValueError, match=match) as error:
        other.load_replay_buffer(tmp_path / "buffer")
    assert "The model's current buffer was kept" in str(error.value)
    assert other.replay_buffer is kept


@pytest.mark.parametrize("reset_num_timesteps", [True, False])
def test_env_reset_ends_open_windows(reset_num_timesteps):
    # Pendulum episodes last 200 steps: after 12 steps, the windows of rows 8 to 11 are still open (shorter than 5 rows)
    model = FastTD3("MlpPolicy", "Pendulum-v1", seed=0, **{**TINY, "n_steps": 5, "learning_starts": 1000})
    model.learn(12)
    open_windows = model.replay_buffer.open_windows[0]
    assert open_windows[8:12].all() and not open_windows[:8].any()
    rewards_before = model.replay_buffer.n_step_returns.clone()
    model.learn(5, reset_num_timesteps=reset_num_timesteps)
    returns = model.replay_buffer.n_step_returns
    if reset_num_timesteps:
        # The envs were reset: the newest rows' windows did not reach into the new episode
        th.testing.assert_close(returns[:, :12], rewards_before[:, :12])
    else:
        # The same episode goes on: the windows of rows 8 to 11 grew with rows 12 to 15
        assert not th.equal(returns[:, 8:12], rewards_before[:, 8:12])
    th.testing.assert_close(returns[:, :8], rewards_before[:, :8])


@pytest.mark.parametrize("torch_env", [False, True])
def test_n_step_start_keeps_one_step_returns_for_the_first_transitions(torch_env):
    # 2 envs, n_step_start=20: the 9 vector steps that end below 20 transitions keep one-step returns, the next ones
    # open windows that grow with the following rows until an episode ends
    env = CountingTorchVecEnv(num_envs=2, max_steps=100, bound=100.0) if torch_env else counting_env(2, max_steps=100)
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, "n_steps": 3, "n_step_start": 20, "learning_starts": 1000})
    model.learn(40)
    buffer = model.replay_buffer
    lengths, goes_on = buffer.window_lengths, ~buffer.dones
    assert (lengths[:, :9] == 1).all()
    assert goes_on[:, 9:19].any() and (lengths[:, 9:19][goes_on[:, 9:19]] >= 2).all()
    assert not buffer.one_step_returns


@pytest.mark.parametrize("torch_env", [False, True])
def test_n_step_max_noise_keeps_one_step_returns_for_warmup_and_the_noisiest_envs(torch_env, tmp_path):
    # Stratified scales in [0, 0.4) put envs 2 and 3 above 0.2; no episode ends, so the scales stay. The 2 vector
    # steps of uniform warm-up keep one-step returns, then only envs 2 and 3 do
    env = CountingTorchVecEnv(num_envs=4, max_steps=100, bound=100.0) if torch_env else counting_env(4, max_steps=100)
    kwargs = dict(n_steps=3, learning_starts=8, std_min=0.0, std_max=0.4, stratified_noise=True, n_step_max_noise=0.2)
    model = FastTD3("MlpPolicy", env, seed=0, **{**TINY, **kwargs})
    model.learn(40)
    lengths = model.replay_buffer.window_lengths[:, :10]
    assert th.equal(model.exploration_noise.sigmas[:, 0] > 0.2, th.tensor([False, False, True, True]))
    assert (lengths[:, :2] == 1).all() and (lengths[2:] == 1).all()
    assert (lengths[:2, 2:8] == 3).all()
    model.save(tmp_path / "model.zip")
    assert FastTD3.load(tmp_path / "model.zip").n_step_max_noise == 0.2


def test_same_seed_same_results():
    # As in SB3's own test: build and train one model, then the other (they share the global RNGs)
    first = make_model(2).learn(100)
    second = make_model(2).learn(100)
    for a, b in zip(first.policy.state_dict().values(), second.policy.state_dict().values(), strict=True):
        assert th.equal(a, b)


def test_std_range_reaches_the_noise_and_sigmas_are_not_saved():
    model = make_model(8, std_min=0.3, std_max=0.35)
    model.learn(16)
    noise = model.exploration_noise
    assert (noise.std_min, noise.std_max) == (0.3, 0.35)
    assert ((noise.sigmas >= 0.3) & (noise.sigmas <= 0.35)).all()
    assert not any("sigma" in key for key in model.policy.state_dict())


def test_a_std_range_changed_between_learn_calls_reaches_the_noise():
    model = make_model(4, std_min=0.3, std_max=0.4)
    model.learn(16)
    model.std_min, model.std_max = 0.0, 0.01
    model.learn(16, reset_num_timesteps=False)
    noise = model.exploration_noise
    assert (noise.std_min, noise.std_max) == (0.0, 0.01) and (noise.sigmas <= 0.01).all()
    model.std_min = 0.5  # above std_max: refused before anything is collected
    with pytest.raises(ValueError, match="std_min must be <= std_max"):
        model.learn(16, reset_num_timesteps=False)
    assert model.num_timesteps == 32


def test_stratified_noise_reaches_the_noise_and_is_saved(tmp_path):
    model = make_model(4, std_min=0.0, std_max=0.4, stratified_noise=True)
    model.learn(16)
    noise = model.exploration_noise
    assert noise.stratified
    slice_starts = th.arange(4).reshape(-1, 1) * 0.1
    assert ((noise.sigmas >= slice_starts) & (noise.sigmas < slice_starts + 0.1)).all()
    model.save(tmp_path / "model.zip")
    assert FastTD3.load(tmp_path / "model.zip").stratified_noise


def test_noise_correlation_reaches_the_noise_advances_while_acting_and_is_saved(tmp_path):
    model = make_model(4, noise_correlation=30.0, learning_starts=0)
    model.learn(8)
    noise = model.exploration_noise
    assert noise.correlation == 30.0 and noise.unit.shape == (4, model.action_space.shape[0])
    before = noise.unit.clone()
    model.learn(4, reset_num_timesteps=False)  # one vector step: one AR(1) step, close to the last state
    assert not th.equal(noise.unit, before)
    assert th.corrcoef(th.stack([noise.unit.flatten(), before.flatten()]))[0, 1] > 0.5
    model.save(tmp_path / "model.zip")
    assert FastTD3.load(tmp_path / "model.zip").noise_correlation == 30.0


def test_actor_is_updated_every_policy_delay_critic_updates_counted_globally():
    # 3 critic updates per vector step, actor every 2: 1, 2, 1, 2 actor updates over 4 steps (6 in total)
    model = make_model(gradient_steps=3, policy_delay=2, learning_starts=16)
    model.learn(20)
    critic_steps = next(iter(model.critic.optimizer.state.values()))["step"].item()
    actor_steps = next(iter(model.actor.optimizer.state.values()))["step"].item()
    assert model._n_updates == critic_steps == 12
    assert actor_steps == 6


@pytest.mark.parametrize("use_target_actor", [False, True])
def test_soft_updates_keep_the_targets_out_of_autograd(use_target_actor):
    # Recorded by autograd, each soft update would chain a node onto every target weight: memory growing all run
    model = make_model(use_target_actor=use_target_actor)
    before = [p.clone() for p in model._critic_target_params + model._actor_target_params]
    model.learn(60)
    targets = model._critic_target_params + model._actor_target_params
    assert len(targets) == len(before) and (len(model._actor_target_params) > 0) == use_target_actor
    for param, initial in zip(targets, before, strict=True):
        assert param.is_leaf and param.grad_fn is None and not param.requires_grad
        assert not th.equal(param, initial)  # the soft updates did happen


def test_actor_step_computes_no_critic_gradient():
    # The actor's loss goes through the critic: its backward must stop at the actor's weights
    model = make_model()
    model.learn(40)
    data = model.replay_buffer.sample(16)
    model.critic.optimizer.zero_grad(set_to_none=True)
    model._optimize(model.actor.optimizer, model._actor_loss(data.observations), model._actor_params)
    assert all(param.grad is None for param in model._critic_params)
    assert all(param.grad is not None and param.grad.abs().sum() > 0 for param in model._actor_params)


@pytest.mark.parametrize("use_cdq", [True, False])
def test_actor_loss_reads_the_critics_actor_q_names(use_cdq):
    model = make_model(use_cdq=use_cdq)
    model.learn(40)
    obs = model.replay_buffer.sample(16).observations
    actions = model.actor(model.policy.actor_input(obs))
    q_values = model.policy.q_values(model.critic, model.policy.critic_input(obs), actions)
    assert q_values.shape == (2, 16) and not th.allclose(q_values[0], q_values[1])
    expected = {"all": q_values.min(0).values if use_cdq else q_values.mean(0), "q1": q_values[0]}
    for actor_q, q_value in expected.items():
        model.actor_q = actor_q
        th.testing.assert_close(model._actor_loss(obs), -q_value.mean())


@pytest.mark.parametrize("batched_critics", [False, True])
def test_actor_q1_skips_the_other_critics_in_the_actor_step(batched_critics):
    model = make_model(
        actor_q="q1", policy_delay=1, policy_kwargs=dict(TINY["policy_kwargs"], batched_critics=batched_critics)
    )
    calls = {0: 0, 1: 0}

    def count(_module, _inputs, logits):  # logits of the Q-networks evaluated, shape (n_critics, batch, atoms)
        for index in range(logits.shape[0]):
            calls[index] += 1

    model.critic.register_forward_hook(count)
    model.learn(40)
    # Each update runs both critics once in the critic step; the actor step adds a pass of the first only
    assert model._n_updates > 0
    assert calls == {0: 2 * model._n_updates, 1: model._n_updates}


@pytest.mark.parametrize("dict_obs", [False, True])
def test_truncation_stores_true_final_observation(dict_obs):
    model = make_model(2, dict_obs, learning_starts=1000)  # random actions: only the collection matters
    model.learn(24)  # 12 vector steps, episodes of at most 10 steps
    buffer = model.replay_buffer
    all_obs, all_next_obs = buffer.observations, buffer.next_observations
    if dict_obs:
        th.testing.assert_close(all_obs["privileged_state"][..., :3], all_obs["state"])
        th.testing.assert_close(all_next_obs["privileged_state"][..., :3], all_next_obs["state"])
        all_obs, all_next_obs = all_obs["state"], all_next_obs["state"]
    for env_idx in range(2):
        obs, next_obs = all_obs[env_idx, :12], all_next_obs[env_idx, :12]
        dones, timeouts = buffer.dones[env_idx, :12], buffer.timeouts[env_idx, :12]
        # next obs continues the same episode (t + 1, same episode id), including at done steps
        th.testing.assert_close(next_obs[:, 0], obs[:, 0] + 1)
        th.testing.assert_close(next_obs[:, 1], obs[:, 1])
        assert dones.any()
        # A truncation happens at t == 10 exactly; terminations happen when |x| > 5
        assert th.equal(timeouts, dones & (next_obs[:, 0] == 10) & (next_obs[:, 2].abs() <= 5))


def test_critic_targets_with_and_without_cdq():
    for use_cdq in (True, False):
        model = make_model(use_cdq=use_cdq)
        model.learn(40)
        data = model.replay_buffer.sample(8)
        target = model._target_distribution(data)
        assert target.shape == (2, 8, model.num_atoms)
        means = (target * model.policy.support).sum(-1)
        if use_cdq:
            assert th.equal(target[0], target[1])
            # ... and it is the one with the smaller mean among the two critics' own targets
            model.use_cdq = False
            th.manual_seed(0)
            own = model._target_distribution(data)
            th.manual_seed(0)
            model.use_cdq = True
            cdq = model._target_distribution(data)
            th.testing.assert_close(
                (cdq[0] * model.policy.support).sum(-1), (own * model.policy.support).sum(-1).min(0).values
            )
        else:
            assert not th.equal(target[0], target[1])
        th.testing.assert_close(target.sum(-1), th.ones(2, 8))
        assert means.shape == (2, 8)


def test_terminal_targets_ignore_the_next_state():
    model = make_model()
    model.learn(40)
    data = model.replay_buffer.sample(4)
    data = ReplayBufferSamples(
        data.observations, data.actions, data.next_observations, th.ones(4, 1), th.full((4, 1), -3.0), data.discounts
    )
    target = model._target_distribution(data)
    # Reward -3 on the support linspace(-50, 10, 11) (step 6): between atoms -8 and -2, 1/6 and 5/6
    expected = th.zeros(model.num_atoms)
    expected[7], expected[8] = 1 / 6, 5 / 6
    th.testing.assert_close(target[0], expected.expand(4, -1))


def test_callbacks_progress_bar_and_logs(tmp_path):
    model = make_model(2)
    model.set_logger(configure(str(tmp_path), ["csv"]))
    eval_env = counting_env(1)
    stop = StopTrainingOnRewardThreshold(reward_threshold=1e9)
    callbacks = [
        EvalCallback(eval_env, eval_freq=20, n_eval_episodes=2, callback_on_new_best=stop, best_model_save_path=str(tmp_path)),
        CheckpointCallback(save_freq=30, save_path=str(tmp_path / "ckpt")),
    ]
    model.learn(120, callback=callbacks, progress_bar=True, log_interval=1)
    assert (tmp_path / "best_model.zip").exists()
    assert len(list((tmp_path / "ckpt").glob("*.zip"))) == 2  # callbacks run once per vector step (60 steps)
    header = (tmp_path / "progress.csv").read_text().splitlines()[0].split(",")
    for key in ("train/critic_loss", "train/actor_loss", "train/q_mean", "train/n_updates", "time/fps", "rollout/ep_rew_mean"):
        assert key in header
    assert "train/learning_rate" in header  # SB3's key, which TD3 dashboards read


def test_stop_training_on_reward_threshold():
    model = make_model()
    stop = StopTrainingOnRewardThreshold(reward_threshold=-1e9)
    model.learn(1000, callback=EvalCallback(counting_env(1), eval_freq=30, n_eval_episodes=1, callback_on_new_best=stop))
    assert model.num_timesteps == 30


def test_subproc_and_vec_monitor():
    env = VecMonitor(SubprocVecEnv([lambda: CountingEnv() for _ in range(2)]))
    try:
        model = FastTD3("MlpPolicy", env, seed=0, **TINY)
        model.learn(60)
        assert len(model.ep_info_buffer) > 0
    finally:
        env.close()


def test_dict_observations_use_actor_and_critic_keys():
    model = make_model(dict_obs=True)
    assert model.policy.actor_keys == ["state"] and model.policy.critic_keys == ["privileged_state"]
    assert model.actor.mu[0].in_features == 3
    assert model.critic.q_networks.linears[0].in_features == 4 + 1
    explicit = make_model(dict_obs=True, policy_kwargs=dict(TINY["policy_kwargs"], critic_keys=["state", "privileged_state"]))
    assert explicit.critic.q_networks.linears[0].in_features == 3 + 4 + 1


class RecordSigmas(BaseCallback):
    """Record the exploration sigmas and the dones seen at every vector step."""

    def __init__(self):
        super().__init__()
        self.sigmas, self.dones = [], []

    def _on_step(self) -> bool:
        self.sigmas.append(self.model.exploration_noise.sigmas.squeeze(1).clone())
        self.dones.append(th.as_tensor(self.locals["dones"]))
        return True


def test_sigmas_are_redrawn_during_learning_only_where_episodes_end():
    model = make_model(3, learning_starts=0)
    recorder = RecordSigmas()
    model.learn(90, callback=recorder)  # 30 vector steps, episodes of at most 10 steps
    # The callback sees the sigmas once the step's dones are handled: compare consecutive steps
    changed = th.stack([after != before for before, after in zip(recorder.sigmas, recorder.sigmas[1:], strict=False)])
    ended = th.stack(recorder.dones[1:])
    assert ended.any() and not ended.all()
    assert th.equal(changed, ended)


def test_normalizer_sees_collected_observations_only():
    model = make_model(2)
    model.learn(60)
    normalizer = model.policy.obs_normalizer
    # Every observation acted upon is the `observations` row of a stored transition (no wrap-around yet)
    collected = model.replay_buffer.observations[:, :30].reshape(-1, 3).double()
    assert normalizer.count.item() == 60
    th.testing.assert_close(normalizer.mean.double(), collected.mean(0), rtol=1e-5, atol=1e-5)
    th.testing.assert_close(normalizer.var.double(), collected.var(0, unbiased=False), rtol=1e-4, atol=1e-5)
    state = {key: value.clone() for key, value in normalizer.state_dict().items()}
    model.train(gradient_steps=5, batch_size=16)
    evaluate_policy(model, counting_env(1), n_eval_episodes=2)
    model.predict(observations(model.get_env()))
    for key, value in normalizer.state_dict().items():
        assert th.equal(value, state[key]), key


@pytest.mark.parametrize("warmup_actions", ["uniform", "actor"])
def test_warmup_actions(warmup_actions):
    model = make_model(2, learning_starts=10_000, std_min=0.05, std_max=0.05, warmup_actions=warmup_actions)
    model.learn(400)
    actions = model.replay_buffer.actions[:, :200].reshape(-1)
    assert model._n_updates == 0  # nothing learned yet: the actor is the initial one
    if warmup_actions == "uniform":
        assert 0.5 < actions.std() < 0.65 and actions.abs().max() > 0.95  # U(-1, 1): std 0.577
    else:
        with th.no_grad():
            initial = model.actor(model.replay_buffer.observations[:, :200].reshape(-1, 3))
        noise = actions - initial.reshape(-1)
        assert initial.abs().max() < 0.2 and 0.04 < noise.std() < 0.06  # the near-zero actor plus its 0.05 noise


def test_reference_normalization_reaches_the_policy_and_survives_save_load(tmp_path):
    model = make_model(2, epsilon=0.01, epsilon_on_std=True, clip_obs=None)
    model.learn(40)
    model.save(tmp_path / "model")
    for loaded in (model, FastTD3.load(tmp_path / "model")):
        normalizer = loaded.policy.obs_normalizer
        assert (normalizer.epsilon, normalizer.clip_obs, normalizer.epsilon_on_std) == (0.01, None, True)
    obs = observations(model.get_env())
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])


@pytest.mark.parametrize("dict_obs", [False, True])
def test_one_gather_serves_every_update_of_a_train_call(dict_obs, monkeypatch):
    model = make_model(2, dict_obs, learning_starts=40)
    model.learn(40)
    calls = []
    sample = model.replay_buffer.sample
    monkeypatch.setattr(model.replay_buffer, "sample", lambda n, env=None: calls.append(n) or sample(n, env))
    set_random_seed(0)
    batches = list(model._sample_batches(3, 16))
    assert calls == [48] and len(batches) == 3
    set_random_seed(0)
    whole = sample(48)
    for i, batch in enumerate(batches):
        rows = slice(16 * i, 16 * (i + 1))
        th.testing.assert_close(batch.rewards, whole.rewards[rows])
        th.testing.assert_close(batch.discounts, whole.discounts[rows])
        if dict_obs:
            th.testing.assert_close(batch.observations["state"], whole.observations["state"][rows])
        else:
            th.testing.assert_close(batch.observations, whole.observations[rows])
    # Groups never exceed MAX_SAMPLES_PER_GATHER transitions
    monkeypatch.setattr("sb3_fasttd3.fasttd3.fasttd3.MAX_SAMPLES_PER_GATHER", 32)
    calls.clear()
    assert len(list(model._sample_batches(5, 16))) == 5
    assert calls == [32, 32, 16]
