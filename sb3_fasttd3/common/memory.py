"""Large CPU tensors on transparent huge pages, for tables that are read at random rows."""

import ctypes
import math
import sys

import torch as th

HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14  # Linux, include/uapi/asm-generic/mman-common.h


def _advise_huge_pages(address: int, length: int) -> bool:
    """Ask Linux to back ``[address, address + length)`` with transparent huge pages (``madvise``)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(address), ctypes.c_size_t(length), _MADV_HUGEPAGE) == 0
    except (OSError, AttributeError):
        return False


def _wants_huge_pages(numel: int, dtype: th.dtype, device: th.device) -> bool:
    return device.type == "cpu" and sys.platform.startswith("linux") and numel * dtype.itemsize >= HUGE_PAGE_BYTES


def zeros_on_huge_pages(shape: tuple[int, ...], dtype: th.dtype, device: th.device) -> th.Tensor:
    """
    ``th.zeros(shape)``; on a Linux CPU, for tensors of at least one huge page, the memory starts on a huge page
    boundary and is advised to use transparent huge pages before it is first written (a no-op when the system
    disables them), so that a random row gather from a large replay table misses the TLB far less. Other devices
    and systems get a plain ``th.zeros``.

    :param shape: Shape of the tensor
    :param dtype: Its dtype
    :param device: Its device
    :return: A contiguous tensor of zeros
    """
    numel = math.prod(shape)
    if not _wants_huge_pages(numel, dtype, device):
        return th.zeros(shape, dtype=dtype, device=device)
    pad = HUGE_PAGE_BYTES // dtype.itemsize
    base = th.empty(numel + pad, dtype=dtype, device=device)
    offset = (-base.data_ptr() % HUGE_PAGE_BYTES) // dtype.itemsize
    tensor = base[offset : offset + numel].view(shape)
    _advise_huge_pages(tensor.data_ptr(), numel * dtype.itemsize)
    return tensor.zero_()


def on_huge_pages(tensor: th.Tensor) -> th.Tensor:
    """
    :param tensor: A tensor (e.g. just unpickled or moved to the CPU)
    :return: ``tensor`` itself if it needs no huge pages or already starts on a huge page, else a copy of it
        made with :func:`zeros_on_huge_pages`
    """
    if not _wants_huge_pages(tensor.numel(), tensor.dtype, tensor.device) or tensor.data_ptr() % HUGE_PAGE_BYTES == 0:
        return tensor
    return zeros_on_huge_pages(tuple(tensor.shape), tensor.dtype, tensor.device).copy_(tensor)
