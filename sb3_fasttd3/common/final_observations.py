"""Store of the observations the lean replay layout cannot find in a later row: a FIFO ring on the device."""

from typing import Any

import torch as th

from sb3_fasttd3.common.replay_layout import LAG_BASE


def _next_power_of_two(value: int) -> int:
    return 1 << max(0, value - 1).bit_length()


class FinalObservationStore:
    """
    The final observations of done rows (and the next observations of rows whose windows were closed) of the lean
    replay layout, in a ring on the device. Entries are appended in row order and released all at once when their
    row is overwritten, so the live entries are always the running numbers ``[tail, head)``. The ring's capacity is
    a power of two, so an entry's slot is ``number & (capacity - 1)`` whatever the resizes; rows refer to entries by
    ``number % LAG_BASE`` (an int32).

    Appending never reads from the device: the free room is checked (one read of ``head - tail``) every
    ``check_every`` appends, and kept at least ``check_every * n_envs`` entries, the most the appends until the
    next check can add. The ring grows when that room is missing and shrinks when it holds far more than needed.
    Each append also writes the rows of the envs that add nothing, to spare rows at the end of the storage
    (one per env), so that no index is written twice.

    :param float_width: Width of the float32 part of an observation
    :param image_width: Width of the uint8 part of an observation (0 without images)
    :param n_envs: Number of rows each append offers
    :param device: Device of the storage
    :param check_every: Appends between two checks of the free room
    """

    _TENSOR_NAMES = ("floats", "images", "head", "tail")

    def __init__(self, float_width: int, image_width: int, n_envs: int, device: th.device, check_every: int = 16):
        self.float_width, self.image_width, self.n_envs = float_width, image_width, n_envs
        self.check_every = check_every
        self.device = device
        self.head = th.zeros((), dtype=th.int64, device=device)
        self.tail = th.zeros((), dtype=th.int64, device=device)
        self.capacity = 0
        self.floats = th.zeros((n_envs, float_width), dtype=th.float32, device=device)
        self.images: th.Tensor | None = None
        if image_width > 0:
            self.images = th.zeros((n_envs, image_width), dtype=th.uint8, device=device)
        self._appends_until_check = 0
        self._resize(_next_power_of_two(check_every * n_envs), live=(0, 0))

    @property
    def slot_mask(self) -> int:
        return self.capacity - 1

    def _resize(self, capacity: int, live: tuple[int, int]) -> None:
        """Move the live entries (running numbers ``live[0]`` to ``live[1]``) to a ring of ``capacity`` slots."""
        if capacity > LAG_BASE:
            raise ValueError(
                f"optimize_memory_usage=True keeps at most {LAG_BASE} final observations, {live[1] - live[0]} are "
                "stored: use optimize_memory_usage=False, or a smaller buffer_size"
            )
        numbers = th.arange(*live, device=self.device)
        old_slots, new_slots = numbers & max(self.capacity - 1, 0), numbers & (capacity - 1)
        parts = [("floats", self.float_width, th.float32)]
        if self.images is not None:
            parts.append(("images", self.image_width, th.uint8))
        for name, width, dtype in parts:
            old = getattr(self, name)
            new = th.zeros((capacity + self.n_envs, width), dtype=dtype, device=self.device)
            new[new_slots] = old[old_slots]
            setattr(self, name, new)
        self.capacity = capacity

    def reserve(self, incoming: int) -> None:
        """
        Make room for ``incoming`` more entries (reads the number of live entries from the device).

        :param incoming: Entries about to be appended
        """
        tail, head = int(self.tail), int(self.head)
        needed = _next_power_of_two(head - tail + incoming)
        if self.capacity < needed or self.capacity > 4 * needed:
            self._resize(max(needed, _next_power_of_two(self.check_every * self.n_envs)), live=(tail, head))

    def append(self, floats: th.Tensor, images: th.Tensor | None, mask: th.Tensor) -> th.Tensor:
        """
        Append the rows of ``floats`` (and ``images``) where ``mask`` is True, in order.

        :param floats: Float parts, shape ``(n_envs, float_width)``
        :param images: uint8 parts, shape ``(n_envs, image_width)`` (None without images)
        :param mask: Which rows to append, bool ``(n_envs,)``
        :return: The int32 references of the appended rows (meaningless where ``mask`` is False)
        """
        if self._appends_until_check == 0:
            self.reserve(self.check_every * self.n_envs)
            self._appends_until_check = self.check_every
        self._appends_until_check -= 1
        numbers = self.head + th.cumsum(mask, 0) - 1
        spare = th.arange(self.capacity, self.capacity + self.n_envs, device=self.device)
        slots = th.where(mask, numbers & self.slot_mask, spare)
        self.floats[slots] = floats
        if self.images is not None:
            assert images is not None
            self.images[slots] = images
        self.head += mask.sum()
        return (numbers % LAG_BASE).int()

    def append_now(self, floats: th.Tensor, images: th.Tensor | None, mask: th.Tensor) -> th.Tensor:
        """:meth:`append` outside the regular adds (closing windows): checks the room now, and again at the next append."""
        self.reserve(self.n_envs)
        self._appends_until_check = 1
        refs = self.append(floats, images, mask)
        self._appends_until_check = 0
        return refs

    def extend(self, floats: th.Tensor, images: th.Tensor | None) -> th.Tensor:
        """
        Append every row (when re-laying a buffer: reads from the device).

        :param floats: Float parts, shape ``(n, float_width)``
        :param images: uint8 parts, shape ``(n, image_width)`` (None without images)
        :return: The int32 references of the rows
        """
        self.reserve(len(floats) + self.check_every * self.n_envs)
        numbers = self.head + th.arange(len(floats), device=self.device)
        self.floats[numbers & self.slot_mask] = floats
        if self.images is not None:
            assert images is not None
            self.images[numbers & self.slot_mask] = images
        self.head += len(floats)
        self._appends_until_check = 0
        return (numbers % LAG_BASE).int()

    def release(self, until: th.Tensor) -> None:
        """
        Release the entries numbered below ``until`` (those of the rows being overwritten).

        :param until: 0-dim int64 tensor on the device
        """
        self.tail.copy_(until)

    def clear(self) -> None:
        self.head.zero_()
        self.tail.zero_()
        self._appends_until_check = 0

    def tables(self) -> list[th.Tensor]:
        """:return: The ring's float (and image) rows (the second tables of ``row_sampling.gather_references``)"""
        tables = [self.floats[: self.capacity]]
        if self.images is not None:
            tables.append(self.images[: self.capacity])
        return tables

    def slots(self, refs: th.Tensor) -> th.Tensor:
        """:return: The ring slots (int64) of the entries that ``refs`` refer to"""
        return (refs & self.slot_mask).long()

    def tensors(self) -> list[th.Tensor]:
        return [tensor for name in self._TENSOR_NAMES if (tensor := getattr(self, name)) is not None]

    def to(self, device: th.device) -> None:
        self.device = device
        for name in self._TENSOR_NAMES:
            value = getattr(self, name)
            if value is not None:
                setattr(self, name, value.to(device))

    def __getstate__(self) -> dict[str, Any]:
        # Pickled as CPU tensors (see DeviceNStepReplayBuffer.__getstate__)
        state = self.__dict__.copy()
        for name in self._TENSOR_NAMES:
            if state[name] is not None:
                state[name] = state[name].cpu()
        state["device"] = str(self.device)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.device = th.device(state["device"])
