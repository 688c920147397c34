"""Replay buffer storing transitions as torch tensors on the training device, with n-step returns."""

from typing import Any

import numpy as np
import torch as th
from gymnasium import spaces
from stable_baselines3.common.buffers import BaseBuffer
from stable_baselines3.common.type_aliases import DictReplayBufferSamples, ReplayBufferSamples
from stable_baselines3.common.utils import get_device
from stable_baselines3.common.vec_env import VecNormalize

from sb3_fasttd3.common.final_observations import FinalObservationStore
from sb3_fasttd3.common.memory import on_huge_pages, zeros_on_huge_pages
from sb3_fasttd3.common.normalized_samples import normalize_observations, normalize_rewards
from sb3_fasttd3.common.replay_layout import (
    DONE,
    LAG_BASE,
    LENGTH_SHIFT,
    OPEN,
    SPLIT,
    TIMEOUT,
    ArrayLike,
    ObservationCodec,
    ObsLike,
    RowLayout,
    TensorObs,
    clear_bits,
    flags_dtype,
    window_lengths,
)
from sb3_fasttd3.common.replay_relay import Relay
from sb3_fasttd3.common.row_sampling import gather_references, gather_tables, sample_tables
from sb3_fasttd3.common.utils import is_integer

# Observation spaces (and Dict sub-spaces) the buffer stores; integer observations are stored as exact float32 values
STORABLE_SPACES = (spaces.Box, spaces.Discrete, spaces.MultiDiscrete, spaces.MultiBinary)


def check_return_parameters(n_steps: int, gamma: float) -> None:
    """
    Raise a ``ValueError`` naming the parameter unless the n-step returns are well defined: ``n_steps`` an integer
    >= 1 and ``gamma`` in (0, 1] (a zero discount would erase the sign that marks an ended window).

    :param n_steps: length of the n-step returns
    :param gamma: the discount factor
    """
    if not (is_integer(n_steps) and n_steps >= 1):
        raise ValueError(f"n_steps must be an integer >= 1, got {n_steps!r}")
    if not 0.0 < gamma <= 1.0:
        raise ValueError(f"gamma must be in (0, 1], got {gamma!r}")


