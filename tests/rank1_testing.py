"""Helpers shared by the top-level tests (a module of its own: `conftest` names collide across folders)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_rank1(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `rank1` CLI in a child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "rank1.cli", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
