"""A rank1 run dir built by hand from a real PEFT model on the real SmolLM2 (same layout `rank1 train` writes),
plus the trained model's reference logits, and a tiny Llama of another shape for base-mismatch cases."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
# A prompt with chat markup and digits: the adapter must change these logits for the tests to mean anything.
PROBE = "<|im_start|>user\nWhat is 17 * 23? Think step by step.<|im_end|>\n<|im_start|>assistant\n17 * 23 ="


def adapted_model(model_path: str, seed: int = 0):
    """PeftModel with the paper's rank-1 adapters; lora_B random (not PEFT's zeros) so the adapter matters."""
    import torch

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, load_base

    base = load_base(model_path, ModelConfig(), torch.float32)
    model = attach_adapter(base, AdapterConfig(), "smollm2-135m-instruct")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
    return model.eval()


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory, model_path, tokenizer) -> dict:
    """{'dir': run dir, 'ids': probe token ids, 'logits': the trained model's logits on them, 'base_logits': ...}."""
    import torch
    from peft import get_peft_model_state_dict

    from rank1.core.config import AdapterConfig, Config
    from rank1.core.flags import to_yaml
    from rank1.core.adapter_io import write_adapter
    from rank1.core.model import lora_config, public_model_id

    out = tmp_path_factory.mktemp("run")
    cfg = Config()
    cfg.logging.output_dir = str(out)
    model = adapted_model(model_path)
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    write_adapter(out / "adapter", tensors, lora_config(AdapterConfig()), public_model_id(cfg.model))
    write_adapter(out / "checkpoints" / "step-000002" / "adapter", tensors, lora_config(AdapterConfig()), public_model_id(cfg.model))
    (out / "config.yaml").write_text(to_yaml(cfg))
    (out / "metrics.jsonl").write_text(json.dumps({"step": 2, "loss": 1.2345, "lr": 1e-3}) + "\n")
    ids = tokenizer(PROBE, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0]
        with model.disable_adapter():
            base_logits = model(input_ids=ids).logits[0]
    assert (logits - base_logits).abs().max() > 0.5, "the fixture adapter must change the logits"
    return {"dir": out, "ids": ids, "logits": logits, "base_logits": base_logits}


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> str:
    """A random 2-layer Llama (hidden 64) with SmolLM2's tokenizer: a base the SmolLM2 adapter does not fit."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(out)
    return str(out)


def run_export(*args: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """The real export CLI in a child process (`python -m rank1.export`, what `rank1 export` runs)."""
    child_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "rank1.export", *args], cwd=REPO, env=child_env,
                          capture_output=True, text=True, timeout=timeout)
