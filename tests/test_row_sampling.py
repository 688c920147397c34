"""
Tests for the sampling kernels (``sb3_fasttd3.common.row_sampling``): the rows ``index_select`` gives for the
same indices (one table or several, any dtype, rows in one of two tables), indices uniform over the rows asked
for, and the plain path where the kernels are missing.
"""

import shutil
import sys
import tempfile

import numpy as np
import pytest
import torch as th
from gymnasium import spaces
from stable_baselines3.common.utils import set_random_seed

from sb3_fasttd3.common import row_sampling
from sb3_fasttd3.common.buffers import DeviceNStepReplayBuffer
from sb3_fasttd3.common.row_sampling import (
    draw_seed,
    gather_either,
    gather_references,
    gather_rows,
    gather_tables,
    kernel_indices,
    numpy_indices,
    sample_rows,
    sample_tables,
)

has_compiler = sys.platform.startswith("linux") and shutil.which("cc") is not None
needs_kernels = pytest.mark.skipif(not has_compiler, reason="needs Linux and a C compiler")


@pytest.fixture
def rebuild(monkeypatch: pytest.MonkeyPatch):
    """Build the kernels again under the test's environment variables, and forget that build afterwards."""
    row_sampling._kernels.cache_clear()
    yield monkeypatch
    row_sampling._kernels.cache_clear()


@needs_kernels
def test_kernels_build_where_there_is_a_compiler() -> None:
    assert row_sampling._kernels() is not None


# Batches below and above the size that brings in a second thread, and rows narrower than a cache line
@pytest.mark.parametrize("n_rows, width, batch", [(1000, 43, 5000), (37, 1, 100), (10_000, 17, 3), (500, 100, 0)])
@pytest.mark.parametrize("index_dtype", [th.int32, th.int64])
def test_gather_gives_the_rows_of_index_select(n_rows: int, width: int, batch: int, index_dtype: th.dtype) -> None:
    generator = th.Generator().manual_seed(batch)
    table = th.randn(n_rows, width, generator=generator)
    # Repeated indices, and both ends of the table
    indices = th.randint(0, n_rows, (batch,), generator=generator, dtype=index_dtype)
    if batch >= 2:
        indices[:2] = th.tensor([0, n_rows - 1])
    gathered = gather_rows(table, indices)
    assert gathered.shape == (batch, width) and gathered.dtype == th.float32
    assert th.equal(gathered, table.index_select(0, indices))


@pytest.mark.parametrize("bad", [-1, 1000, 2**31 - 1])
@pytest.mark.parametrize("index_dtype", [th.int32, th.int64])
def test_gather_rejects_an_index_out_of_range(bad: int, index_dtype: th.dtype) -> None:
    indices = th.zeros(6000, dtype=index_dtype)
    indices[4321] = bad
    with pytest.raises(IndexError, match=f"index {bad} is out of range for a table of 1000 rows"):
        gather_rows(th.randn(1000, 8), indices)


def test_other_layouts_and_dtypes_give_the_rows_of_index_select() -> None:
    # Column-major and strided columns go through index_select; other dtypes and column ranges through the kernel
    table, indices = th.randn(50, 6), th.tensor([3, 1, 4, 1, 5])
    for other in (table.t().contiguous().t(), table.double(), table[:, ::2], table[:, 2:5], (table * 9).to(th.uint8)):
        assert th.equal(gather_rows(other, indices), other.index_select(0, indices))
        assert sample_rows(other, 50, 7).shape == (7, other.shape[1])
    assert th.equal(gather_rows(table, indices[::2]), table.index_select(0, indices[::2]))


def several_tables(n_rows: int, generator: th.Generator) -> list[th.Tensor]:
    """A float32 table, uint8 rows of another width, and a column range of a wider table (rows not packed)."""
    wide = th.randn(n_rows, 30, generator=generator)
    return [
        th.randn(n_rows, 17, generator=generator),
        th.randint(0, 256, (n_rows, 75), generator=generator, dtype=th.uint8),
        wide[:, 3:20],
    ]


@pytest.mark.parametrize("batch", [3, 5000])
@pytest.mark.parametrize("index_dtype", [th.int32, th.int64])
def test_gather_tables_gives_the_rows_of_index_select(batch: int, index_dtype: th.dtype) -> None:
    generator = th.Generator().manual_seed(batch)
    tables = several_tables(1000, generator)
    indices = th.randint(0, 1000, (batch,), generator=generator, dtype=index_dtype)
    for gathered, table in zip(gather_tables(tables, indices), tables, strict=True):
        assert gathered.dtype == table.dtype and gathered.is_contiguous()
        assert th.equal(gathered, table.index_select(0, indices))
    with pytest.raises(IndexError, match="index 1000 is out of range"):
        gather_tables(tables, th.tensor([0, 1000, 2]))


