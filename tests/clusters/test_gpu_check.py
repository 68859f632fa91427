"""scripts/gpu_check.sh, the check prepared for a GPU machine, runs its whole logic on CPU with a 2-layer model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from rank1_testing import REPO


@pytest.mark.slow
def test_gpu_check_logic_runs_on_cpu(model_path):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("RAY_ADDRESS", None)
    prepared = subprocess.run([sys.executable, "scripts/gpu_check.py", "--prepare"], cwd=REPO, env=env, capture_output=True, text=True)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    result = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--tiny", "--steps", "3"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    table = [line for line in result.stdout.splitlines() if line.startswith("| ") and "check" not in line]
    assert len(table) == 8 and all("| pass" in line or "| skipped" in line for line in table), "\n".join(table)
    assert "stale engine caught" in result.stdout