class DeviceNStepReplayBuffer(BaseBuffer):
    """
    Replay buffer for off-policy algorithms that keeps all of its storage as torch tensors
    on ``device`` (e.g. the GPU used for training), so that sampling large batches never
    goes through NumPy nor through host-device copies.

    n-step returns have the same semantics as SB3's ``NStepReplayBuffer``: starting from row ``t``
    of env ``e``, rows ``t, t+1, ..., t+n_steps-1`` of the same env are accumulated, stopping at
    (and including) the first row that is done (termination or truncation), and never past the
    newest row, which counts as truncated until its successor arrives. Unlike SB3, the windows
    are kept up to date as rows are added (each add extends the windows of the ``n_steps - 1``
    previous rows that are still open), so that sampling is one row gather from one packed
    table (:class:`~sb3_fasttd3.common.replay_layout.RowLayout`): several times faster than
    computing the windows at sampling time.

    Observation keys that SB3's ``is_image_space`` calls images (uint8 ``Box``) are stored as uint8, in a table of
    their own gathered with the same indices, and sampled as uint8; the other keys as float32 values.

    Two layouts:

    - full (``optimize_memory_usage=False``): each row also holds the observation its window bootstraps from
      (the next observation of its last row), so an observation is stored twice;
    - lean (``optimize_memory_usage=True``): each row holds a reference instead. The next observation of a row
      that goes on is the observation stored in the following row of the same env; the newest rows' next
      observations are written in the observation columns of the row after them, which the next add fills with
      the same values. The final observations of done rows (and the next observations of the newest rows when
      their windows are closed) go to a :class:`~sb3_fasttd3.common.final_observations.FinalObservationStore`, a
      ring on the device freed as rows are overwritten. The ring of rows has one more row per env than the
      capacity, the one holding those next observations, so the lean layout stores as many transitions as the full
      one (``buffer_size // n_envs`` per env; SB3's lean buffer stores one fewer). Sampling then gathers the next
      observations in a second pass. The layout takes a non-done env's next observation from the observation it
      is given at the next add, as SB3's ``optimize_memory_usage`` does.

    ``one_step_returns = True`` keeps the returns of the rows added while it holds to one step (a window closed
    as it is written), whatever ``n_steps``; windows opened before go on to their full length. A bool tensor of
    shape ``(n_envs,)`` does so for the envs where it is true.

    ``sample(batch_size, env)`` with a ``VecNormalize`` normalizes observations, next observations and rewards
    with the env's current statistics, as SB3's off-policy buffers do: each one-step reward is normalized before
    the n-step discounted sum.

    Storage is allocated lazily, on the first call to ``add()``: a buffer that only exists
    because a model was loaded for prediction does not use any memory.

    Storage (``rows = buffer_size // n_envs`` per env, one more in the lean layout), exposed as views of shape
    ``(n_envs, rows, ...)`` (the rows of a ring; ``pos`` is the next one written):

    - ``observations``: ``(n_envs, rows, *obs_shape)`` (a dict of such views for ``Dict``
      observation spaces), raw (unnormalized) values, float32 or uint8 (images)
    - ``actions``: float32 ``(n_envs, rows, action_dim)``
    - ``rewards``: float32 ``(n_envs, rows)``, the one-step rewards
    - ``dones``: bool ``(n_envs, rows)``, the VecEnv ``done`` (terminated or truncated)
    - ``timeouts``: bool ``(n_envs, rows)``, truncation flag (always False when
      ``handle_timeout_termination=False``)
    - ``next_observations`` (full layout only): the observation the n-step target bootstraps from, i.e. the next
      observation of the last row of the window (for a done row: the final observation of the
      episode, not the reset one); with ``n_steps=1``, the one-step next observation
    - ``n_step_returns``, ``discounts`` (``gamma ** rows_used``) and ``terminals`` (the last row
      of the window is terminated, not truncated: no bootstrapping): float32 ``(n_envs, rows)``
    - ``window_lengths`` (rows used) and ``open_windows`` (the window still grows as rows arrive)

    :param buffer_size: Max number of transitions in the buffer, in total over all envs
        (each env gets ``buffer_size // n_envs`` rows)
    :param observation_space: Observation space, one of :data:`STORABLE_SPACES` or a ``spaces.Dict`` of those
    :param action_space: Action space, a ``spaces.Box``
    :param device: PyTorch device on which the storage lives and the samples are returned
    :param n_envs: Number of parallel environments
    :param optimize_memory_usage: The lean layout (next observations stored once, see above)
    :param handle_timeout_termination: Handle timeout termination (due to time limit)
        separately and treat the task as an infinite horizon task (truncations bootstrap).
        If False, truncations are treated as terminations.
    :param n_steps: Number of steps to accumulate rewards for n-step returns
    :param gamma: Discount factor, in (0, 1]
    """

    # Storage tensors, of shape (ring rows, n_envs, ...) but the last two: moved between devices, pickled as CPU
    # tensors (the final-observation store moves and pickles itself)
    _STORAGE_NAMES = ("_table", "_images", "_rewards", "_flags", "_final_ends", "_gamma_powers")

    def __init__(
        self,
        buffer_size: int,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        device: th.device | str = "auto",
        n_envs: int = 1,
        optimize_memory_usage: bool = False,
        handle_timeout_termination: bool = True,
        n_steps: int = 1,
        gamma: float = 0.99,
    ):
        check_return_parameters(n_steps, gamma)
        subspaces = observation_space.spaces if isinstance(observation_space, spaces.Dict) else {"": observation_space}
        if not all(isinstance(space, STORABLE_SPACES) for space in subspaces.values()):
            accepted = ", ".join(space.__name__ for space in STORABLE_SPACES)
            raise TypeError(
                f"DeviceNStepReplayBuffer supports an observation_space that is a {accepted} space or a spaces.Dict "
                f"of those, got observation_space={observation_space}"
            )
        if not isinstance(action_space, spaces.Box):
            raise TypeError(f"DeviceNStepReplayBuffer supports only a spaces.Box action_space, got {action_space}")
        if buffer_size // n_envs < n_steps + 1:
            raise ValueError(
                f"buffer_size={buffer_size} is too small: with n_envs={n_envs} and n_steps={n_steps}, the buffer "
                f"must hold at least n_envs * (n_steps + 1) = {n_envs * (n_steps + 1)} transitions"
            )

        super().__init__(buffer_size, observation_space, action_space, device, n_envs=n_envs)
        # Rows per env (SB3 convention: buffer_size counts transitions over all envs)
        self.buffer_size = max(buffer_size // n_envs, 1)
        self.optimize_memory_usage = bool(optimize_memory_usage)
        self.handle_timeout_termination = handle_timeout_termination
        self.n_steps = int(n_steps)
        self.gamma = float(gamma)
        # While True, the rows added keep one-step returns: their windows are closed as they are written (a bool
        # tensor of shape (n_envs,) chooses the envs)
        self.one_step_returns: bool | th.Tensor = False

        self.codec = ObservationCodec(observation_space)
        self.layout = RowLayout(self.codec.float_width, self.action_dim, self.codec.image_width, self.optimize_memory_usage)
        # Rows of the ring, per env: the lean layout has one more, holding the newest rows' next observations
        self.ring_rows = self.buffer_size + int(self.optimize_memory_usage)
        # Transitions stored, over all envs: the ``n_transitions`` flat (row, env) entries before row ``pos``
        self.n_transitions = 0
        # Lazily allocated in ``add()``: the packed rows (float32, read as int32 where they hold bits), the image
        # rows, the one-step rewards, the flags (replay_layout.DONE ...), the running number of the
        # final-observation store after each row (lean layout), and gamma ** k for k = 0..n_steps
        self._table: th.Tensor | None = None
        self._images: th.Tensor | None = None
        self._rewards: th.Tensor | None = None
        self._flags: th.Tensor | None = None
        self._final_ends: th.Tensor | None = None
        self._gamma_powers: th.Tensor | None = None
        self._final_obs: FinalObservationStore | None = None
        # Whether a re-lay split windows whose rows may still be stored (see relaid())
        self._has_split_windows = False

    @property
    def is_allocated(self) -> bool:
        """
        :return: Whether the storage tensors have been allocated (i.e. ``add()`` was called at least once)
        """
        return self._table is not None

    def size(self) -> int:
        """
        :return: The number of rows stored per env (an env may have one fewer after a re-lay, see :meth:`relaid`)
        """
        return -(-self.n_transitions // self.n_envs)

    def _allocate(self) -> None:
        """
        Allocate the (zero-initialized) storage tensors on ``self.device``.
        """
        shape = (self.ring_rows, self.n_envs)
        self._table = zeros_on_huge_pages((*shape, self.layout.width), th.float32, self.device)
        if self.codec.has_images:
            self._images = zeros_on_huge_pages((*shape, self.layout.image_width), th.uint8, self.device)
        self._rewards = th.zeros(shape, dtype=th.float32, device=self.device)
        self._flags = th.zeros(shape, dtype=flags_dtype(self.n_steps), device=self.device)
        # gamma ** k for k = 0..n_steps, each rounded once from float64
        self._gamma_powers = th.tensor([self.gamma**k for k in range(self.n_steps + 1)], device=self.device)
        if self.optimize_memory_usage:
            self._final_ends = th.zeros(self.ring_rows, dtype=th.int64, device=self.device)
            self._final_obs = FinalObservationStore(self.codec.float_width, self.codec.image_width, self.n_envs, self.device)

    def storage_nbytes(self) -> int:
        """
        :return: Bytes of the storage tensors (the final-observation store's included), 0 before the first add. On a
            Linux CPU, tables of 2 MB or more also reserve up to 2 MB of address space before them so that they start
            on a huge page (:func:`~sb3_fasttd3.common.memory.zeros_on_huge_pages`): never written, so never backed
            by memory, and not counted.
        """
        tensors = [getattr(self, name) for name in self._STORAGE_NAMES]
        if self._final_obs is not None:
            tensors += self._final_obs.tensors()
        return sum(tensor.numel() * tensor.element_size() for tensor in tensors if tensor is not None)

    # Per-env views of the storage, shape (n_envs, rows, ...), None before the first add
    def _per_env(self, tensor: th.Tensor | None) -> th.Tensor | None:
        return None if tensor is None else tensor.transpose(0, 1)

    def _observation_view(self, columns: slice, image_columns: slice) -> TensorObs | None:
        if self._table is None:
            return None
        images = None if self._images is None else self._images.transpose(0, 1)[..., image_columns]
        return self.codec.decode(self._table.transpose(0, 1)[..., columns], images)

    @property
    def observations(self) -> TensorObs | None:
        return self._observation_view(self.layout.obs, self.layout.image_obs)

    @property
    def next_observations(self) -> TensorObs | None:
        if self.optimize_memory_usage:
            raise ValueError(
                "With optimize_memory_usage=True the buffer stores no next observation per transition (sample() "
                "finds them): use optimize_memory_usage=False to read next_observations from the storage"
            )
        return self._observation_view(self.layout.next, self.layout.image_next)

    @property
    def actions(self) -> th.Tensor | None:
        return self._per_env(None if self._table is None else self._table[..., self.layout.action])

    @property
    def n_step_returns(self) -> th.Tensor | None:
        return self._per_env(None if self._table is None else self._table[..., self.layout.n_step_return])

    @property
    def discounts(self) -> th.Tensor | None:
        return self._per_env(None if self._table is None else self._table[..., self.layout.discount].abs())

    @property
    def terminals(self) -> th.Tensor | None:
        return self._per_env(None if self._table is None else th.signbit(self._table[..., self.layout.discount]).float())

    @property
    def rewards(self) -> th.Tensor | None:
        return self._per_env(self._rewards)

    def _flag_view(self, bit: int) -> th.Tensor | None:
        return self._per_env(None if self._flags is None else (self._flags & bit) != 0)

    @property
    def dones(self) -> th.Tensor | None:
        return self._flag_view(DONE)

    @property
    def timeouts(self) -> th.Tensor | None:
        return self._flag_view(TIMEOUT)

    @property
    def open_windows(self) -> th.Tensor | None:
        return self._flag_view(OPEN)

    @property
    def window_lengths(self) -> th.Tensor | None:
        return self._per_env(None if self._flags is None else window_lengths(self._flags))

    def _bools(self, values: ArrayLike) -> th.Tensor:
        return th.as_tensor(values, device=self.device).reshape(self.n_envs).to(th.bool)

    def add(
        self,
        obs: ObsLike,
        next_obs: ObsLike,
        action: ArrayLike,
        reward: ArrayLike,
        done: ArrayLike,
        infos: list[dict[str, Any]],
        truncated: ArrayLike | None = None,
    ) -> None:
        """
        Add one transition per env. Inputs can be NumPy arrays or torch tensors (on any device).

        :param obs: Observations, shape ``(n_envs, *obs_shape)`` (or dict of those)
        :param next_obs: Next observations (for a done env: the final observation of the episode, not the reset one)
        :param action: Actions, shape ``(n_envs, action_dim)``
        :param reward: Rewards, shape ``(n_envs,)``
        :param done: VecEnv dones (terminated or truncated), shape ``(n_envs,)``
        :param infos: VecEnv infos, used to read ``"TimeLimit.truncated"`` when ``truncated`` is None
        :param truncated: Optional truncation flags, shape ``(n_envs,)``, overriding the infos
        """
        if not self.is_allocated:
            self._allocate()
        assert self._table is not None and self._rewards is not None and self._flags is not None

        with th.no_grad():
            n_envs, layout = self.n_envs, self.layout
            reward_t = th.as_tensor(reward, device=self.device).reshape(n_envs).float()
            done_t = self._bools(done)
            if not self.handle_timeout_termination:
                timeout_t = th.zeros_like(done_t)
            elif truncated is not None:
                timeout_t = self._bools(truncated)
            else:
                timeout_t = self._bools(np.array([bool(info.get("TimeLimit.truncated", False)) for info in infos]))
            terminal_t = done_t & ~timeout_t
            obs_floats, obs_images = self.codec.encode(obs, n_envs, self.device)
            next_floats, next_images = self.codec.encode(next_obs, n_envs, self.device)
            if self.optimize_memory_usage:
                # int32 references, one column
                next_part = self._store_next_lean(next_floats, next_images, done_t, done)[:, None]
            else:
                next_part = next_floats.view(th.int32)
            if self.n_steps > 1:
                self._extend_windows(reward_t, done_t, terminal_t, next_part, next_images)

            discount = th.where(terminal_t, -self.gamma, self.gamma).float()
            action_t = th.as_tensor(action, device=self.device).reshape(n_envs, self.action_dim).float()
            fields = [obs_floats, action_t, reward_t[:, None], discount[:, None]]
            self._table.view(th.int32)[self.pos] = th.cat([field.view(th.int32) for field in fields] + [next_part], dim=1)
            if self._images is not None:
                assert obs_images is not None and next_images is not None
                images = obs_images if layout.lean else th.cat([obs_images, next_images], dim=1)
                self._images[self.pos] = images
            self._rewards[self.pos] = reward_t
            flags = done_t.to(self._flags.dtype) * DONE | timeout_t.to(self._flags.dtype) * TIMEOUT
            if self.n_steps > 1:
                flags |= self._opens_window(done_t).to(self._flags.dtype) * OPEN
            self._flags[self.pos] = flags

        self.n_transitions = min(self.n_transitions + n_envs, self.buffer_size * n_envs)
        self.full = self.n_transitions == self.buffer_size * n_envs
        self.pos = (self.pos + 1) % self.ring_rows

    def _opens_window(self, done: th.Tensor) -> th.Tensor:
        """Which envs' rows being added open an n-step window: those that go on, unless one-step returns are asked."""
        one_step = self.one_step_returns
        if isinstance(one_step, th.Tensor):
            return ~done & ~one_step.to(self.device, th.bool).reshape(self.n_envs)
        return ~done & (not one_step)

    def _store_next_lean(
        self, next_floats: th.Tensor, next_images: th.Tensor | None, done: th.Tensor, done_input: ArrayLike
    ) -> th.Tensor:
        """
        Lean layout: keep the next observations of the row being written at ``pos``. Those of the envs that go on
        are written in the observation columns of the row after it (the next add writes the same observations
        there); the final observations of done envs go to the final-observation store, whose entries of the row
        being overwritten are released.

        :return: The row's next-observation references, int32 ``(n_envs,)``
        """
        assert self._table is not None and self._final_obs is not None and self._final_ends is not None
        store, following = self._final_obs, (self.pos + 1) % self.ring_rows
        if self.n_transitions + self.n_envs > self.buffer_size * self.n_envs:
            # The row after this one is the oldest stored: it is dropped by this add
            store.release(self._final_ends[following])
        self._table[following, :, self.layout.obs] = next_floats
        if self._images is not None and next_images is not None:
            self._images[following, :, self.layout.image_obs] = next_images
        refs = th.full((self.n_envs,), LAG_BASE + 1, dtype=th.int32, device=self.device)
        # Where it costs no device read, skip the store when no episode ends
        if isinstance(done_input, np.ndarray):
            any_done = bool(done_input.any())
        else:
            any_done = self.device.type != "cpu" or bool(done.any())
        if any_done:
            refs = th.where(done, store.append(next_floats, next_images, done), refs)
        self._final_ends[self.pos] = store.head
        return refs

    def _extend_windows(
        self,
        reward: th.Tensor,
        done: th.Tensor,
        terminal: th.Tensor,
        next_part: th.Tensor,
        next_images: th.Tensor | None,
    ) -> None:
        """
        Append the row being written at ``self.pos`` to the open windows of the ``n_steps - 1`` rows
        before it (the newest rows of each env, whatever the wrap-around): their return gains
        ``gamma ** lag * reward``, and their signed discount, length and next observation (or reference)
        become this row's.

        :param next_part: This row's ``next`` columns (as int32 bits), shape ``(n_envs, width)``
        """
        assert self._table is not None and self._flags is not None and self._gamma_powers is not None
        layout = self.layout
        lags = th.arange(1, self.n_steps, device=self.device)
        rows = (self.pos - lags) % self.ring_rows
        flags = self._flags[rows]  # (n_steps - 1, n_envs)
        is_open = (flags & OPEN) != 0
        table = self._table.view(th.int32)
        window = table[rows, :, layout.window_start :]  # return, discount, next
        powers = self._gamma_powers
        returns = window[..., 0].view(th.float32) + powers[1:-1, None] * reward
        discounts = th.where(terminal, -powers[2:, None], powers[2:, None])
        if layout.lean:
            # A row that goes on: the next observation is the observation stored lag + 1 rows after the window's start
            next_part = th.where(done[:, None], next_part, (LAG_BASE + 1 + lags)[:, None, None]).int()
        extended = th.cat(
            [returns.view(th.int32)[..., None], discounts.view(th.int32)[..., None], next_part.expand(len(lags), -1, -1)],
            dim=-1,
        )
        table[rows, :, layout.window_start :] = th.where(is_open[..., None], extended, window)
        if self._images is not None and not layout.lean:
            assert next_images is not None
            stored = self._images[rows, :, layout.image_next]
            self._images[rows, :, layout.image_next] = th.where(is_open[..., None], next_images, stored)
        dtype = flags.dtype
        still_open = is_open & ~done & (lags < self.n_steps - 1)[:, None]
        extended_flags = (
            (flags & (DONE | TIMEOUT | SPLIT)) | still_open.to(dtype) * OPEN | (lags[:, None] << LENGTH_SHIFT).to(dtype)
        )
        self._flags[rows] = th.where(is_open, extended_flags, flags)

    def close_windows(self) -> None:
        """
        End the n-step windows that are still open: call it when the next transitions added do not
        follow the newest ones (e.g. the environments were reset without ending their episodes),
        so that those windows bootstrap from the newest rows instead of reaching into the new episodes.
        In the lean layout the newest rows' next observations move to the final-observation store (reads
        from the device once).
        """
        if self._flags is None:
            return
        if self.optimize_memory_usage and self.n_transitions > 0:
            self._close_lean_windows()
        self._flags.copy_(clear_bits(self._flags, OPEN))

    def _close_lean_windows(self) -> None:
        """
        Move the next observations of the newest rows that go on (held by the row at ``pos``, which the next add
        overwrites) to the final-observation store, and point the windows that end there to it.
        """
        assert self._table is not None and self._final_obs is not None and self._final_ends is not None
        layout, newest = self.layout, (self.pos - 1) % self.ring_rows
        table = self._table.view(th.int32)
        ref_column = layout.next.start
        # The newest row's own window (length 1) refers to the following row unless it is done or already closed
        goes_on = table[newest, :, ref_column] == LAG_BASE + 1
        images = None if self._images is None else self._images[self.pos, :, layout.image_obs]
        final = self._final_obs.append_now(self._table[self.pos, :, layout.obs], images, goes_on)
        # Rows whose window ends at the newest row: lag rows before pos, referring lag rows later
        lags = th.arange(1, min(self.n_steps, self.size()) + 1, device=self.device)
        rows = (self.pos - lags) % self.ring_rows
        refs = table[rows, :, ref_column]
        table[rows, :, ref_column] = th.where((refs == LAG_BASE + lags[:, None]) & goes_on, final, refs)
        self._final_ends[newest] = self._final_obs.head

    def reset(self) -> None:
        super().reset()
        self.n_transitions = 0
        self._has_split_windows = False
        if self._flags is not None:
            self._flags.zero_()
        if self._final_obs is not None and self._final_ends is not None:
            self._final_obs.clear()
            self._final_ends.zero_()

    def _flat_tables(self) -> list[th.Tensor]:
        """:return: The packed rows (and image rows), one row per flat (row, env) index ``row * n_envs + env``"""
        assert self._table is not None
        tables = [self._table.flatten(0, 1)]
        if self._images is not None:
            tables.append(self._images.flatten(0, 1))
        return tables

    def _oldest(self) -> int:
        """:return: The flat index of the oldest stored transition (those stored follow it, wrapping around)"""
        return (self.pos * self.n_envs - self.n_transitions) % (self.ring_rows * self.n_envs)

    def sample(  # type: ignore[override]
        self, batch_size: int, env: VecNormalize | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        Sample a batch of n-step transitions, uniformly over the stored transitions. On the CPU the
        indices come from NumPy's global RNG (as in SB3's buffers, seeded by ``set_random_seed``), through
        :func:`~sb3_fasttd3.common.row_sampling.sample_tables`; on other devices from the device's torch RNG.
        Both layouts draw the same transitions from the same seed.

        :param batch_size: Number of transitions to sample
        :param env: A ``VecNormalize`` whose current statistics normalize the samples (None: raw values)
        :return: A batch with ``rewards`` the n-step discounted returns, ``discounts`` the factors
            (``gamma ** steps_used``) to apply to the bootstrapped target, ``next_observations``
            and ``dones`` (terminated, not truncated) taken at the last step used.
        """
        if self.n_transitions == 0:
            raise ValueError("Cannot sample from an empty buffer, call add() first")
        tables = self._flat_tables()
        if self.device.type == "cpu":
            rows, flat = sample_tables(tables, self.n_transitions, batch_size, self._oldest())
        else:
            draws = th.randint(0, self.n_transitions, (batch_size,), device=self.device)
            flat = (draws + self._oldest()) % len(tables[0])
            rows = [table.index_select(0, flat) for table in tables]
        return self._samples(flat, rows, env)

    def _get_samples(  # type: ignore[override]
        self, batch_inds: ArrayLike, env: VecNormalize | None = None, env_inds: ArrayLike | None = None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        The n-step transitions starting at rows ``batch_inds`` of envs ``env_inds``.

        :param batch_inds: Starting rows (ring rows, see the storage views), shape ``(batch_size,)``
        :param env: A ``VecNormalize`` whose current statistics normalize the samples (None: raw values)
        :param env_inds: Envs of the samples (drawn uniformly when None)
        :return: The samples
        """
        batch_inds = th.as_tensor(batch_inds, device=self.device).long()
        if env_inds is None:
            env_inds = th.randint(0, self.n_envs, batch_inds.shape, device=self.device)
        flat = batch_inds * self.n_envs + th.as_tensor(env_inds, device=self.device).long()
        return self._samples(flat, gather_tables(self._flat_tables(), flat), env)

    def _samples(
        self, flat: th.Tensor, rows: list[th.Tensor], env: VecNormalize | None
    ) -> ReplayBufferSamples | DictReplayBufferSamples:
        """
        :param flat: Flat (row, env) indices of the transitions, int64 ``(batch_size,)``
        :param rows: Their rows of :meth:`_flat_tables`
        :param env: A ``VecNormalize`` whose current statistics normalize the samples (None: raw values)
        :return: The samples (views of ``rows`` where nothing is computed)
        """
        if env is not None and not isinstance(env, VecNormalize):
            raise TypeError(f"env must be a VecNormalize (whose statistics normalize the samples) or None, got {env!r}")
        layout, batch = self.layout, rows[0]
        images = rows[1] if len(rows) > 1 else None
        observations = self.codec.decode(batch[:, layout.obs], None if images is None else images[:, layout.image_obs])
        next_floats, next_images = self._next_parts(flat, batch, images)
        next_observations = self.codec.decode(next_floats, next_images)
        signed_discounts = batch[:, layout.discount, None]
        rewards = batch[:, layout.n_step_return, None]
        if env is not None:
            observations = normalize_observations(observations, env)
            next_observations = normalize_observations(next_observations, env)
            if env.norm_reward:
                rewards = self._normalized_returns(flat, env)
        fields = dict(
            observations=observations,
            actions=batch[:, layout.action],
            next_observations=next_observations,
            dones=th.signbit(signed_discounts).float(),
            rewards=rewards,
            discounts=signed_discounts.abs(),
        )
        if isinstance(observations, dict):
            return DictReplayBufferSamples(**fields)  # type: ignore[arg-type]
        return ReplayBufferSamples(**fields)  # type: ignore[arg-type]

    def _next_parts(self, flat: th.Tensor, batch: th.Tensor, images: th.Tensor | None) -> tuple[th.Tensor, th.Tensor | None]:
        """
        :param flat: Flat indices of the transitions
        :param batch: Their packed rows
        :param images: Their image rows (None without images)
        :return: The float and image parts of their next observations
        """
        layout = self.layout
        if not layout.lean:
            return batch[:, layout.next], None if images is None else images[:, layout.image_next]
        assert self._table is not None and self._final_obs is not None
        refs = batch[:, layout.next].view(th.int32)[:, 0]
        first = [self._table.flatten(0, 1)[:, layout.obs]]
        if self._images is not None:
            first.append(self._images.flatten(0, 1))
        store = self._final_obs
        parts = gather_references(first, store.tables(), flat, refs, LAG_BASE, self.n_envs, store.slot_mask)
        return parts[0], parts[1] if len(parts) > 1 else None

    def _normalized_returns(self, flat: th.Tensor, env: VecNormalize) -> th.Tensor:
        """
        :return: The n-step returns of the transitions at ``flat``, each one-step reward normalized by ``env``
            before the discounted sum (as SB3's ``NStepReplayBuffer``), shape ``(batch_size, 1)``
        """
        assert self._flags is not None and self._rewards is not None and self._gamma_powers is not None
        if self._has_split_windows:
            self._check_no_split_windows()
        steps = th.arange(self.n_steps, device=self.device)
        rows = (flat[:, None] + steps * self.n_envs) % (self.ring_rows * self.n_envs)
        rewards = normalize_rewards(self._rewards.flatten()[rows], env)
        lengths = window_lengths(self._flags.flatten()[flat])
        weights = th.where(steps < lengths[:, None], self._gamma_powers[: self.n_steps], 0.0)
        return (rewards * weights).sum(dim=1, keepdim=True)

    def _check_no_split_windows(self) -> None:
        """Raise if a transition whose window a re-lay split is still stored (reads from the device)."""
        assert self._flags is not None
        n_flat = self.ring_rows * self.n_envs
        stored = (th.arange(n_flat, device=self.device) - self._oldest()) % n_flat < self.n_transitions
        if bool((((self._flags.flatten() & SPLIT) != 0) & stored).any()):
            raise ValueError(
                "This buffer was re-laid for another n_envs, which split some n-step windows over two envs: their "
                "one-step rewards cannot be normalized one by one. Sample it with a VecNormalize whose "
                "norm_reward=False, or once those transitions are overwritten"
            )
        self._has_split_windows = False

    def relaid(
        self, n_envs: int, buffer_size: int | None = None, optimize_memory_usage: bool | None = None
    ) -> "DeviceNStepReplayBuffer":
        """
        A new buffer, on this buffer's device, holding every transition stored here, laid out for ``n_envs`` envs
        (e.g. to go on training with another number of envs), in either layout. Rows are complete transitions:
        their n-step returns, discounts and next observations do not change, and their windows are closed (the
        transitions added next do not extend them). Each env's rows are laid one after the other, oldest first, and
        cut into ``n_envs`` sequences of equal lengths (the longer ones one row more), one per new env; in the lean
        layout, a transition whose next observation is not the observation stored after it in its new env keeps it
        in the final-observation store. A window cut that way can no longer have its one-step rewards normalized
        by a ``VecNormalize`` (``sample`` says so while such transitions are stored).

        :param n_envs: Number of envs of the new buffer
        :param buffer_size: Transitions the new buffer holds at least (default: this one's capacity); more if this
            buffer stores more (nothing stored is lost)
        :param optimize_memory_usage: Layout of the new buffer (default: this one's)
        :return: The new buffer
        """
        lean = self.optimize_memory_usage if optimize_memory_usage is None else bool(optimize_memory_usage)
        if buffer_size is None:
            buffer_size = self.buffer_size * self.n_envs
        rows = max(-(-self.n_transitions // n_envs), buffer_size // n_envs, self.n_steps + 1)
        relaid = DeviceNStepReplayBuffer(
            rows * n_envs,
            self.observation_space,
            self.action_space,
            device=self.device,
            n_envs=n_envs,
            optimize_memory_usage=lean,
            handle_timeout_termination=self.handle_timeout_termination,
            n_steps=self.n_steps,
            gamma=self.gamma,
        )
        if self.n_transitions > 0:
            with th.no_grad():
                Relay(self, relaid).copy()
        return relaid

    def _flat_in_env_order(self) -> th.Tensor:
        """:return: The flat indices of the stored transitions, env by env, each env's oldest first"""
        n_flat = self.ring_rows * self.n_envs
        order = th.arange(self.n_transitions, device=self.device)
        flat = (order + self._oldest()) % n_flat
        return flat[th.argsort((flat % self.n_envs) * self.n_transitions + order)]

    def to(self, device: th.device | str) -> None:
        """
        Move the storage to another device (e.g. after loading a saved buffer) and use it from now on.

        :param device: The new device
        """
        self.device = get_device(device)
        self._move_storage(self.device)

    def _move_storage(self, device: th.device) -> None:
        for name in self._STORAGE_NAMES:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))
        if self._final_obs is not None:
            self._final_obs.to(device)
        if self._table is not None:
            self._table = on_huge_pages(self._table)
        if self._images is not None:
            self._images = on_huge_pages(self._images)

    def __getstate__(self) -> dict[str, Any]:
        # Pickle the storage as CPU tensors, so that a buffer saved on a GPU can be unpickled
        # on a machine without one (no copy is made for storage already on the CPU).
        state = self.__dict__.copy()
        for name in self._STORAGE_NAMES:
            if state[name] is not None:
                state[name] = state[name].cpu()
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        if "_flags" not in state:
            raise ValueError(
                "This replay buffer was saved by an earlier version of sb3_fasttd3, whose storage layout is not "
                "supported anymore: train without it (or with a buffer saved by this version)"
            )
        self.__dict__.update({"one_step_returns": False, **state})
        # Falls back to the CPU if the saved device is a GPU that is not available
        self.device = get_device(state["device"])
        self._move_storage(self.device)