@pytest.mark.parametrize("batch", [7, 5000])
def test_gather_either_takes_each_row_from_its_table(rebuild: pytest.MonkeyPatch, batch: int) -> None:
    generator = th.Generator().manual_seed(batch)
    first, second = several_tables(1000, generator), several_tables(40, generator)
    second[2] = second[2].contiguous()  # same widths and dtypes, rows laid out otherwise
    indices = th.randint(-40, 1000, (batch,), generator=generator)
    indices[:2] = th.tensor([-1, -40])
    expected = [
        th.stack([a[i] if i >= 0 else b[-i - 1] for i in indices.tolist()]) for a, b in zip(first, second, strict=True)
    ]
    for gathered, rows in zip(gather_either(first, second, indices), expected, strict=True):
        assert th.equal(gathered, rows)
    if has_compiler:
        for bad in (1000, -41):
            with pytest.raises(IndexError, match=f"index {bad} is out of range"):
                gather_either(first, second, th.tensor([0, bad]))
    # The plain path (where and two index_select) gives the same rows
    rebuild.setenv("SB3_FASTTD3_NATIVE_SAMPLING", "0")
    row_sampling._kernels.cache_clear()
    for gathered, rows in zip(gather_either(first, second, indices), expected, strict=True):
        assert th.equal(gathered, rows)


@pytest.mark.parametrize("batch", [7, 5000])
def test_gather_references_takes_the_rows_the_references_name(rebuild: pytest.MonkeyPatch, batch: int) -> None:
    # References as the lean replay layout stores them, read from a column of wider int32 rows
    generator = th.Generator().manual_seed(batch)
    first, second = several_tables(1000, generator), several_tables(64, generator)
    second[2] = second[2].contiguous()
    lag_base, step = 1 << 30, 4
    rows = th.randint(0, 1000, (batch,), generator=generator)
    lags = th.randint(1, 4, (batch,), generator=generator)
    numbers = th.randint(0, 1 << 20, (batch,), generator=generator)
    to_second = th.rand(batch, generator=generator) < 0.4
    packed = th.randint(0, 100, (batch, 5), generator=generator, dtype=th.int32)
    packed[:, 3] = th.where(to_second, numbers, lag_base + lags).int()
    references = packed[:, 3]
    indices = th.where(to_second, -1 - (numbers & 63), (rows + lags * step) % 1000)
    expected = gather_either(first, second, indices)
    for gathered, rows_expected in zip(
        gather_references(first, second, rows, references, lag_base, step, 63), expected, strict=True
    ):
        assert th.equal(gathered, rows_expected)
    if has_compiler and batch > 7:
        with pytest.raises(IndexError, match="names a row outside its table"):
            gather_references(first, second, rows, references, lag_base, step, 127)  # slots beyond the 64 rows
    rebuild.setenv("SB3_FASTTD3_NATIVE_SAMPLING", "0")
    row_sampling._kernels.cache_clear()
    for gathered, rows_expected in zip(
        gather_references(first, second, rows, references, lag_base, step, 63), expected, strict=True
    ):
        assert th.equal(gathered, rows_expected)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("high, offset", [(1000, 0), (600, 700), (1, 999), (300, 0)])
def test_sample_tables_draws_from_the_rows_after_offset(
    rebuild: pytest.MonkeyPatch, native: bool, high: int, offset: int
) -> None:
    if native and not has_compiler:
        pytest.skip("needs Linux and a C compiler")
    rebuild.setenv("SB3_FASTTD3_NATIVE_SAMPLING", "1" if native else "0")
    tables = several_tables(1000, th.Generator().manual_seed(0))
    np.random.seed(high)
    rows, indices = sample_tables(tables, high, 5000, offset)
    assert indices.dtype == th.int64 and indices.shape == (5000,)
    # The rows offset to offset + high - 1, wrapping around the end of the tables: every one of them when high is small
    assert th.equal(th.unique((indices - offset) % 1000), th.arange(high)) or high > 300
    assert int(((indices - offset) % 1000).max()) < high
    for gathered, table in zip(rows, tables, strict=True):
        assert th.equal(gathered, table.index_select(0, indices))
    if native:
        np.random.seed(high)
        assert th.equal(indices, (kernel_indices(draw_seed(), high, 5000) + offset) % 1000)
    with pytest.raises(ValueError, match=r"offset must be in \[0, 1000\)"):
        sample_tables(tables, high, 5, offset=1000)


