"""Shared fixtures for the reward tests: the shared data folder, one guarded grader, one Ray session."""

from pathlib import Path

import pytest
import ray

from rank1.core.config import RewardsConfig
from rank1.rewards.guard import GuardedGrader

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA / "math500" / "test.jsonl").exists() or not (DATA / "gsm8k" / "test.jsonl").exists():
        pytest.skip(f"shared data not found at {DATA} (needs math500/test.jsonl and gsm8k/test.jsonl)")
    return DATA


@pytest.fixture(scope="session")
def grader():
    with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=2.0)) as g:
        yield g


@pytest.fixture(scope="module")
def ray_session():
    """A local Ray started by the test (as a trainer would); actors can import tests/rewards/user_rewards."""
    ray.shutdown()  # one Ray per module: another folder's tests may have left theirs running
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(HERE)}})
    yield
    ray.shutdown()
