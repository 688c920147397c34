"""DelayedLinearSchedule: held, then falling linearly, then held again; SB3's LinearSchedule when it starts at 0."""

import numpy as np
import pytest
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.utils import LinearSchedule

from sb3_fasttd3 import FastTD3
from sb3_fasttd3.common.schedules import DelayedLinearSchedule
from sb3_fasttd3.hyperparams import parse_schedule


def test_holds_then_falls_linearly_then_holds():
    schedule = DelayedLinearSchedule(3e-4, 1e-4, 0.25, 0.5)
    done = np.linspace(0.0, 1.0, 41)  # the fraction of the run done, 1 - progress_remaining
    values = np.array([schedule(1.0 - fraction) for fraction in done])
    assert np.all(values[done <= 0.25] == 3e-4)  # exactly the constant rate while held
    assert np.all(values[done >= 0.5] == pytest.approx(1e-4))
    assert schedule(1.0 - 0.375) == pytest.approx(2e-4)
    assert np.all(np.diff(values) <= 0)


def test_starting_at_zero_is_sb3s_linear_schedule():
    ours, sb3s = DelayedLinearSchedule(1e-3, 2e-4, 0.0, 0.6), LinearSchedule(1e-3, 2e-4, 0.6)
    for progress_remaining in np.linspace(1.0, 0.0, 31):
        assert ours(progress_remaining) == pytest.approx(sb3s(progress_remaining))


@pytest.mark.parametrize("fractions", [(0.5, 0.5), (0.6, 0.4), (-0.1, 0.5), (0.2, 1.5)])
def test_fractions_out_of_order_are_refused(fractions):
    with pytest.raises(ValueError, match=r"needs 0 <= start_fraction < end_fraction <= 1, got start_fraction="):
        DelayedLinearSchedule(1e-3, 1e-4, *fractions)
    with pytest.raises(ValueError, match=r"critic_learning_rate takes a float, .* \(DelayedLinearSchedule needs 0 <="):
        parse_schedule("critic_learning_rate", f"DelayedLinearSchedule(0.001, 0.0001, {fractions[0]}, {fractions[1]})")


class RecordRates(BaseCallback):
    """The actor's learning rate after each step, keyed by the transitions collected."""

    def __init__(self):
        super().__init__()
        self.rates: dict[int, float] = {}

    def _on_step(self) -> bool:
        self.rates[self.model.num_timesteps] = self.model.actor.optimizer.param_groups[0]["lr"]
        return True


def test_a_model_follows_it_and_keeps_it_through_save_and_load(tmp_path):
    schedule = parse_schedule("actor_learning_rate", "DelayedLinearSchedule(0.001, 0.0001, 0.5, 0.75)")
    model = FastTD3("MlpPolicy", "Pendulum-v1", actor_learning_rate=schedule, learning_starts=50, batch_size=16, seed=0)
    recorder = RecordRates()
    model.learn(400, callback=recorder)
    rates = recorder.rates
    # Set by every update, from the first (after learning_starts): held for the first half of the run
    assert all(rate == 0.001 for step, rate in rates.items() if 60 <= step <= 200)
    assert 0.0001 < rates[250] < rates[225] < 0.001  # then falling
    assert all(rate == pytest.approx(0.0001) for step, rate in rates.items() if step > 305)
    model.save(tmp_path / "model")
    loaded = FastTD3.load(tmp_path / "model")
    assert isinstance(loaded.actor_learning_rate, DelayedLinearSchedule)
    assert loaded.actor_learning_rate(0.4) == pytest.approx(schedule(0.4)) and schedule(0.4) not in (0.001, 0.0001)
