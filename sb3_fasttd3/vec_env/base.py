"""A VecEnv whose data are torch tensors on a device, for simulators that run on an accelerator."""

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.vec_env import VecEnv

TorchObs = th.Tensor | dict[str, th.Tensor]


class TorchStep(NamedTuple):
    """
    What a backend returns for one vector step (every field has a leading ``num_envs`` dimension).

    :param obs: observation to act on next (for a finished episode: the first of the next one)
    :param reward: float32 rewards
    :param terminated: the episode ended in a terminal state (no bootstrap)
    :param truncated: the episode was cut (time limit): bootstrap from ``final_obs``
    :param final_obs: the observation the step reached, before any reset (equals ``obs`` where not done)
    :param dones: ``terminated | truncated`` if the backend has it already (None: computed from them)
    """

    obs: TorchObs
    reward: th.Tensor
    terminated: th.Tensor
    truncated: th.Tensor
    final_obs: TorchObs
    dones: th.Tensor | None = None


class EpisodeTracker:
    """
    Episode returns and lengths kept on the device, without a host sync per step.

    A step only records the rewards and dones into a block of ``block`` steps (two copies: per-op dispatch is
    most of a small batch's cost, so each step doing the bookkeeping itself made a one-env step ~25% slower).
    A full block, a :meth:`drain` or a :meth:`reset` turns it into episodes with a few batched operations.
    Finished episodes go to a ring of the last ``capacity``; :meth:`drain` reads them (one sync).

    :param num_envs: number of environments
    :param device: where the statistics live
    :param capacity: finished episodes kept between two drains (SB3 logs the mean of the last 100)
    :param block: steps recorded between two bookkeeping passes (None: 64, or about 16k env steps for fewer
        than 256 envs, since a pass costs about as much for one env as for 256)
    """

    def __init__(self, num_envs: int, device: th.device | str, capacity: int = 100, block: int | None = None):
        block = block or max(64, 2**14 // num_envs)
        self.num_envs, self.capacity, self.block = num_envs, capacity, block
        # Return and length of each env's running episode, as of the last bookkeeping pass
        self.running = th.zeros(2, num_envs, device=device, dtype=th.float64)
        self._rewards = th.zeros(block, num_envs, device=device, dtype=th.float64)
        self._dones = th.zeros(block, num_envs, device=device, dtype=th.bool)
        # The block's rows as views made once: selecting a row per step costs as much as the copy into it
        self._reward_rows, self._done_rows = self._rewards.unbind(0), self._dones.unbind(0)
        self._recorded = 0  # steps in the block
        self._time = th.arange(block, device=device, dtype=th.float64).view(-1, 1)
        # One extra row takes the writes of the steps where an episode goes on
        self._ring = th.zeros(capacity + 1, 2, device=device, dtype=th.float64)
        self._finished = th.zeros((), device=device, dtype=th.int64)
        self._drained = 0

    def reset(self) -> None:
        """Forget the running episodes (after an env reset); finished ones stay until drained."""
        self._account()
        self.running.zero_()

    def update(self, rewards: th.Tensor, dones: th.Tensor) -> None:
        """Add one step of rewards; ``dones`` ends the episodes of those envs with this step."""
        self._reward_rows[self._recorded].copy_(rewards)
        self._done_rows[self._recorded].copy_(dones)
        self._recorded += 1
        if self._recorded == self.block:
            self._account()

    def _account(self) -> None:
        """Turn the recorded steps into finished episodes (in the ring) and running ones."""
        steps, self._recorded = self._recorded, 0
        if steps == 0:
            return
        rewards, dones, time = self._rewards[:steps], self._dones[:steps], self._time[:steps]
        # The last step before each step t where the env's episode ended (-1: none in the block)
        ended = th.where(dones, time, -1.0).cummax(dim=0).values
        previous_end = th.cat([th.full_like(ended[:1], -1.0), ended[:-1]])
        started_before = previous_end < 0  # the episode began before the block: add its running part
        cumulative = th.cat([th.zeros_like(rewards[:1]), rewards.cumsum(dim=0)])  # [t + 1]: rewards up to t
        # Return and length at each step t of the episode running at t, up to and including t
        returns = cumulative[1:] - cumulative.gather(0, previous_end.long() + 1) + started_before * self.running[0]
        lengths = time - previous_end + started_before * self.running[1]
        # Finished episodes in order (step, then env); only the latest ``capacity`` are written
        flat_dones = dones.flatten()
        rank = flat_dones.cumsum(dim=0)
        keep = flat_dones & (rank > rank[-1] - self.capacity)
        slots = th.where(keep, (self._finished + rank - 1) % self.capacity, self.capacity)
        self._ring.index_put_((slots,), th.stack([returns.flatten(), lengths.flatten()], dim=1))
        self._finished += rank[-1]
        self.running = th.stack([returns[-1], lengths[-1]]).masked_fill_(dones[-1], 0.0)

    def drain(self) -> tuple[list[dict[str, float]], int]:
        """
        The episodes finished since the last drain: the latest ``capacity`` of them, oldest first, as SB3
        ``ep_info_buffer`` entries (``{"r": return, "l": length}``), and how many finished. One host sync.
        """
        self._account()
        finished = int(self._finished)
        count = finished - self._drained
        new = min(count, self.capacity)
        self._drained = finished
        if new <= 0:
            return [], 0
        slots = [(finished - new + i) % self.capacity for i in range(new)]
        rows = self._ring[slots].cpu().numpy()
        return [{"r": float(ret), "l": int(length)} for ret, length in rows], count


class TorchVecEnv(VecEnv, ABC):
    """
    SB3's ``VecEnv`` interface with torch tensors on ``device`` instead of NumPy arrays.

    ``step`` returns ``(obs, rewards, dones, infos)`` where ``obs`` is a tensor (a dict of tensors for
    ``Dict`` spaces), ``rewards`` float32 and ``dones`` bool tensors of shape ``(num_envs,)``, and
    ``infos`` ONE dict of batched tensors (not a list of per-env dicts):

    - ``"final_observation"``: the observation each step reached before any reset (the true final
      observation of a finished episode, ``obs`` elsewhere): the next observation to store;
    - ``"terminated"`` / ``"truncated"``: bool tensors (``dones`` is their union).

    Actions are tensors in the units of ``action_space``. Episode returns and lengths are tracked on the
    device (:attr:`episode_tracker`). FastTD3 recognizes this class and keeps its whole rollout loop on
    the device; for any other SB3 algorithm wrap it in :class:`~sb3_fasttd3.vec_env.NumpyVecEnv`.

    Backends implement :meth:`_reset` and :meth:`_step`; :meth:`seed` stores a seed they use at the next reset.

    :param num_envs: number of environments
    :param observation_space: one env's observation space (``Box`` or ``Dict`` of ``Box``)
    :param action_space: one env's action space
    :param device: the device of every tensor
    """

    render_mode: str | None = None

    def __init__(
        self, num_envs: int, observation_space: spaces.Space, action_space: spaces.Space, device: th.device | str = "cpu"
    ):
        self.device = th.device(device)
        super().__init__(num_envs, observation_space, action_space)
        self.episode_tracker = EpisodeTracker(num_envs, self.device)
        self._next_seed: int | None = None
        self._actions: th.Tensor | None = None

    @abstractmethod
    def _reset(self, seed: int | None) -> TorchObs:
        """Reset every env; ``seed`` (None: keep the current random state) seeds the backend."""

    @abstractmethod
    def _step(self, actions: th.Tensor) -> TorchStep:
        """Step every env with ``actions`` (float32, on ``device``), resetting those that finish."""

    def reset(self) -> TorchObs:  # type: ignore[override]
        seed, self._next_seed = self._next_seed, None
        obs = self._reset(seed)
        self.episode_tracker.reset()
        return obs

    def seed(self, seed: int | None = None) -> Sequence[int | None]:
        """Seed the next :meth:`reset` (env ``i`` gets its own stream derived from ``seed``)."""
        self._next_seed = seed
        return [None if seed is None else seed + i for i in range(self.num_envs)]

    def step_async(self, actions: th.Tensor | np.ndarray) -> None:  # type: ignore[override]
        self._actions = th.as_tensor(actions, device=self.device, dtype=th.float32)

    def step_wait(self) -> tuple[TorchObs, th.Tensor, th.Tensor, dict[str, Any]]:  # type: ignore[override]
        assert self._actions is not None, "call step_async() first"
        step = self._step(self._actions)
        dones = step.terminated | step.truncated if step.dones is None else step.dones
        # An episode that ends in a terminal state at its time limit is terminated: it must not bootstrap
        truncated = step.truncated & ~step.terminated
        self.episode_tracker.update(step.reward, dones)
        infos = {"final_observation": step.final_obs, "terminated": step.terminated, "truncated": truncated}
        return step.obs, step.reward, dones, infos

    def close(self) -> None:
        pass

    # Batched simulators have no per-env Python object: attributes are the vector env's own.
    def get_attr(self, attr_name: str, indices: Any = None) -> list[Any]:
        return [getattr(self, attr_name) for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: Any = None) -> None:
        setattr(self, attr_name, value)

    def env_method(self, method_name: str, *method_args, indices: Any = None, **method_kwargs) -> list[Any]:
        method = getattr(self, method_name)
        return [method(*method_args, **method_kwargs) for _ in self._indices(indices)]

    def env_is_wrapped(self, wrapper_class: type, indices: Any = None) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def _indices(self, indices: Any) -> Iterable[int]:
        if indices is None:
            return range(self.num_envs)
        return [indices] if isinstance(indices, int) else indices
