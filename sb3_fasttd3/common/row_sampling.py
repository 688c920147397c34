"""
Sampling rows of large CPU tables (the replay buffer's packed transitions, and its uint8 image rows) through small
C kernels that prefetch the rows they are about to copy.

A replay batch is gathered from tables much larger than the CPU caches, so nearly every row is a memory miss.
``index_select`` copies one row at a time through a generic copy routine and keeps few misses in flight; these
kernels issue the loads of later rows while they copy the current one, copy the same row of several tables (any
dtype) in one pass, and :func:`sample_tables` also draws the indices itself, in parallel, instead of writing and
reading them back. :func:`gather_either` serves rows that live in one of two tables in one pass as well, and
:func:`gather_references` the rows that int32 references name there (the lean replay layout's next observations,
in the replay table or in its store of final observations). Both paths are compared in
benchmarks/results/update_throughput.md (``python -m benchmarks.update_throughput --sampling-only``).

The kernels are compiled with the system's C compiler (``$CC``, else ``cc``) on first use and loaded with ctypes.
Without a compiler, or with ``SB3_FASTTD3_NATIVE_SAMPLING=0``, NumPy draws the indices and ``index_select``
gathers the rows.
"""

import ctypes
import functools
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch as th

_SOURCE = r"""
#include <stdint.h>
#include <string.h>

/* Rows prefetched ahead of the one being copied: enough misses in flight to cover the memory latency */
#define AHEAD 16

/* One table read by a gather: row r starts at base + r * stride; `bytes` of it are copied to out + i * bytes */
typedef struct {
    const char *base;
    int64_t stride;
    int64_t bytes;
    char *out;
} source_t;

static inline void prefetch_row(const source_t *sources, int n_sources, int64_t row) {
    for (int k = 0; k < n_sources; ++k) {
        const int64_t bytes = sources[k].bytes;
        if (bytes <= 0) continue;
        const char *start = sources[k].base + row * sources[k].stride;
        /* Into the L2 cache: more misses can be in flight there than in L1 */
        for (int64_t offset = 0; offset < bytes; offset += 64) __builtin_prefetch(start + offset, 0, 1);
        __builtin_prefetch(start + bytes - 1, 0, 1);
    }
}

static inline void copy_row(const source_t *sources, const source_t *into, int n_sources, int64_t row, int64_t i) {
    for (int k = 0; k < n_sources; ++k)
        memcpy(into[k].out + i * into[k].bytes, sources[k].base + row * sources[k].stride, (size_t)sources[k].bytes);
}

static inline int64_t index_at(const void *indices, int wide, int64_t i) {
    return wide ? ((const int64_t *)indices)[i] : (int64_t)((const int32_t *)indices)[i];
}

/* Row indices[i] of every source, for i < n; returns the first i whose index is outside [0, n_rows), else n */
int64_t gather_rows(const source_t *sources, int n_sources, int64_t n_rows, const void *indices, int wide, int64_t n,
                    int threads) {
    int64_t first_bad = n;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(min : first_bad)
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) {
            int64_t ahead = index_at(indices, wide, i + AHEAD);
            if (ahead >= 0 && ahead < n_rows) prefetch_row(sources, n_sources, ahead);
        }
        int64_t row = index_at(indices, wide, i);
        if (row < 0 || row >= n_rows) {
            if (i < first_bad) first_bad = i;
            continue;
        }
        copy_row(sources, sources, n_sources, row, i);
    }
    return first_bad;
}

/* Row indices[i] of the `first` sources where indices[i] >= 0, row -indices[i] - 1 of the `second` ones (of the same
   widths) where it is negative, copied to the first sources' outputs; returns the first bad i, else n */
int64_t gather_either(const source_t *first, const source_t *second, int n_sources, int64_t n_first, int64_t n_second,
                      const int64_t *indices, int64_t n, int threads) {
    int64_t first_bad = n;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(min : first_bad)
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) {
            int64_t ahead = indices[i + AHEAD];
            if (ahead >= 0 && ahead < n_first) prefetch_row(first, n_sources, ahead);
            else if (ahead < 0 && -ahead - 1 < n_second) prefetch_row(second, n_sources, -ahead - 1);
        }
        int64_t index = indices[i];
        if (index >= 0 && index < n_first) copy_row(first, first, n_sources, index, i);
        else if (index < 0 && -index - 1 < n_second) copy_row(second, first, n_sources, -index - 1, i);
        else if (i < first_bad) first_bad = i;
    }
    return first_bad;
}

/* Row of `first` or `second` a reference names (the lean replay layout's next observations): a reference of at least
   lag_base is (ref - lag_base) steps after rows[i] in `first`, wrapping at n_first; a smaller one is the slot
   ref & slot_mask of `second`. Returns -1 - slot for `second` (as gather_either's indices) */
static inline int64_t referenced_row(int32_t ref, int64_t row, int64_t lag_base, int64_t step, int64_t n_first,
                                     int64_t slot_mask) {
    if (ref < lag_base) return -1 - ((int64_t)ref & slot_mask);
    int64_t later = row + ((int64_t)ref - lag_base) * step;
    return later >= n_first ? later - n_first : later;
}

/* Rows named by the int32 references refs[i * ref_stride] of the rows rows[i] (see referenced_row), copied to the first
   sources' outputs; returns the first i whose row is outside its table, else n */
int64_t gather_references(const source_t *first, const source_t *second, int n_sources, int64_t n_first,
                          int64_t n_second, const int64_t *rows, const int32_t *refs, int64_t ref_stride,
                          int64_t lag_base, int64_t step, int64_t slot_mask, int64_t n, int threads) {
    int64_t first_bad = n;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(min : first_bad)
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) {
            int64_t ahead = referenced_row(refs[(i + AHEAD) * ref_stride], rows[i + AHEAD], lag_base, step, n_first,
                                           slot_mask);
            if (ahead >= 0 && ahead < n_first) prefetch_row(first, n_sources, ahead);
            else if (ahead < 0 && -ahead - 1 < n_second) prefetch_row(second, n_sources, -ahead - 1);
        }
        int64_t index = referenced_row(refs[i * ref_stride], rows[i], lag_base, step, n_first, slot_mask);
        if (index >= 0 && index < n_first) copy_row(first, first, n_sources, index, i);
        else if (index < 0 && -index - 1 < n_second) copy_row(second, first, n_sources, -index - 1, i);
        else if (i < first_bad) first_bad = i;
    }
    return first_bad;
}

/* Index i of the stream `seed`, uniform on [0, high): SplitMix64's output function of the i-th step of its
   state, mapped to [0, high) by a 64x64-bit multiply keeping the high half (bias below high / 2^64) */
static inline int64_t draw_index(uint64_t seed, int64_t i, int64_t high) {
    uint64_t z = seed + (uint64_t)(i + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    z ^= z >> 31;
    return (int64_t)(((unsigned __int128)z * (uint64_t)high) >> 64);
}

void draw_indices(uint64_t seed, int64_t high, int64_t n, int64_t *out) {
    for (int64_t i = 0; i < n; ++i) out[i] = draw_index(seed, i, high);
}

/* Row (offset + draw_index(seed, i, high)) mod n_rows of every source, for i < n (offset < n_rows, high <= n_rows);
   the rows are written to rows_out unless it is NULL */
void sample_rows(const source_t *sources, int n_sources, int64_t n_rows, int64_t offset, int64_t high, uint64_t seed,
                 int64_t n, int64_t *rows_out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        if (i + AHEAD < n) {
            int64_t ahead = offset + draw_index(seed, i + AHEAD, high);
            prefetch_row(sources, n_sources, ahead >= n_rows ? ahead - n_rows : ahead);
        }
        int64_t row = offset + draw_index(seed, i, high);
        if (row >= n_rows) row -= n_rows;
        if (rows_out) rows_out[i] = row;
        copy_row(sources, sources, n_sources, row, i);
    }
}
"""

