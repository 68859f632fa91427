"""Model loading and the rank-1 adapter: counts, freezing, and clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from rank1.core.config import AdapterConfig, ModelConfig
from rank1.core.model import (
    ModelError,
    attach_adapter,
    count_adapters,
    count_adapters_from_config,
    load_base,
    resolve_model_path,
    target_linears,
)
from rank1_testing import run_rank1


def test_smollm2_has_210_adapters_and_in_plus_out_parameters(model_path):
    base = load_base(model_path, ModelConfig(), torch.float32)
    cfg = AdapterConfig()
    expected_params = sum(m.in_features + m.out_features for _, m in target_linears(base, cfg.target_modules))
    count = count_adapters(base, cfg)
    assert (count.adapters, count.layers) == (210, 30) and set(count.per_module.values()) == {30}
    peft_model = attach_adapter(base, cfg, "smollm2")
    trainable, total = peft_model.get_nb_trainable_parameters()
    assert trainable == expected_params == count.parameters
    assert all(("lora_" in n) == p.requires_grad for n, p in peft_model.named_parameters())
    lora = peft_model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.use_rslora, lora.lora_dropout) == (1, 16, True, 0.0)
    # rsLoRA scaling alpha / sqrt(r) = 16 on every adapter.
    from peft.tuners.lora import LoraLayer

    scalings = {m.scaling["default"] for m in peft_model.modules() if isinstance(m, LoraLayer)}
    assert scalings == {16.0}
    assert count_adapters_from_config(model_path, cfg).parameters == count.parameters


@pytest.mark.slow
def test_qwen_32b_counts_from_config_alone():
    result = run_rank1("adapters", "--model", "Qwen/Qwen2.5-32B-Instruct")
    assert result.returncode == 0, result.stderr
    assert "448 rank-1 adapters" in result.stdout and "8,388,608 trainable parameters" in result.stdout


def test_model_without_target_modules(tmp_path):
    from transformers import GPTNeoXConfig

    folder = tmp_path / "neox"
    GPTNeoXConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=100).save_pretrained(folder)
    with pytest.raises(ModelError, match=r"has no linear layer named \['q_proj'.*its linear layers are: .*query_key_value"):
        count_adapters_from_config(str(folder), AdapterConfig())


def test_unreadable_model_paths(tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "missing")))
    with pytest.raises(ModelError, match="no config.json"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path)))
    with pytest.raises(ModelError, match="no such GGUF file"):
        resolve_model_path(ModelConfig(name_or_path=str(tmp_path / "m.gguf")))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelError, match="cannot load"):
        load_base(str(tmp_path), ModelConfig(name_or_path=str(tmp_path)), torch.float32)


def test_embedded_model_converts_once_to_a_plain_folder(model_path):
    config = json.loads((__import__("pathlib").Path(model_path) / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    assert resolve_model_path(ModelConfig()) == model_path  # cached
