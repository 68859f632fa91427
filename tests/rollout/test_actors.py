"""Engine actors under Ray: prompts balanced over engines, a killed engine restarted and its batch retried.

Uses the transformers backend (same actor code as vLLM) because a restarted vLLM actor pays vLLM's
start-up again; the vLLM actor path itself is exercised in test_vllm_engine.py.
"""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from rank1.core.config import RolloutConfig
from rank1.rollout.actors import EngineGroup, split_evenly
from rank1.rollout.engine import SamplingSpec

from .conftest import max_diff

ATOL = 1e-3


def test_split_evenly():
    assert split_evenly(7, 3) == [range(0, 3), range(3, 5), range(5, 7)]
    assert split_evenly(1, 3) == [range(0, 1)]
    assert split_evenly(0, 2) == []


@pytest.mark.slow
def test_each_engines_share_is_handed_over_as_it_comes_back(model_path, learner, ray_session):
    """on_shard gets every engine's completions, already in prompt numbering, before generate returns: the
    GRPO driver grades one engine's share while the others still generate."""
    group = EngineGroup.from_config(RolloutConfig(backend="transformers", num_engines=2), model_path)
    try:
        prompts = [learner.chat_prompt(f"Name the number {i}.") for i in range(5)]
        seen: dict[int, list[int]] = {}
        out = group.generate(prompts, SamplingSpec(n=2, max_new_tokens=4, seed=0),
                             on_shard=lambda i, shard: seen.__setitem__(i, [c.prompt_index for c in shard]))
        assert seen == {0: [0, 0, 1, 1, 2, 2], 1: [3, 3, 4, 4]}
        assert [c.prompt_index for c in out] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    finally:
        group.shutdown()


@pytest.mark.slow
def test_killed_engine_is_restarted_and_its_batch_retried(model_path, learner, ray_session):
    cfg = RolloutConfig(backend="transformers", num_engines=2, max_restarts=1)
    group = EngineGroup.from_config(cfg, model_path)
    try:
        learner.randomize(seed=21)
        tensors, config = learner.adapter()
        group.push_adapter(tensors, config, 1, expected_probe=None, atol=ATOL)
        assert group.versions() == [1, 1]
        pids = group.pids()

        prompts = [learner.chat_prompt(f"Write a short story about the number {i}.") for i in range(8)]
        spec = SamplingSpec(max_new_tokens=40, temperature=1.0, seed=0)
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=group.generate(prompts, spec)))
        worker.start()
        time.sleep(3.0)  # both engines are inside generate() now
        assert worker.is_alive(), "the batch finished before the kill; make it longer"
        os.kill(pids[1], signal.SIGKILL)
        worker.join(timeout=600)
        assert not worker.is_alive()

        completions = result["out"]
        assert sorted(c.prompt_index for c in completions) == list(range(8))
        assert group.restarts_seen == 1
        new_pids = group.pids()
        assert new_pids[0] == pids[0] and new_pids[1] != pids[1]
        assert group.versions() == [1, 1]  # the restarted engine got the latest adapter back
        # ... before it re-ran the batch: its completions carry the adapter's logprobs, not the base model's.
        for c in completions[4:]:
            full = learner.logprobs(prompts[c.prompt_index] + c.token_ids)
            assert max_diff(c.logprobs, full[len(prompts[c.prompt_index]) - 1 :]) < ATOL
    finally:
        group.shutdown()


@pytest.mark.slow
def test_engine_that_cannot_restart_gives_a_clear_error(model_path, ray_session):
    group = EngineGroup("transformers", model_path, num_engines=1, max_restarts=0)
    try:
        pid = group.pids()[0]
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(RuntimeError, match="rollout engine 0 died and cannot be restarted"):
            group.generate([[1, 2, 3]], SamplingSpec(max_new_tokens=2))
    finally:
        group.shutdown()


def test_unknown_backend_is_named(model_path, ray_session):
    with pytest.raises(ValueError, match="rollout.backend: 'tgi'"):
        from rank1.rollout.actors import make_engine

        make_engine("tgi", model_path)


@pytest.mark.slow
def test_blocked_engine_is_detected_restarted_and_its_batch_retried(model_path, learner, ray_session):
    # SIGSTOP: alive but not answering. Past rollout.timeout_s the group kills it; Ray restarts it, the
    # latest adapter is reloaded (and proven) and the shard it held runs again: no completion is lost.
    cfg = RolloutConfig(backend="transformers", num_engines=2, max_restarts=1, timeout_s=20.0)
    group = EngineGroup.from_config(cfg, model_path)
    try:
        learner.randomize(seed=23)
        tensors, config = learner.adapter()
        group.push_adapter(tensors, config, 1, expected_probe=None, atol=ATOL)
        pids = group.pids()
        prompts = [learner.chat_prompt(f"Write a short story about the number {i}.") for i in range(8)]
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(out=group.generate(prompts, SamplingSpec(max_new_tokens=40, seed=0))))
        worker.start()
        time.sleep(3.0)
        assert worker.is_alive(), "the batch finished before the engine was stopped; make it longer"
        os.kill(pids[0], signal.SIGSTOP)
        worker.join(timeout=600)
        assert not worker.is_alive()
        assert sorted(c.prompt_index for c in result["out"]) == list(range(8))
        assert group.restarts_seen == 1 and group.pids()[0] != pids[0] and group.versions() == [1, 1]
        for c in result["out"][:4]:  # the retried shard: sampled from the adapter, not the base model
            full = learner.logprobs(prompts[c.prompt_index] + c.token_ids)
            assert max_diff(c.logprobs, full[len(prompts[c.prompt_index]) - 1 :]) < ATOL
    finally:
        group.shutdown()