# Fewer rows than this per thread are copied by fewer threads: a parallel region costs a few microseconds
_MIN_ROWS_PER_THREAD = 2048


class _Source(ctypes.Structure):
    """A table the kernels read rows from (``source_t``): where row 0 starts, the bytes between rows, the bytes copied."""

    _fields_ = (("base", ctypes.c_void_p), ("stride", ctypes.c_int64), ("bytes", ctypes.c_int64), ("out", ctypes.c_void_p))


def _build(source: Path, library: Path) -> bool:
    """Compile ``source`` into the shared library ``library``, with OpenMP if the compiler has it."""
    compiler = os.environ.get("CC", "cc")
    for openmp in (["-fopenmp"], []):
        command = [compiler, "-O3", "-shared", "-fPIC", *openmp, str(source), "-o", str(library)]
        try:
            if subprocess.run(command, capture_output=True, timeout=120).returncode == 0:
                return True
        except (OSError, subprocess.SubprocessError):
            return False
    return False


@functools.cache
def _kernels() -> ctypes.CDLL | None:
    """The compiled kernels, or None where they cannot be built (or are switched off)."""
    if os.environ.get("SB3_FASTTD3_NATIVE_SAMPLING", "1") == "0" or not sys.platform.startswith(("linux", "darwin")):
        return None
    try:
        with tempfile.TemporaryDirectory(prefix="sb3_fasttd3_") as directory:
            source, path = Path(directory, "row_sampling.c"), Path(directory, "row_sampling.so")
            source.write_text(_SOURCE)
            if not _build(source, path):
                return None
            # The loaded library stays mapped once its file is deleted with the directory
            kernels = ctypes.CDLL(str(path))
    except OSError:  # no writable temporary directory, or one mounted noexec
        return None
    pointer, int64, uint64, int32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_uint64, ctypes.c_int
    kernels.gather_rows.argtypes = [pointer, int32, int64, pointer, int32, int64, int32]
    kernels.gather_rows.restype = int64
    kernels.gather_either.argtypes = [pointer, pointer, int32, int64, int64, pointer, int64, int32]
    kernels.gather_either.restype = int64
    kernels.gather_references.argtypes = [pointer, pointer, int32, int64, int64, pointer, pointer, *[int64] * 4, int64, int32]
    kernels.gather_references.restype = int64
    kernels.sample_rows.argtypes = [pointer, int32, int64, int64, int64, uint64, int64, pointer, int32]
    kernels.sample_rows.restype = None
    kernels.draw_indices.argtypes = [uint64, int64, int64, pointer]
    kernels.draw_indices.restype = None
    return kernels


