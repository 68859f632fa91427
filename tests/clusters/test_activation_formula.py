"""The planner's activation terms against what autograd really saves, on a small real Qwen2 model.

torch.autograd.graph.saved_tensors_hooks sees every tensor a forward keeps for its backward; summing
their distinct storages (less the weights) gives the activation memory exactly, without a GPU.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, Qwen2Config

from rank1.core.config import AdapterConfig
from rank1.core.model import attach_adapter
from rank1.driver.plan import layer_activation_bytes_per_token, model_shape
from rank1.trainer.sft import SFTObjective

TOKENS = 256
SMALL = dict(hidden_size=256, intermediate_size=1024, num_attention_heads=8, num_key_value_heads=2, vocab_size=4096,
             tie_word_embeddings=False, use_cache=False)


def saved_bytes_per_token(layers: int, dtype: torch.dtype, checkpointing: bool, with_loss: bool = False) -> float:
    torch.manual_seed(0)
    config = Qwen2Config(num_hidden_layers=layers, attn_implementation="sdpa", **SMALL)
    base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    base.requires_grad_(False)
    model = attach_adapter(base, AdapterConfig(), "small-qwen2")  # the paper's 7 rank-1 adapters per layer
    if checkpointing:  # as rank1.model.load_base does
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.enable_input_require_grads()
    # Linear layers save their weight for the backward too; weights are counted elsewhere in the plan.
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    ids = torch.randint(0, SMALL["vocab_size"], (1, TOKENS))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}  # every token a target
        if with_loss:
            SFTObjective(1, 1).loss(model, batch)
        else:
            model(input_ids=ids, attention_mask=batch["attention_mask"])
    return sum(storages.values()) / TOKENS


@pytest.fixture(scope="module")
def shape(tmp_path_factory):
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps({"model_type": "qwen2", "num_hidden_layers": 2, **SMALL}))
    return model_shape(str(path))


def per_layer(dtype: torch.dtype, checkpointing: bool) -> float:
    # The difference between 6 and 2 layers leaves exactly what each extra layer adds.
    return (saved_bytes_per_token(6, dtype, checkpointing) - saved_bytes_per_token(2, dtype, checkpointing)) / 4


def test_shape_of_a_config_json(shape):
    assert (shape.layers, shape.hidden, shape.kv_dim, shape.intermediate, shape.vocab) == (2, 256, 64, 1024, 4096)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_layer_formula_matches_what_autograd_saves(shape, dtype):
    measured = per_layer(dtype, checkpointing=False)
    planned = layer_activation_bytes_per_token(shape, torch.finfo(dtype).bits // 8, AdapterConfig())
    assert planned == pytest.approx(measured, rel=0.05)
    assert planned >= measured * 0.99  # never (much) below what is really kept


def test_checkpointing_keeps_one_hidden_state_per_layer(shape):
    assert per_layer(torch.bfloat16, checkpointing=True) == shape.hidden * 2


def test_loss_keeps_fp32_log_probs_over_the_vocabulary(shape):
    extra = saved_bytes_per_token(2, torch.bfloat16, False, with_loss=True) - saved_bytes_per_token(2, torch.bfloat16, False)
    # The planner's loss peak counts these 4 bytes plus the b-byte logits and two fp32 gradients.
    assert extra == pytest.approx(shape.vocab * 4, rel=0.01)

