"""Two independent pieces of work at once, each on half of PyTorch's CPU threads."""

from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch as th

MainResult = TypeVar("MainResult")
SideResult = TypeVar("SideResult")


class HalfThreads:
    """
    Runs one function on a worker thread while the calling thread runs another, each with half of PyTorch's CPU
    threads (at least one). PyTorch releases the GIL inside its operators, so two chains of small operators that
    each scale poorly over threads run side by side; halving the threads avoids oversubscribing the cores. The
    two functions must not write what the other reads, nor draw from the same random generator.

    The caller holds its half for a whole stretch of work (:meth:`halved`), the work between the runs included:
    any operator on the full thread count wakes the caller's OpenMP threads, which then spin on the worker's core.
    """

    def __init__(self):
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sb3_fasttd3-half")
        self._half: int | None = None

    @property
    def active(self) -> bool:
        """Whether a :meth:`halved` block is open."""
        return self._half is not None

    @contextmanager
    def halved(self) -> Iterator[None]:
        """
        The calling thread on half of ``torch.get_num_threads()`` (at least one) until the block ends; within an
        open block, nothing changes.
        """
        if self.active:
            yield
            return
        threads = th.get_num_threads()
        self._half = max(1, threads // 2)
        th.set_num_threads(self._half)
        try:
            yield
        finally:
            self._half = None
            th.set_num_threads(threads)

    def run(self, main: Callable[[], MainResult], side: Callable[[], SideResult]) -> tuple[MainResult, SideResult]:
        """
        :param main: run on the calling thread
        :param side: run on the worker thread meanwhile
        :return: both results; an error in either is raised once both have finished
        """
        if self._half is None:
            raise RuntimeError("HalfThreads.run needs the caller's threads halved: call it inside `with halved():`")
        half = self._half

        def side_with_half() -> SideResult:
            th.set_num_threads(half)  # the worker's own OpenMP team
            return side()

        future = self._pool.submit(side_with_half)
        try:
            main_result = main()
        finally:
            side_result = future.result()  # the side's work is done before anything goes on
        return main_result, side_result

    def __del__(self) -> None:
        self._pool.shutdown(wait=False)