def _fits_kernels(tables: Sequence[th.Tensor], indices: th.Tensor | None = None) -> bool:
    """
    Whether the kernels read ``tables`` (and ``indices``, if given): 2-D CPU tensors of the same number of rows, each
    row contiguous (any dtype, any distance between rows, e.g. a column range of a wider table), and contiguous 1-D
    int32 or int64 CPU indices.
    """
    tables_fit = all(
        table.device.type == "cpu"
        and table.dim() == 2
        and (table.stride(1) == 1 or table.shape[1] <= 1)
        and table.stride(0) >= 0
        and len(table) == len(tables[0])
        for table in tables
    )
    if indices is None or not tables_fit:
        return tables_fit
    return (
        indices.device.type == "cpu"
        and indices.dtype in (th.int32, th.int64)
        and indices.dim() == 1
        and indices.is_contiguous()
    )


def _sources(tables: Sequence[th.Tensor], outs: Sequence[th.Tensor]) -> ctypes.Array:
    """The kernels' view of ``tables``, each copied into the packed rows of the matching ``outs``."""
    sources = (_Source * len(tables))()
    for source, table, out in zip(sources, tables, outs, strict=True):
        itemsize = table.element_size()
        source.base, source.stride = table.data_ptr(), table.stride(0) * itemsize
        source.bytes, source.out = table.shape[1] * itemsize, out.data_ptr()
    return sources


def _empty_rows(tables: Sequence[th.Tensor], n: int) -> list[th.Tensor]:
    return [th.empty((n, table.shape[1]), dtype=table.dtype) for table in tables]