@needs_kernels
@pytest.mark.parametrize("high, n", [(1000, 5000), (37, 100), (1, 10), (800, 3)])
def test_sample_gathers_the_indices_its_seed_draws(high: int, n: int) -> None:
    table = th.randn(1000, 43)
    np.random.seed(high)
    sampled = sample_rows(table, high, n)
    np.random.seed(high)
    indices = kernel_indices(draw_seed(), high, n)
    assert int(indices.min()) >= 0 and int(indices.max()) < high
    assert th.equal(sampled, table.index_select(0, indices))


@needs_kernels
@pytest.mark.parametrize("high", [12, 1_000_003, 2**40 + 1])
def test_kernel_indices_are_uniform(high: int) -> None:
    # 120,000 draws in 12 equal bins of [0, high): each bin within 5 standard deviations of 10,000
    indices = kernel_indices(seed=12345, high=high, n=120_000)
    assert int(indices.min()) >= 0 and int(indices.max()) < high
    counts = th.bincount(indices * 12 // high, minlength=12)
    assert len(counts) == 12 and (counts - 10_000).abs().max() < 5 * 95, counts
    # Consecutive indices are not correlated
    pairs = th.bincount((indices[:-1] * 12 // high) * 12 + indices[1:] * 12 // high, minlength=144)
    assert (pairs - 120_000 / 144).abs().max() < 5 * 29, pairs
    # Other seeds, other draws
    assert not th.equal(indices[:100], kernel_indices(seed=12346, high=high, n=100))


def test_numpy_indices_are_int32_while_they_fit() -> None:
    np.random.seed(0)
    indices = numpy_indices(12, 500)
    assert indices.dtype == th.int32 and int(indices.min()) == 0 and int(indices.max()) == 11
    assert numpy_indices(2**31 + 1, 4).dtype == th.int64


def test_sample_rejects_high_outside_the_table() -> None:
    for high in (0, 11):
        with pytest.raises(ValueError, match=r"high must be in \[1, 10\]"):
            sample_rows(th.randn(10, 3), high, 5)


# No compiler, switched off, and no usable temporary directory
@pytest.mark.parametrize("setting", ["CC=/nonexistent/cc", "SB3_FASTTD3_NATIVE_SAMPLING=0", "tempdir=/nonexistent/tmp"])
def test_falls_back_to_numpy_and_index_select_without_the_kernels(rebuild: pytest.MonkeyPatch, setting: str) -> None:
    name, value = setting.split("=")
    if name == "tempdir":
        rebuild.setattr(tempfile, "tempdir", value)
    else:
        rebuild.setenv(name, value)
    assert row_sampling._kernels() is None
    table, indices = th.randn(100, 5), th.tensor([7, 7, 99, 0])
    assert th.equal(gather_rows(table, indices), table.index_select(0, indices))
    np.random.seed(3)
    sampled = sample_rows(table, 60, 1000)
    np.random.seed(3)
    assert th.equal(sampled, table.index_select(0, numpy_indices(60, 1000)))


def fill_buffer(n_envs: int = 3, adds: int = 1000) -> DeviceNStepReplayBuffer:
    buffer = DeviceNStepReplayBuffer(
        n_envs * adds, spaces.Box(-10, 10, (4,), np.float32), spaces.Box(-1, 1, (2,), np.float32), "cpu", n_envs, n_steps=3
    )
    rng = np.random.default_rng(0)
    for _ in range(adds):
        obs = rng.normal(size=(n_envs, 4)).astype(np.float32)
        buffer.add(
            obs, obs + 1, rng.uniform(-1, 1, (n_envs, 2)), rng.normal(size=n_envs), rng.random(n_envs) < 0.05, [{}] * n_envs
        )
    return buffer


@needs_kernels
def test_buffer_samples_the_same_transitions_with_and_without_the_kernels(rebuild: pytest.MonkeyPatch) -> None:
    buffer = fill_buffer()
    set_random_seed(1)
    samples = buffer.sample(5000)
    set_random_seed(1)
    indices = kernel_indices(draw_seed(), buffer.size() * buffer.n_envs, 5000)
    rebuild.setenv("SB3_FASTTD3_NATIVE_SAMPLING", "0")
    row_sampling._kernels.cache_clear()
    plain = buffer._get_samples(indices // buffer.n_envs, env_inds=indices % buffer.n_envs)
    for field, with_kernels, without in zip(samples._fields, samples, plain, strict=True):
        assert th.equal(with_kernels, without), field
