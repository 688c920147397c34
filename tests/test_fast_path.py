"""Every fast path computes what the plain eager fp32 update computes (tiny networks, so CI stays fast)."""

import copy
import warnings

import numpy as np
import pytest
import torch as th
from stable_baselines3.common.utils import set_random_seed
from stable_baselines3.common.vec_env import VecEnvWrapper
from torch._dynamo.utils import counters
from torch._inductor import config as inductor_config

from sb3_fasttd3 import FastTD3
from tests.device import TEST_DEVICE
from tests.test_fasttd3 import TINY, counting_env, make_model

LEARNING_RATE = 3e-4


@pytest.fixture(autouse=True)
def same_random_numbers():
    # Compiled code draws the same random numbers as eager code only with fallback_random
    with inductor_config.patch(fallback_random=True):
        yield


def paired_models(**fast_kwargs):
    """An eager fp32 model and a fast-path model with the same weights, optimizer state and replay buffer."""
    plain = make_model(2, learning_starts=40, device=TEST_DEVICE)
    plain.learn(44)  # two vector steps of updates: optimizer states exist
    fast = make_model(2, learning_starts=40, device=TEST_DEVICE, **fast_kwargs)
    fast.set_parameters(plain.get_parameters())
    fast.replay_buffer = plain.replay_buffer
    fast._n_updates = plain._n_updates
    fast.set_logger(plain.logger)
    for model in (plain, fast):
        model._update_statistics.means()  # read (and reset), so that both count from here
    return plain, fast


def losses_and_gradients(model, replay_data) -> list[th.Tensor]:
    """Critic loss, mean Q, actor loss and every gradient, on the same batch and random numbers."""
    results = []
    model._begin_compiled_step()  # as each update does: the CUDA graphs of the last call may be reused
    for loss_fn, module, arg in (
        (model._critic_loss_fn, model.critic, replay_data),
        (model._actor_loss_fn, model.actor, replay_data.observations),
    ):
        th.manual_seed(0)
        module.zero_grad()
        with model._autocast():
            output = loss_fn(arg)
        loss = output[0] if isinstance(output, tuple) else output
        loss.backward()
        # Copies: a CUDA graph's outputs are overwritten by its next replay
        results += [value.detach().float().clone() for value in (output if isinstance(output, tuple) else (output,))]
        results += [param.grad.clone() for param in module.parameters()]
    return results


@pytest.mark.device
def test_compiled_fp32_losses_and_gradients_match_eager():
    plain, fast = paired_models(compile=True)
    replay_data = plain.replay_buffer.sample(32)
    counters.clear()
    for call in range(3):  # the first call compiles, the next ones reuse the graphs
        expected, actual = losses_and_gradients(plain, replay_data), losses_and_gradients(fast, replay_data)
        # Inductor fuses and reorders float32 reductions: agreement to float32 rounding
        for a, b in zip(expected, actual, strict=True):
            th.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)
        if call == 0:
            graphs_after_first_call = counters["stats"]["unique_graphs"]
    # Whole functions captured (no graph break), and no recompilation in the steady state: on a CPU the critic's
    # loss and its backward only (the actor's loss stays eager, where it skips the critic's weight gradients)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == graphs_after_first_call
    if TEST_DEVICE.type == "cpu":
        assert graphs_after_first_call == 1 and fast._actor_loss_fn == fast._actor_loss


@pytest.mark.device
def test_bf16_losses_and_gradients_close_to_fp32():
    plain, fast = paired_models(amp_dtype="bf16")
    replay_data = plain.replay_buffer.sample(32)
    expected, actual = losses_and_gradients(plain, replay_data), losses_and_gradients(fast, replay_data)
    # bf16 keeps 8 bits of mantissa (~0.4% per operation): losses within 2%, gradients pointing the same way
    for a, b in zip(expected[:2], actual[:2], strict=True):
        th.testing.assert_close(b, a, rtol=2e-2, atol=1e-2)
    for a, b in zip(expected[2:], actual[2:], strict=True):
        if a.norm() > 1e-6:
            assert th.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.98


