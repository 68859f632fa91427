"""The transformers backend on the real SmolLM2-135M with a real PEFT adapter, in this process."""

from __future__ import annotations

import pytest
import torch

from rank1.rollout.engine import AdapterError, EngineError, SamplingSpec
from rank1.rollout.sync import AdapterSyncError, check_receipts
from rank1.core.logprobs import sequence_logprobs
from rank1.rollout.engine import adapter_digest

from .conftest import max_diff, run_sync_scenario

ATOL = 1e-3


@pytest.fixture(scope="module")
def engine(model_path):
    from rank1.rollout.hf_engine import HFEngine

    return HFEngine(model_path, batch_size=4)


def test_serves_base_model_before_any_adapter(engine):
    assert engine.version() == -1


def test_live_sync_matches_learner(engine, learner):
    def push(tensors, config, version, expected_probe):
        receipt = engine.load_adapter(tensors, config, version)
        check_receipts([receipt], version, adapter_digest(tensors), expected_probe, ATOL)
        assert engine.version() == version

    run_sync_scenario(push, engine.generate, engine.score, learner, engine.probe_token_ids(), ATOL)


def test_receipt_of_a_stale_engine_is_rejected(engine, learner):
    learner.randomize(seed=11)
    old_tensors, config = learner.adapter()
    engine.load_adapter(old_tensors, config, 10)
    learner.randomize(seed=12)
    new_tensors, _ = learner.adapter()
    expected_new = learner.logprobs(engine.probe_token_ids())
    # An engine that acknowledged version 11 but kept the old weights reports the old probe.
    stale = engine.load_adapter(old_tensors, config, 11)
    assert max_diff(sequence_logprobs(learner.model, engine.probe_token_ids()), expected_new) < 1e-6  # the learner-side helper
    with pytest.raises(AdapterSyncError, match="engine 0: probe logprobs differ from the learner's"):
        check_receipts([stale], 11, stale.digest, expected_new, ATOL)
    with pytest.raises(AdapterSyncError, match="differ from the sender's"):
        check_receipts([stale], 11, adapter_digest(new_tensors), None, ATOL)


@pytest.mark.slow
def test_batched_generation_left_padding(engine, learner):
    learner.randomize(seed=5)
    tensors, config = learner.adapter()
    engine.load_adapter(tensors, config, 20)
    prompts = [learner.chat_prompt("Say hi."), learner.chat_prompt("What is the capital of France? Answer in one long sentence.")]
    completions = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=0.8, top_p=0.9, seed=0))
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1]
    for c in completions:
        assert c.finish_reason in ("stop", "length") and len(c.logprobs) == len(c.token_ids) > 0
        assert (c.finish_reason == "length") == (len(c.token_ids) == 8 and c.token_ids[-1] not in engine.eos_ids)
        # The short prompt was left-padded in the batch; its logprobs still match an unpadded forward, under the
        # distribution sampled from (temperature 0.8, top-p 0.9), not the raw one.
        full = learner.logprobs(prompts[c.prompt_index] + c.token_ids, temperature=0.8, top_p=0.9)
        raw = learner.logprobs(prompts[c.prompt_index] + c.token_ids)
        assert max_diff(c.logprobs, raw[len(prompts[c.prompt_index]) - 1 :]) > 0.05
        assert max_diff(c.logprobs, full[len(prompts[c.prompt_index]) - 1 :]) < ATOL
    greedy = engine.generate(prompts[:1], SamplingSpec(max_new_tokens=6, temperature=0.0))
    assert greedy[0].token_ids == engine.generate(prompts[:1], SamplingSpec(max_new_tokens=6, temperature=0.0))[0].token_ids


def test_bad_prompts_and_sampling_get_clear_errors(engine):
    with pytest.raises(EngineError, match="prompt 1: token ids \\[999999\\] are outside the vocabulary"):
        engine.generate([[1, 2], [999999]], SamplingSpec(max_new_tokens=2))
    with pytest.raises(EngineError, match="prompt 0: expected a list of at least 1"):
        engine.generate([[]], SamplingSpec(max_new_tokens=2))
    with pytest.raises(EngineError, match="sequence 0: expected a list of at least 2"):
        engine.score([[5]])
    with pytest.raises(EngineError, match="sampling.top_p"):
        SamplingSpec(top_p=0.0)
    with pytest.raises(EngineError, match="sampling.n"):
        SamplingSpec(n=0)
    assert engine.generate([], SamplingSpec()) == []


def test_bad_adapter_is_rejected_and_old_version_kept(engine, learner):
    learner.randomize(seed=7)
    tensors, config = learner.adapter()
    engine.load_adapter(tensors, config, 30)
    probe = engine.probe_token_ids()
    before = engine.score([probe])[0]
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    cases = {
        "not a LoRA weight of a targeted linear": {**tensors, "base_model.model.model.layers.99.self_attn.q_proj.lora_A.weight": torch.zeros(1, 576)},
        "shape": {**tensors, key: torch.zeros(1, 7)},
        "NaN": {**tensors, key: torch.full((1, 576), float("nan"))},
        "missing": {k: v for k, v in tensors.items() if k != key},
    }
    for message, bad in cases.items():
        with pytest.raises(AdapterError, match=message):
            engine.load_adapter(bad, config, 31)
    with pytest.raises(AdapterError, match="r.*not a rank this engine serves"):
        engine.load_adapter(tensors, {**config, "r": 4}, 31)
    with pytest.raises(AdapterError, match="peft_config: missing"):
        engine.load_adapter(tensors, {"r": 1}, 31)
    with pytest.raises(AdapterError, match="version"):
        engine.load_adapter(tensors, config, -3)
    assert engine.version() == 30
    assert max_diff(engine.score([probe])[0], before) == 0.0
