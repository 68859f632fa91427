"""Sample from a base model plus a saved rank-1 adapter (transformers + PEFT, no vLLM needed)."""

from __future__ import annotations

import json
from pathlib import Path

from rank1.config import ModelConfig
from rank1.model import ModelError, load_base, load_tokenizer, resolve_model_path


def load_adapted_model(adapter_dir: str, model: str | None = None, trust_remote_code: bool = False):
    """(PeftModel, tokenizer) for an adapter folder; the base defaults to the adapter's own."""
    import torch
    from peft import PeftModel

    config_file = Path(adapter_dir) / "adapter_config.json"
    if not config_file.is_file():
        raise ModelError(f"--adapter {adapter_dir}: no adapter_config.json there (not a PEFT adapter folder)")
    base_name = model or json.loads(config_file.read_text()).get("base_model_name_or_path")
    if not base_name:
        raise ModelError(f"--adapter {adapter_dir}: adapter_config.json names no base model; pass --model")
    model_cfg = ModelConfig(name_or_path=base_name, trust_remote_code=trust_remote_code)
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    base = load_base(path, model_cfg, torch.float32)
    try:
        peft_model = PeftModel.from_pretrained(base, adapter_dir)
    except (RuntimeError, ValueError, KeyError) as e:  # shape mismatch: adapter of another model
        raise ModelError(f"--adapter {adapter_dir}: does not fit base model {base_name} ({e})") from None
    return peft_model.eval(), tokenizer


def generate(adapter_dir: str, prompt: str, *, model: str | None = None, max_new_tokens: int = 128,
             temperature: float = 0.0, seed: int = 0, trust_remote_code: bool = False) -> str:
    import torch

    peft_model, tokenizer = load_adapted_model(adapter_dir, model, trust_remote_code)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    torch.manual_seed(seed)
    sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = peft_model.generate(**ids, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
