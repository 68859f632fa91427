"""Shared fixtures: a tiny random Llama (real config, SmolLM2's tokenizer) with a real PEFT rank-1 adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


def make_tiny_model(out: Path, tokenizer_path: str, hidden: int = 64, layers: int = 2, seed: int = 0) -> str:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(out)
    return str(out)


def make_adapter(model_path: str, out: Path, seed: int = 0, b_scale: float = 0.5, train_steps: int = 0) -> str:
    """A saved PEFT rank-1 adapter (the paper's config) with non-zero A and B.

    With `train_steps`, the adapter is first fitted for a few Adam steps on the embedded arithmetic
    task, so it lowers the loss there the way a real fine-tuned adapter does.
    """
    from transformers import AutoModelForCausalLM

    from rank1.core.config import AdapterConfig
    from rank1.core.model import lora_config

    from peft import get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path), lora_config(AdapterConfig()))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, b_scale)
    if train_steps:
        from transformers import AutoTokenizer

        from rank1.core.config import DataConfig
        from rank1.core.data import arithmetic_rows, to_messages, tokenize_messages
        from rank1.trainer.sft import SFTObjective

        tokenizer = AutoTokenizer.from_pretrained(model_path)
        rows = arithmetic_rows(364)[300:]  # rows the collection tests do not read first
        examples = [tokenize_messages(tokenizer, to_messages(r, "gsm8k", DataConfig(), "row")) for r in rows]
        params = [p for n, p in model.named_parameters() if "lora_" in n]
        opt = torch.optim.Adam(params, lr=2e-2)
        for step in range(train_steps):
            batch = SFTObjective(4, 512).collate(examples[step * 4 % len(examples) :][:4], tokenizer.pad_token_id)
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.save_pretrained(out)
    return str(out)


@pytest.fixture(scope="session")
def adapter_factory():
    return make_adapter


@pytest.fixture(scope="session")
def model_factory():
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory, model_path) -> str:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", model_path)


@pytest.fixture(scope="session")
def tiny_adapter(tmp_path_factory, tiny_model) -> str:
    return make_adapter(tiny_model, tmp_path_factory.mktemp("tiny") / "adapter", b_scale=0.05, train_steps=40)


@pytest.fixture(scope="session")
def collected(tmp_path_factory, tiny_model, tiny_adapter) -> Path:
    """A small activation collection on the embedded arithmetic task, made through the CLI."""
    from rank1.sae.cli import main

    out = tmp_path_factory.mktemp("acts") / "acts"
    code = main(["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", "arithmetic", "--max-rows", "400",
                 "--tokens", "6000", "--out", str(out), "--shard-tokens", "1500", "--batch-docs", "8"])
    assert code == 0
    return out


@pytest.fixture(scope="session")
def random_collected(tmp_path_factory, tiny_model) -> Path:
    """A collection made with a randomly initialised adapter (the control): activations spread over ~10 of 14 dims."""
    from rank1.sae.cli import main

    root = tmp_path_factory.mktemp("random")
    assert main(["random-adapter", "--out", str(root / "adapter"), "--model", tiny_model, "--seed", "5"]) == 0
    assert main(["collect", "--adapter", str(root / "adapter"), "--model", tiny_model, "--data", "arithmetic", "--max-rows", "400",
                 "--tokens", "6000", "--out", str(root / "acts"), "--shard-tokens", "1500", "--batch-docs", "8"]) == 0
    return root / "acts"