def _threads(n_rows: int) -> int:
    return max(1, min(th.get_num_threads(), n_rows // _MIN_ROWS_PER_THREAD))


def numpy_indices(high: int, n: int) -> th.Tensor:
    """
    ``n`` indices uniform on ``[0, high)`` from NumPy's global RNG, as SB3's buffers draw them (on the CPU faster
    than ``th.randint``), as int32 while they fit (drawn faster than int64).
    """
    dtype = np.int32 if high <= np.iinfo(np.int32).max else np.int64
    return th.from_numpy(np.random.randint(0, high, n, dtype=dtype))


def draw_seed() -> int:
    """The seed of one :func:`sample_tables` draw, from NumPy's global RNG (seeded by SB3's ``set_random_seed``)."""
    return int(np.random.randint(0, np.iinfo(np.int64).max, dtype=np.int64))


def kernel_indices(seed: int, high: int, n: int) -> th.Tensor:
    """
    :param seed: A seed from :func:`draw_seed`
    :param high: Exclusive upper bound of the indices
    :param n: Number of indices
    :return: The int64 draws (before the offset) :func:`sample_tables` gathers with this seed (requires the kernels)
    """
    kernels = _kernels()
    assert kernels is not None, "the sampling kernels are not available"
    indices = th.empty(n, dtype=th.int64)
    kernels.draw_indices(seed, high, n, indices.data_ptr())
    return indices


def gather_tables(tables: Sequence[th.Tensor], indices: th.Tensor) -> list[th.Tensor]:
    """
    ``[table.index_select(0, indices) for table in tables]``: through the prefetching kernel (one pass, each row of
    every table copied together) for CPU tables whose rows are contiguous and contiguous 1-D int32 or int64 CPU
    indices, through ``index_select`` otherwise.

    :param tables: Tables of the same number of rows (any dtypes and widths)
    :param indices: Rows to gather, each in ``[0, len(tables[0]))``
    :return: New contiguous tensors of shapes ``(len(indices), table.shape[1])``
    :raises IndexError: if an index is outside ``[0, len(tables[0]))``
    """
    kernels = _kernels() if _fits_kernels(tables, indices) else None
    if kernels is None:
        return [table.index_select(0, indices) for table in tables]
    outs = _empty_rows(tables, len(indices))
    n_rows, wide = len(tables[0]), int(indices.dtype == th.int64)
    first_bad = kernels.gather_rows(
        _sources(tables, outs), len(tables), n_rows, indices.data_ptr(), wide, len(indices), _threads(len(indices))
    )
    if first_bad < len(indices):
        raise IndexError(f"index {int(indices[first_bad])} is out of range for a table of {n_rows} rows")
    return outs


def gather_rows(table: th.Tensor, indices: th.Tensor) -> th.Tensor:
    """
    ``table.index_select(0, indices)`` for one table (see :func:`gather_tables`).

    :param table: Table of rows
    :param indices: Rows to gather, each in ``[0, len(table))``
    :return: A new tensor of shape ``(len(indices), table.shape[1])``
    :raises IndexError: if an index is outside ``[0, len(table))``
    """
    return gather_tables([table], indices)[0]


def gather_either(first: Sequence[th.Tensor], second: Sequence[th.Tensor], indices: th.Tensor) -> list[th.Tensor]:
    """
    Row ``i`` of ``first[k]`` where ``indices`` holds ``i >= 0``, row ``-i - 1`` of ``second[k]`` where it holds
    ``i < 0``: e.g. next observations, some in the replay table and some in a separate store. One pass of the
    prefetching kernel on the CPU; elsewhere two ``index_select`` and a ``where`` (no host sync).

    :param first: Tables of the same number of rows
    :param second: Tables of the same widths and dtypes as ``first`` (and of at least one row)
    :param indices: int64 indices, shape ``(n,)``
    :return: New contiguous tensors of shapes ``(n, first[k].shape[1])``
    :raises IndexError: (on the CPU) if an index is outside the rows of its table
    """
    kernels = None
    if _fits_kernels(first, indices) and _fits_kernels(second) and indices.dtype == th.int64:
        kernels = _kernels()
    if kernels is None:
        from_second = (indices < 0)[:, None]
        first_rows, second_rows = indices.clamp(min=0), (-1 - indices).clamp(min=0)
        return [
            th.where(from_second, b.index_select(0, second_rows), a.index_select(0, first_rows))
            for a, b in zip(first, second, strict=True)
        ]
    outs = _empty_rows(first, len(indices))
    first_bad = kernels.gather_either(
        _sources(first, outs),
        _sources(second, outs),
        len(first),
        len(first[0]),
        len(second[0]),
        indices.data_ptr(),
        len(indices),
        _threads(len(indices)),
    )
    if first_bad < len(indices):
        raise IndexError(
            f"index {int(indices[first_bad])} is out of range for tables of {len(first[0])} and {len(second[0])} rows"
        )
    return outs


def gather_references(
    first: Sequence[th.Tensor],
    second: Sequence[th.Tensor],
    rows: th.Tensor,
    references: th.Tensor,
    lag_base: int,
    step: int,
    slot_mask: int,
) -> list[th.Tensor]:
    """
    :func:`gather_either` of the rows that int32 references name (the lean replay layout's next observations): a
    reference ``r >= lag_base`` names row ``rows[i] + (r - lag_base) * step`` of ``first`` (wrapping around its
    end), a smaller one the slot ``r & slot_mask`` of ``second``. The kernel reads the references where they are
    (e.g. a column of gathered rows) and computes the rows itself; the plain path computes them with torch.

    :param first: Tables of the same number of rows
    :param second: Tables of the same widths and dtypes as ``first`` (and of at least one row)
    :param rows: int64 rows of ``first`` the references are relative to, shape ``(n,)``
    :param references: int32 references, shape ``(n,)`` (any stride)
    :param lag_base: Smallest reference to a row of ``first``
    :param step: Rows of ``first`` per unit of a reference
    :param slot_mask: Mask of a slot of ``second`` (its rows are a power of two, at most ``slot_mask + 1``)
    :return: New contiguous tensors of shapes ``(n, first[k].shape[1])``
    :raises IndexError: (on the CPU) if a row is outside its table
    """
    kernels = None
    if _fits_kernels(first, rows) and _fits_kernels(second) and rows.dtype == th.int64 and references.dim() == 1:
        kernels = _kernels() if references.device.type == "cpu" and references.dtype == th.int32 else None
    if kernels is None:
        later = (rows + (references.long() - lag_base) * step) % len(first[0])
        slots = (references & slot_mask).long()
        return gather_either(first, second, th.where(references >= lag_base, later, -1 - slots))
    outs = _empty_rows(first, len(rows))
    first_bad = kernels.gather_references(
        _sources(first, outs),
        _sources(second, outs),
        len(first),
        len(first[0]),
        len(second[0]),
        rows.data_ptr(),
        references.data_ptr(),
        references.stride(0),
        lag_base,
        step,
        slot_mask,
        len(rows),
        _threads(len(rows)),
    )
    if first_bad < len(rows):
        raise IndexError(f"reference {int(references[first_bad])} of row {int(rows[first_bad])} names a row outside its table")
    return outs


def sample_tables(tables: Sequence[th.Tensor], high: int, n: int, offset: int = 0) -> tuple[list[th.Tensor], th.Tensor]:
    """
    ``n`` rows drawn uniformly, with replacement, from the ``high`` rows that start at row ``offset`` of CPU tables
    and wrap around their end (a ring's stored rows), the same rows of every table. The kernel draws the indices
    from a seed taken from NumPy's global RNG (:func:`draw_seed`), so that ``set_random_seed`` makes the draws
    reproducible as in SB3's buffers; without it, NumPy draws them (:func:`numpy_indices`) and
    :func:`gather_tables` gathers them.

    :param tables: Tables of the same number of rows, on the CPU
    :param high: Number of rows to draw from, in ``[1, len(tables[0])]``
    :param n: Number of rows to draw
    :param offset: First of the rows to draw from, in ``[0, len(tables[0]))``
    :return: New tensors of shapes ``(n, table.shape[1])``, and the int64 rows drawn
    """
    n_rows = len(tables[0])
    if not 1 <= high <= n_rows:
        raise ValueError(f"high must be in [1, {n_rows}] (the table's rows), got high={high}")
    if not 0 <= offset < n_rows:
        raise ValueError(f"offset must be in [0, {n_rows}) (the table's rows), got offset={offset}")
    kernels = _kernels() if _fits_kernels(tables) else None
    if kernels is None:
        indices = numpy_indices(high, n)
        indices = (indices.long() + offset) % n_rows if offset else indices.long()
        return gather_tables(tables, indices), indices
    outs, rows = _empty_rows(tables, n), th.empty(n, dtype=th.int64)
    kernels.sample_rows(
        _sources(tables, outs), len(tables), n_rows, offset, high, draw_seed(), n, rows.data_ptr(), _threads(n)
    )
    return outs, rows


def sample_rows(table: th.Tensor, high: int, n: int) -> th.Tensor:
    """
    ``n`` rows drawn uniformly, with replacement, from the first ``high`` rows of a CPU table (see :func:`sample_tables`).

    :param table: Table of rows, on the CPU
    :param high: Number of rows to draw from, in ``[1, len(table)]``
    :param n: Number of rows to draw
    :return: A new tensor of shape ``(n, table.shape[1])``
    """
    return sample_tables([table], high, n)[0][0]
