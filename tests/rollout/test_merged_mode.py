"""rollout.adapter_mode merged: the engines rebuild W0 + s·baᵀ from the adapter vectors and the base's
checkpoint each sync; they serve what LoRA mode and the learner compute, and do not drift."""

from __future__ import annotations

import os

import pytest
import torch

from rank1.rollout.engine import AdapterReceipt, SamplingSpec, adapter_digest
from rank1.rollout.sync import AdapterSyncError, check_receipts

from .conftest import max_diff

ATOL = 1e-3


def rss_mb(pid: int) -> float:
    """Anonymous resident memory: the base's checkpoint is memory-mapped (page cache, shared), not held."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon")) / 1024


@pytest.fixture(scope="module")
def hf_merged(model_path):
    from rank1.rollout.hf_engine import HFEngine

    return HFEngine(model_path, batch_size=4, adapter_mode="merged")


@pytest.mark.slow
def test_hf_merged_equals_the_learner_and_does_not_drift(hf_merged, learner, model_path):
    from rank1.rollout.hf_engine import HFEngine

    probe = hf_merged.probe_token_ids()
    rss_start = None
    for version in range(1, 51):  # 50 version changes, each rebuilt from W0
        learner.randomize(seed=100 + version)
        tensors, config = learner.adapter()
        receipt = hf_merged.load_adapter(tensors, config, version)
        if version == 1:
            rss_start = rss_mb(os.getpid())
        if version % 10 == 0:
            check_receipts([receipt], version, adapter_digest(tensors), learner.logprobs(probe), ATOL)
    # Memory: no copy of the weights (W0 is read from the checkpoint); 50 syncs add nothing that stays.
    assert rss_mb(os.getpid()) - rss_start < 64
    # After 50 versions the weights are bit-identical to an engine that loaded the last one once.
    fresh = HFEngine(model_path, batch_size=4, adapter_mode="merged")
    fresh.load_adapter(tensors, config, 1)
    for (name, a), (_, b) in zip(hf_merged.base.state_dict().items(), fresh.base.state_dict().items()):
        assert torch.equal(a, b), name
    # ... and completions carry the learner's logprobs of the merged adapter.
    prompt = learner.chat_prompt("Name a colour.")
    for c in hf_merged.generate([prompt], SamplingSpec(n=2, max_new_tokens=8, seed=0)):
        assert max_diff(c.logprobs, learner.logprobs(prompt + c.token_ids)[len(prompt) - 1 :]) < ATOL


def test_a_stale_merged_engine_fails_its_proof(hf_merged, learner):
    probe = hf_merged.probe_token_ids()
    learner.randomize(seed=7)
    v1, config = learner.adapter()
    r1 = hf_merged.load_adapter(v1, config, 1)
    expected_v1 = learner.logprobs(probe)
    noise = check_receipts([r1], 1, adapter_digest(v1), expected_v1, ATOL)
    learner.randomize(seed=8)
    v2, _ = learner.adapter()
    expected_v2 = learner.logprobs(probe)
    stale = AdapterReceipt(2, adapter_digest(v2), r1.probe_logprobs)  # got version 2's bytes, kept version 1's weights
    with pytest.raises(AdapterSyncError):
        check_receipts([stale], 2, adapter_digest(v2), expected_v2, ATOL, previous_probe=expected_v1, noise=noise)


def test_bf16_merged_rebuilds_from_w0_without_drift(model_path, learner):
    """In bf16, adding deltas onto rounded weights would drift; rebuilding from W0 rounds once."""
    from rank1.rollout.hf_engine import HFEngine

    engine = HFEngine(model_path, dtype="bfloat16", batch_size=4, adapter_mode="merged")
    learner.randomize(seed=1)
    first, config = learner.adapter()
    engine.load_adapter(first, config, 1)
    once = {k: v.clone() for k, v in engine.base.state_dict().items()}
    for version in range(2, 12):
        learner.randomize(seed=version)
        engine.load_adapter(learner.adapter()[0], config, version)
    engine.load_adapter(first, config, 12)
    assert all(torch.equal(v, once[k]) for k, v in engine.base.state_dict().items())


@pytest.mark.slow
def test_vllm_merged_serves_like_lora_and_the_learner(model_path, learner, ray_session):
    from rank1.core.config import RolloutConfig
    from rank1.rollout.actors import EngineGroup

    merged = EngineGroup.from_config(RolloutConfig(backend="vllm", max_model_len=512, adapter_mode="merged"), model_path)
    try:
        pid = merged.pids()[0]
        from rank1.rollout.engine import probe_token_ids

        ids = probe_token_ids(learner.tokenizer)
        prompts = [learner.chat_prompt("Count to five."), learner.chat_prompt("Name a river.")]
        for version in range(1, 51):
            learner.randomize(seed=200 + version)
            tensors, config = learner.adapter()
            merged.push_adapter(tensors, config, version, expected_probe=learner.logprobs(ids), atol=ATOL)
            if version == 10:  # each reload hands its freed heap back (release_freed_memory); after 10, nothing may pile up
                rss_start = rss_mb(pid)
        rss_end = rss_mb(pid)  # measured at the same point of a sync as rss_start: after a reload, before any generation
        for c in merged.generate(prompts, SamplingSpec(n=2, max_new_tokens=8, temperature=0.7, seed=0)):
            sequence = prompts[c.prompt_index] + c.token_ids
            assert max_diff(c.logprobs, learner.logprobs(sequence, temperature=0.7)[len(prompts[c.prompt_index]) - 1 :]) < ATOL
        assert merged.noise < ATOL  # the engine's probe distance from the learner at the last of 50 syncs
        assert rss_end - rss_start < 64, (rss_start, rss_end)  # no copy of the weights kept; 40 more reloads leave nothing behind
    finally:
        merged.shutdown()


def test_merged_mode_finds_a_hub_bases_weights_in_the_hf_cache(model_path, tmp_path):
    """A base named by Hub id (the 32B recipes) is read from the Hugging Face cache that the engine's own load
    filled, at the configured revision; a repo that is neither cached nor reachable is a clear error."""
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-base"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "v1").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "model.safetensors").symlink_to(os.path.join(model_path, "model.safetensors"))
    script = (
        "import torch, sys\n"
        "from safetensors import safe_open\n"
        "from rank1.rollout.merge import BaseWeights, checkpoint_folder\n"
        f"folder = checkpoint_folder('acme/tiny-base', revision='v1')\n"
        f"assert str(folder).endswith('{commit}'), folder\n"
        "name = 'model.layers.0.self_attn.q_proj.weight'\n"
        f"with safe_open('{model_path}/model.safetensors', 'pt') as f: ref = f.get_tensor(name)\n"
        "assert torch.equal(BaseWeights('acme/tiny-base', 'v1').get(name), ref)\n"
        "try:\n    BaseWeights('acme/not-cached')\nexcept FileNotFoundError as e:\n    print('ERR', e)\n"
    )
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ERR acme/not-cached: cannot find its safetensors" in result.stdout and "rollout.adapter_mode lora" in result.stdout