class ActionRecorder(VecEnvWrapper):
    """Keeps a copy of every action sent to the envs."""

    def __init__(self, venv):
        super().__init__(venv)
        self.sent: list[np.ndarray] = []

    def step_async(self, actions: np.ndarray) -> None:
        self.sent.append(np.array(actions, copy=True))
        self.venv.step_async(actions)

    def reset(self):
        return self.venv.reset()

    def step_wait(self):
        return self.venv.step_wait()


@pytest.mark.device
@pytest.mark.parametrize("n_steps", [1, 3])
def test_compiled_learning_stores_the_actions_it_took(n_steps):
    # The compiled actor's output lives in CUDA graph memory on a GPU, rewritten by the graph's next replay and
    # reused after each update's step mark: every action the envs received must reach the buffer intact
    env = ActionRecorder(counting_env(2))
    kwargs = dict(learning_starts=10, n_steps=n_steps, compile=True, device=TEST_DEVICE, seed=0)
    model = FastTD3("MlpPolicy", env, **{**TINY, **kwargs})
    model.learn(60)
    assert model._n_updates > 0
    sent = np.stack(env.sent, axis=1)  # (n_envs, vector steps, action_dim) in the env's units
    rows = model.replay_buffer.pos  # the window of an n-step return is written once it is complete
    assert rows >= len(env.sent) - n_steps
    stored = model.replay_buffer.actions[:, :rows].cpu().numpy()
    np.testing.assert_allclose(stored * 2.0, sent[:, :rows], atol=1e-6)  # the action space is [-2, 2]


FP16 = pytest.mark.skipif(TEST_DEVICE.type != "cuda", reason="fp16 autocast with its gradient scaler needs CUDA")


@pytest.mark.device
@pytest.mark.parametrize(
    "fast_kwargs",
    [
        dict(compile=True),
        dict(amp_dtype="bf16", compile=True),
        pytest.param(dict(amp_dtype="fp16"), marks=FP16),
        pytest.param(dict(amp_dtype="fp16", compile=True), marks=FP16),
    ],
)
def test_fast_train_calls_follow_the_plain_ones(fast_kwargs):
    plain, fast = paired_models(**fast_kwargs)
    n_calls = 3
    for seed in range(n_calls):  # each call: one critic-only and one critic+actor update
        for model in (plain, fast):
            set_random_seed(seed)
            model.train(gradient_steps=2, batch_size=16)
    tolerance = 2e-2 if "amp_dtype" in fast_kwargs else 1e-4
    th.testing.assert_close(fast._update_statistics.sums, plain._update_statistics.sums, rtol=tolerance, atol=tolerance)
    # Adam's step is at most about lr per parameter and update: where a gradient is ~0 its sign is
    # rounding noise, so parameters may differ by up to 2 * lr per update
    bound = 2 * LEARNING_RATE * 2 * n_calls + 1e-6
    for name, value in plain.policy.state_dict().items():
        assert (fast.policy.state_dict()[name] - value).abs().max() <= bound, name


def test_amp_dtype_is_validated():
    with pytest.raises(ValueError, match=r"amp_dtype must be one of \[None, 'bf16', 'fp16', 'auto'\]"):
        make_model(amp_dtype="fp8")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        make_model(amp_dtype="fp16", device="cpu")


