"""``actor_average_tau``: a moving average of the actor that ``predict()`` acts with, while the live actor explores."""

import numpy as np
import torch as th

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.fasttd3.policies import Actor
from tests.test_fasttd3 import counting_env, make_model, observations


def average_params(model: FastTD3) -> list[th.Tensor]:
    return [param.detach().clone() for param in model.policy.actor_average.parameters()]


def deterministic_actions(actor: th.nn.Module, model: FastTD3, obs: np.ndarray) -> th.Tensor:
    """An actor's actions in [-1, 1] on raw observations, normalized as the policy does."""
    with th.no_grad():
        return actor(model.policy.actor_input(th.as_tensor(obs, dtype=th.float32)))


def test_the_average_moves_towards_the_actor_after_each_actor_step():
    tau = 0.25
    model = make_model(actor_average_tau=tau, policy_delay=2)
    model.learn(40)
    expected = average_params(model)
    for _ in range(6):
        n_updates = model._n_updates
        model.train(gradient_steps=1, batch_size=model.batch_size)
        if model._n_updates % model.policy_delay == 0:  # an actor step: the average follows it
            live = [param.detach() for param in model.actor.parameters()]
            expected = [average + tau * (param - average) for average, param in zip(expected, live, strict=True)]
        assert model._n_updates == n_updates + 1
        for param, reference in zip(average_params(model), expected, strict=True):
            th.testing.assert_close(param, reference)
    # Outside autograd, and not the actor's own weights
    live = list(model.actor.parameters())
    for param in model.policy.actor_average.parameters():
        assert not param.requires_grad and param.grad_fn is None and all(param is not p for p in live)


def test_predict_acts_with_the_average_and_the_live_actor_explores():
    model = make_model(actor_average_tau=0.01)
    model.learn(200)
    obs = observations(model.get_env())
    average = deterministic_actions(model.policy.actor_average, model, obs)
    live = deterministic_actions(model.actor, model, obs)
    assert not th.allclose(average, live, atol=1e-4)  # the average lags the live actor
    actions, _ = model.predict(obs, deterministic=True)
    np.testing.assert_allclose(actions, model.policy.unscale_action(average.numpy()), rtol=1e-5, atol=1e-6)
    # Deployed alone (docs/guide/sb3_td3.md), the average acts as predict() does, normalizer included
    assert np.array_equal(model.policy.actor_average.predict(obs, deterministic=True)[0], actions)
    # Exploration: the live actor's actions plus the noise (none here)
    model.exploration_noise.sigmas.zero_()
    with th.no_grad():
        explored = model._noisy_actions(th.as_tensor(obs, dtype=th.float32))
    th.testing.assert_close(explored, live)


def test_an_average_of_one_step_is_the_actor():
    model = make_model(actor_average_tau=1.0, policy_delay=1)
    model.learn(100)
    obs = observations(model.get_env())
    th.testing.assert_close(
        deterministic_actions(model.policy.actor_average, model, obs), deterministic_actions(model.actor, model, obs)
    )


def test_save_load_keeps_the_average_and_load_may_add_or_drop_it(tmp_path):
    model = make_model(actor_average_tau=0.01)
    model.learn(200)
    obs = observations(model.get_env())
    actions, _ = model.predict(obs, deterministic=True)
    model.save(tmp_path / "averaged")
    loaded = FastTD3.load(tmp_path / "averaged", env=counting_env(1))
    assert loaded.actor_average_tau == 0.01
    np.testing.assert_allclose(loaded.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)
    # The average deploys alone, as the actor does
    model.policy.actor_average.save(tmp_path / "average.pt")
    alone = Actor.load(tmp_path / "average.pt")
    np.testing.assert_allclose(alone.predict(obs, deterministic=True)[0], actions, rtol=1e-5, atol=1e-6)
    # Loaded without the average, the model acts with the live actor it saved
    live_actions = model.policy.unscale_action(deterministic_actions(model.actor, model, obs).numpy())
    plain = FastTD3.load(tmp_path / "averaged", env=counting_env(1), actor_average_tau=None)
    assert plain.policy.actor_average is None
    np.testing.assert_allclose(plain.predict(obs, deterministic=True)[0], live_actions, rtol=1e-5, atol=1e-6)
    # A model saved without an average gains one that starts at its actor, and trains on
    plain.save(tmp_path / "plain")
    averaged = FastTD3.load(tmp_path / "plain", env=counting_env(1), actor_average_tau=0.5)
    np.testing.assert_allclose(averaged.predict(obs, deterministic=True)[0], live_actions, rtol=1e-5, atol=1e-6)
    averaged.learn(40, reset_num_timesteps=False)
    assert not np.allclose(averaged.predict(obs, deterministic=True)[0], live_actions, atol=1e-6)


def test_the_average_trains_beside_a_target_actor_with_compile():
    model = make_model(actor_average_tau=0.1, use_target_actor=True, compile=True)
    before = average_params(model)
    model.learn(60)
    assert all(not th.equal(param, initial) for param, initial in zip(average_params(model), before, strict=True))
