"""The package type-checks with mypy (configured in pyproject.toml, as SB3 checks itself)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_mypy_finds_no_errors(tmp_path):
    command = [sys.executable, "-m", "mypy", "sb3_fasttd3", "--cache-dir", str(tmp_path)]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