def fake_native_bf16(monkeypatch: pytest.MonkeyPatch, native: bool) -> None:
    """Make PyTorch report a CPU with (``native``) or without AVX512-BF16 and AMX."""
    monkeypatch.setattr(th.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(th.cpu, "_is_amx_tile_supported", lambda: False)


@pytest.mark.parametrize("native", [False, True])
def test_auto_amp_dtype_takes_bf16_where_the_cpu_multiplies_it_natively(
    monkeypatch: pytest.MonkeyPatch, tmp_path, native: bool
):
    fake_native_bf16(monkeypatch, native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = make_model(amp_dtype="auto", device="cpu")
    assert not [w for w in caught if "without AVX512-BF16 or AMX" in str(w.message)]  # never an emulated bf16
    expected = th.bfloat16 if native else None
    assert model.autocast_dtype == expected
    with model._autocast():
        assert th.is_autocast_enabled("cpu") == native
        assert not native or th.get_autocast_dtype("cpu") == th.bfloat16
    # Saved as "auto", resolved again by the machine that loads it
    model.save(tmp_path / "model.zip")
    fake_native_bf16(monkeypatch, not native)
    loaded = FastTD3.load(tmp_path / "model.zip", device="cpu")
    assert loaded.amp_dtype == "auto"
    assert loaded.autocast_dtype == (None if native else th.bfloat16)


@pytest.mark.parametrize("native", [False, True])
def test_bf16_on_a_cpu_without_native_bf16_warns(monkeypatch: pytest.MonkeyPatch, native: bool):
    fake_native_bf16(monkeypatch, native)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_model(amp_dtype="bf16", device="cpu")
        make_model(amp_dtype=None, device="cpu")
    emulated = [w for w in caught if "without AVX512-BF16 or AMX" in str(w.message)]
    assert len(emulated) == (0 if native else 1)


def test_compiled_acting_matches_eager_and_shares_the_actor_weights():
    plain, fast = paired_models(compile=True)
    fast.exploration_noise = copy.deepcopy(plain.exploration_noise)
    obs = plain.replay_buffer.sample(2).observations
    for _ in range(2):
        th.manual_seed(0)
        expected = plain._noisy_actions(obs)
        th.manual_seed(0)
        th.testing.assert_close(fast._act_fn(obs), expected, rtol=1e-5, atol=1e-6)
    # No copy of the weights: a change of the actor shows in the next compiled action
    with th.no_grad():
        for model in (plain, fast):
            model.actor.mu[-2].bias.add_(0.5)
    th.manual_seed(1)
    expected = plain._noisy_actions(obs)
    th.manual_seed(1)
    th.testing.assert_close(fast._act_fn(obs), expected, rtol=1e-5, atol=1e-6)


def test_compiled_acting_reads_the_correlated_noise_as_it_advances():
    plain, fast = paired_models(compile=True)
    for model in (plain, fast):
        model.noise_correlation = 5.0
        model.exploration_noise = model._make_exploration_noise()
    fast.exploration_noise.sigmas.copy_(plain.exploration_noise.sigmas)
    obs = plain.replay_buffer.sample(2).observations
    previous = None
    for _ in range(3):
        # Advanced outside the graph: the compiled actor must see the new state, not one traced as a constant
        plain.exploration_noise.advance()
        fast.exploration_noise.unit.copy_(plain.exploration_noise.unit)
        expected = plain._noisy_actions(obs)
        th.testing.assert_close(fast._act_fn(obs), expected, rtol=1e-5, atol=1e-6)
        assert previous is None or not th.equal(expected, previous)
        previous = expected


def test_models_built_one_after_another_each_compile():
    # Dynamo counts recompilations per code object: with a limit of 1, a second model sharing the first one's
    # code would run eager (dynamo gives up and says so in a log line only). The limit is patched with dynamo's own
    # context manager: restored by monkeypatch, the config attribute is lost for the rest of the session.
    graphs = []
    with th._dynamo.config.patch(recompile_limit=1):
        for seed in range(3):
            model = make_model(2, learning_starts=40, compile=True, seed=seed)
            counters.clear()
            model.learn(48)
            graphs.append(counters["stats"]["unique_graphs"])
    # Each model compiled its critic loss and its acting function (its actor loss stays eager on a CPU)
    assert all(count >= 2 for count in graphs), graphs


def test_a_model_trained_in_fp16_loads_on_a_cpu_in_fp32(tmp_path):
    model = make_model(2, learning_starts=20)
    model.learn(30)
    model.amp_dtype = "fp16"  # what a model trained on a GPU in fp16 saves
    model.save(tmp_path / "fp16_model")
    with pytest.warns(UserWarning, match="amp_dtype='fp16' needs a CUDA device: the model loaded on cpu runs in fp32"):
        loaded = FastTD3.load(tmp_path / "fp16_model", env=model.get_env(), device="cpu")
    assert loaded.autocast_dtype is None and loaded.amp_dtype == "fp16"  # kept: fp16 again where CUDA is
    obs = model.get_env().reset()
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], model.predict(obs, deterministic=True)[0])
    loaded.learn(20, reset_num_timesteps=False)  # and trains on
