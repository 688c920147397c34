"""
Data-parallel training on ``torch.distributed``: the collectives that keep the ranks of one FastTD3 run in step.

Each rank steps its own envs into its own replay buffer; the ranks agree on the parameters (broadcast from rank 0,
then identical averaged gradients every update), on the observation statistics (merged exactly every vector step),
on the number of transitions and on when to stop.
"""

import atexit
import datetime
import hashlib
import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import torch as th
import torch.distributed as dist

from sb3_fasttd3.common.normalization import combine_moments

# torchrun's environment: the variables a process group is initialized from (``init_method="env://"``)
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
DISTRIBUTED_CHOICES = ("auto", True, False)


def _digest(value: Any) -> int:
    """A 56-bit digest of ``repr(value)``: equal on every rank for equal settings, and negatable in an int64."""
    return int.from_bytes(hashlib.sha256(repr(value).encode()).digest()[:7], "little")


def launched_by_torchrun() -> bool:
    """Whether torchrun (or any launcher setting its variables) started this process as one of several."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


# How long a rank ending normally waits at exit for the others before closing the group anyway
EXIT_BARRIER_TIMEOUT = datetime.timedelta(minutes=5)


class _GroupTeardown:
    """
    Closes a process group FastTD3 initialized, at interpreter exit. A rank that ends normally first waits for the
    others (a rank closing its group while another still works, e.g. rank 0 saving, can abort in gloo's teardown);
    a rank ending on an uncaught exception, or on anything that ended its ``learn()`` (``sys.exit`` in a callback,
    which no excepthook sees), closes at once, since the others may be stuck in a collective (torchrun then stops
    them).
    """

    # The teardown of the group this process initialized, if any
    current: "_GroupTeardown | None" = None

    def __init__(self):
        self.failed = False
        _GroupTeardown.current = self
        previous_hook = sys.excepthook

        def excepthook(*args: object) -> None:
            self.failed = True
            previous_hook(*args)

        sys.excepthook = excepthook
        atexit.register(self.close)

    def close(self) -> None:
        if not dist.is_initialized():
            return
        if not self.failed:
            try:
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=EXIT_BARRIER_TIMEOUT)
                else:
                    dist.barrier()
            except RuntimeError:  # another rank is gone or timed out: close anyway
                pass
        dist.destroy_process_group()


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``; the global rank where it is not set)."""
    return int(os.environ.get("LOCAL_RANK", dist.get_rank()))


class DataParallel:
    """
    The collectives of data-parallel training over the default process group: every method is a collective that
    every rank must call, in the same order.

    :param device: the model's device; NCCL needs CUDA tensors, gloo takes CPU tensors
    """

    def __init__(self, device: th.device):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device

    @classmethod
    def resolve(cls, distributed: bool | str, device: th.device) -> "DataParallel | None":
        """
        The data-parallel context ``distributed`` asks for, or None for a single process.

        :param distributed: ``"auto"``: data-parallel when a process group of several ranks is initialized, or when
            torchrun started this process (then one is initialized); ``True``: the same, but a single process is an
            error; ``False``: a single process, whatever the environment
        :param device: the model's device (its type picks the backend when a process group is initialized here)
        """
        if not (isinstance(distributed, bool) or distributed == "auto"):  # 1 == True: membership would take it
            raise ValueError(f"distributed must be one of {list(DISTRIBUTED_CHOICES)}, got {distributed!r}")
        if distributed is False or not dist.is_available():
            if distributed is True:
                raise ValueError("distributed=True needs torch.distributed, which this build of PyTorch lacks")
            return None
        if not dist.is_initialized() and launched_by_torchrun():
            # NCCL for CUDA tensors, gloo for CPU ones (both where CUDA is available)
            dist.init_process_group(backend="cuda:nccl,cpu:gloo" if device.type == "cuda" else "gloo")
            # The group made here is closed here: one left to the interpreter's teardown can abort the process
            _GroupTeardown()
        if dist.is_initialized() and dist.get_world_size() > 1:
            return cls(device)
        if distributed is True:
            raise ValueError(
                "distributed=True needs several processes: launch the script with torchrun "
                "(e.g. torchrun --nproc_per_node=2 train.py) or initialize a process group of several ranks first"
            )
        return None

    @staticmethod
    def fail() -> None:
        """This rank is ending on an error: at exit, close the process group without waiting for the other ranks."""
        if _GroupTeardown.current is not None:
            _GroupTeardown.current.failed = True

    def broadcast_(self, tensors: Sequence[th.Tensor]) -> None:
        """Overwrite ``tensors`` in place with rank 0's, flattened into one broadcast per dtype."""
        by_dtype: dict[th.dtype, list[th.Tensor]] = {}
        for tensor in tensors:
            by_dtype.setdefault(tensor.dtype, []).append(tensor)
        for group in by_dtype.values():
            flat = th.cat([tensor.detach().reshape(-1) for tensor in group]).to(self.device)
            dist.broadcast(flat, src=0)
            for tensor, value in zip(group, self._unflatten(flat, group), strict=True):
                tensor.detach().copy_(value)

    def average_gradients_(self, params: Sequence[th.Tensor]) -> None:
        """
        Replace each gradient by its mean over the ranks, in one all-reduce of the flattened gradients. A parameter
        without a gradient on this rank counts as a zero gradient there (and receives the mean of the others).
        """
        grads = [param.grad if param.grad is not None else th.zeros_like(param) for param in params]
        flat = th.cat([grad.reshape(-1) for grad in grads])
        dist.all_reduce(flat)  # a sum: gloo has no average
        flat.div_(self.world_size)
        for param, grad in zip(params, self._unflatten(flat, grads), strict=True):
            param.grad = grad

    def merge_moments(self, count: th.Tensor, mean: th.Tensor, var: th.Tensor) -> tuple[th.Tensor, th.Tensor, th.Tensor]:
        """
        The count, mean and (population) variance of the union of every rank's batch, from each rank's own:
        one all-gather, merged on every rank in rank order, so that all ranks hold the same statistics.

        :param count: this rank's number of samples (a scalar tensor)
        :param mean: this rank's sample mean
        :param var: this rank's population variance (same shape as ``mean``)
        """
        packed = th.cat([count.reshape(1).double(), mean.reshape(-1).double(), var.reshape(-1).double()])
        gathered = [th.empty_like(packed) for _ in range(self.world_size)]
        dist.all_gather(gathered, packed)
        size = mean.numel()
        total, merged_mean, merged_var = gathered[0][0], gathered[0][1 : 1 + size], gathered[0][1 + size :]
        for other in gathered[1:]:
            moments = (other[0], other[1 : 1 + size], other[1 + size :])
            total, merged_mean, merged_var = combine_moments(total, merged_mean, merged_var, *moments)
        return total, merged_mean.to(mean.dtype).view_as(mean), merged_var.to(var.dtype).view_as(var)

    def sum(self, value: int) -> int:
        """The sum of an integer over the ranks (a host sync)."""
        tensor = th.tensor([value], dtype=th.int64, device=self.device)
        dist.all_reduce(tensor)
        return int(tensor.item())

    def all_true(self, flag: bool) -> bool:
        """Whether ``flag`` holds on every rank (a host sync): one rank's False, e.g. a callback's stop, stops all."""
        tensor = th.tensor([int(flag)], dtype=th.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
        return bool(tensor.item())

    def all_equal(self, value: int) -> bool:
        """Whether every rank passed the same integer (a host sync)."""
        tensor = th.tensor([value, -value], dtype=th.int64, device=self.device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return int(tensor[0]) == -int(tensor[1])

    def differing(self, values: Mapping[str, Any]) -> list[str]:
        """
        The names of ``values`` (the same names on every rank) whose value is not the same on every rank, compared
        by a digest of its ``repr`` (one all-reduce, a host sync).
        """
        digests = th.tensor([_digest(value) for value in values.values()], dtype=th.int64, device=self.device)
        extremes = th.cat([digests, -digests])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX)
        highest, lowest = extremes[: len(values)].tolist(), (-extremes[len(values) :]).tolist()
        return [name for name, high, low in zip(values, highest, lowest, strict=True) if high != low]

    @staticmethod
    def _unflatten(flat: th.Tensor, like: Sequence[th.Tensor]) -> list[th.Tensor]:
        views, start = [], 0
        for tensor in like:
            views.append(flat[start : start + tensor.numel()].view_as(tensor))
            start += tensor.numel()
        return views

    def __repr__(self) -> str:
        return f"DataParallel(rank={self.rank}, world_size={self.world_size}, backend={dist.get_backend()})"
