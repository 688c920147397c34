"""
Re-laying a replay buffer's transitions for another number of envs (or the other layout): the work behind
:meth:`~sb3_fasttd3.common.buffers.DeviceNStepReplayBuffer.relaid`. A companion of the buffer: it reads and writes
the buffers' storage directly.
"""

from typing import TYPE_CHECKING

import torch as th

from sb3_fasttd3.common.replay_layout import LAG_BASE, OPEN, SPLIT, clear_bits, window_lengths
from sb3_fasttd3.common.row_sampling import gather_tables

if TYPE_CHECKING:
    from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer

# Bytes of the rows copied at a time, at most (bounds the memory of the copy)
_BATCH_BYTES = 64 << 20


class Relay:
    """
    Copies every transition of ``source`` into ``target``, a new, empty buffer with its own number of envs and
    layout, and rows enough for them. The source's envs' rows are laid one after the other, each env's oldest
    first, and cut into ``target.n_envs`` sequences of equal lengths (the last ones one row longer where the
    count does not divide), one per target env, ending at the same row: the stored transitions stay one range of
    the ring, so the sampler draws them uniformly. Rows are complete transitions, copied bit for bit, and their
    windows are closed. A window that a cut separates from some of its rows is flagged ``SPLIT``. In the lean
    layout a transition refers to the row its window's length after it where that row's observation is its next
    observation, bit for bit; else its next observation enters the final-observation store.

    :param source: The buffer whose transitions are copied (unchanged)
    :param target: The new buffer
    """

    def __init__(self, source: "DeviceNStepReplayBuffer", target: "DeviceNStepReplayBuffer"):
        self.source, self.target = source, target
        self.device = target.device
        # The source's flat indices, env by env, each env's oldest first
        self.sequence = source._flat_in_env_order()

    def copy(self) -> None:
        """Copy, in the order of the target's ring, a batch at a time (final observations enter in row order)."""
        source, target = self.source, self.target
        target._allocate()
        n_envs, total = target.n_envs, source.n_transitions
        # Target env e gets the transitions starts[e] to starts[e] + lengths[e] - 1 of the sequence, in its rows
        # first_rows[e] to rows_used - 1: the longer sequences go to the last envs, so that the stored transitions
        # are the last `total` flat indices before row rows_used
        shorter, longer = divmod(total, n_envs)
        lengths = th.full((n_envs,), shorter, dtype=th.int64, device=self.device)
        lengths[n_envs - longer :] += 1
        starts = th.cumsum(lengths, 0) - lengths
        rows_used = shorter + int(longer > 0)
        first_rows = rows_used - lengths
        final_counts = th.zeros(target.ring_rows, dtype=th.int64, device=self.device)
        row_bytes = sum(table.shape[1] * table.element_size() for table in source._flat_tables())
        batch = max(1, _BATCH_BYTES // (3 * row_bytes))
        end = rows_used * n_envs
        for begin in range(end - total, end, batch):
            flat = th.arange(begin, min(begin + batch, end), device=self.device)
            row, env = flat // n_envs, flat % n_envs
            age = row - first_rows[env]
            # Position in the sequence, and the transitions the target env holds from this one on
            self._copy_batch(flat, starts[env] + age, lengths[env] - age, final_counts)
        target.pos = rows_used % target.ring_rows
        target.n_transitions = total
        target.full = total == target.buffer_size * n_envs
        if target._final_ends is not None:
            target._final_ends.copy_(th.cumsum(final_counts, 0))

    def _copy_batch(self, flat: th.Tensor, position: th.Tensor, left: th.Tensor, final_counts: th.Tensor) -> None:
        """
        :param flat: Target flat indices of the transitions
        :param position: Their positions in the sequence
        :param left: The transitions their target env holds from each one on (itself included)
        :param final_counts: Entries of the final-observation store per target row, counted here (lean layout)
        """
        source, target = self.source, self.target
        assert target._table is not None and target._flags is not None and target._rewards is not None
        assert source._flags is not None and source._rewards is not None
        source_flat = self.sequence[position]
        rows = gather_tables(source._flat_tables(), source_flat)
        batch, images = rows[0], (rows[1] if len(rows) > 1 else None)
        next_floats, next_images = source._next_parts(source_flat, batch, images)
        flags = source._flags.flatten()[source_flat]
        lengths = window_lengths(flags)
        split = (lengths > left) | ((flags & SPLIT) != 0)
        if target.n_steps > 1 and bool(split.any()):
            target._has_split_windows = True
        flags = clear_bits(flags, OPEN) | split.to(flags.dtype) * SPLIT

        if target.layout.lean:
            next_part = self._lean_references(position, left, lengths, next_floats, next_images)
            final = next_part < LAG_BASE
            final_counts.index_add_(0, flat[final] // target.n_envs, th.ones_like(flat[final]))
            next_part = next_part[:, None]
        else:
            next_part = next_floats.view(th.int32)
        kept = batch[:, source.layout.obs.start : source.layout.next.start]  # observation to signed discount
        target._table.view(th.int32).flatten(0, 1)[flat] = th.cat([kept.view(th.int32), next_part], dim=1)
        if target._images is not None:
            assert images is not None and next_images is not None
            obs_images = images[:, source.layout.image_obs]
            target._images.flatten(0, 1)[flat] = obs_images if target.layout.lean else th.cat([obs_images, next_images], 1)
        target._rewards.flatten()[flat] = source._rewards.flatten()[source_flat]
        target._flags.flatten()[flat] = flags

    def _lean_references(
        self,
        position: th.Tensor,
        left: th.Tensor,
        lengths: th.Tensor,
        next_floats: th.Tensor,
        next_images: th.Tensor | None,
    ) -> th.Tensor:
        """
        :param position: Positions of the transitions in the sequence
        :param left: The transitions their target env holds from each one on
        :param lengths: Their window lengths
        :param next_floats: Float parts of their next observations
        :param next_images: Image parts of their next observations (None without images)
        :return: Their int32 next-observation references in the target
        """
        source, store = self.source, self.target._final_obs
        assert store is not None
        later = lengths < left
        candidates = self.sequence[th.where(later, position + lengths, position)]
        candidate_rows = gather_tables(source._flat_tables(), candidates)
        candidate_floats = candidate_rows[0][:, source.layout.obs]
        same = later & (candidate_floats.view(th.int32) == next_floats.view(th.int32)).all(dim=1)
        if next_images is not None:
            same &= (candidate_rows[1][:, source.layout.image_obs] == next_images).all(dim=1)
        references = (LAG_BASE + lengths).int()
        final = ~same
        if bool(final.any()):
            references[final] = store.extend(next_floats[final], None if next_images is None else next_images[final])
        return references
