from collections.abc import Iterator

import pytest
import torch as th

# Two cores: keep intra-op threads bounded so that tests behave the same everywhere
th.set_num_threads(2)


@pytest.fixture(scope="session", autouse=True)
def _run_folders_under_pytest_tmp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The folders SB3's default logger (every ``learn()`` without ``tensorboard_log``) and torchrun make in the
    system's temporary folder go under pytest's temporary tree instead, which pytest prunes: a run leaves none."""
    base = tmp_path_factory.getbasetemp()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SB3_LOGDIR", str(base / "sb3_logger"))
        patch.setenv("PET_LOG_DIR", str(base / "torchrun_logs"))  # torchrun's --log-dir
        yield
