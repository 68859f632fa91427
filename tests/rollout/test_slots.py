"""Engines serving several adapters at once (a GRPO sweep's runs, one slot each): every completion comes
from its own prompt's adapter, and each slot proves what it serves."""

from __future__ import annotations

import pytest

from rank1.rollout.engine import EngineError, SamplingSpec, adapter_digest
from rank1.rollout.sync import check_receipts

from .conftest import max_diff

ATOL = 1e-3


def check_each_answer_comes_from_its_own_adapter(load, generate, score, learner):
    adapters, expected = [], []
    for slot, seed in enumerate((41, 42)):
        learner.randomize(seed=seed)
        tensors, config = learner.adapter()
        receipt = load(tensors, config, 1, slot)
        probe = learner.logprobs(learner.tokenizer.encode("Question: what is 12 + 30? Answer: 12 + 30 = 42.", add_special_tokens=False))
        check_receipts([receipt], 1, adapter_digest(tensors), probe, ATOL)  # each slot proves its own adapter
        adapters.append((tensors, config))
        expected.append({k: v.clone() for k, v in learner.model.state_dict().items()})
    prompts = [learner.chat_prompt(t) for t in ("Name a colour.", "Count to three.", "Say hello.", "Name a river.")]
    slots = [0, 1, 1, 0]
    completions = generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=1.0, seed=0), slots)
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2, 3, 3]
    for c in completions:
        sequence = prompts[c.prompt_index] + c.token_ids
        own, other = slots[c.prompt_index], 1 - slots[c.prompt_index]
        learner.model.load_state_dict(expected[own])
        mine = learner.logprobs(sequence)[len(prompts[c.prompt_index]) - 1 :]
        learner.model.load_state_dict(expected[other])
        theirs = learner.logprobs(sequence)[len(prompts[c.prompt_index]) - 1 :]
        assert max_diff(c.logprobs, mine) < ATOL and max_diff(c.logprobs, theirs) > 10 * ATOL


@pytest.mark.slow
def test_transformers_engine_serves_two_adapters(model_path, learner):
    from rank1.rollout.hf_engine import HFEngine

    engine = HFEngine(model_path, batch_size=4, max_adapters=2)
    check_each_answer_comes_from_its_own_adapter(engine.load_adapter, engine.generate, engine.score, learner)
    assert engine.version(0) == engine.version(1) == 1
    # With a seed per slot (a sweep's runs), each slot's prompts sample as they would alone with that seed.
    prompts, slots = [learner.chat_prompt(t) for t in ("Name a colour.", "Count to three.", "Say hello.")], [0, 1, 0]
    together = engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, seed=0, slot_seeds=(11, 12)), slots)
    for slot, seed in ((0, 11), (1, 12)):
        mine = [i for i, s in enumerate(slots) if s == slot]
        alone = engine.generate([prompts[i] for i in mine], SamplingSpec(n=2, max_new_tokens=8, seed=seed), [slot] * len(mine))
        assert [c.token_ids for c in together if c.prompt_index in mine] == [c.token_ids for c in alone]
    assert together != engine.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, seed=0), slots)  # the seeds mattered
    with pytest.raises(EngineError, match="slots: expected one slot in 0..1"):
        engine.generate([[1, 2, 3]], SamplingSpec(max_new_tokens=2), slots=[2])
    with pytest.raises(EngineError, match="merged serves one adapter"):
        HFEngine(model_path, adapter_mode="merged", max_adapters=2)


@pytest.mark.slow
def test_vllm_engine_serves_two_adapters_in_one_batch(model_path, learner, ray_session):
    import ray

    from rank1.core.config import RolloutConfig
    from rank1.rollout.actors import EngineGroup

    group = EngineGroup.from_config(RolloutConfig(backend="vllm", max_model_len=512, adapter_mode="lora", max_adapters=2), model_path)
    try:
        def load(tensors, config, version, slot):
            return group.push_adapter(tensors, config, version, slot=slot)[0]

        def score(sequences, slot):
            return ray.get(group.actors[0].score.remote(sequences, slot))

        check_each_answer_comes_from_its_own_adapter(load, group.generate, score, learner)
        assert group.versions(0) == group.versions(1) == [1]
    finally:
        group.shutdown()
