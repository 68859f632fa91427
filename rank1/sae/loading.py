"""Base model + saved rank-1 adapter, loaded through rank1.model, with errors that name the adapter."""

from __future__ import annotations

import json
from pathlib import Path

from rank1.config import ModelConfig
from rank1.model import load_base, load_tokenizer, resolve_model_path
from rank1.sae.errors import SAEError


def adapter_base_model(adapter_dir: str | Path) -> str | None:
    config = Path(adapter_dir) / "adapter_config.json"
    if not config.is_file():
        raise SAEError(f"--adapter {adapter_dir}: no adapter_config.json there (not a PEFT adapter folder)")
    return json.loads(config.read_text()).get("base_model_name_or_path")


def load_adapted_model(adapter_dir: str | Path, model_cfg: ModelConfig):
    """(PeftModel in eval mode, tokenizer, resolved base path) for the adapter on the configured base."""
    import torch
    from peft import PeftModel

    adapter_base_model(adapter_dir)  # checks the folder
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    base = load_base(path, model_cfg, torch.float32)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, missing target modules
        raise SAEError(
            f"--adapter {adapter_dir}: does not fit the model {model_cfg.name_or_path} ({type(e).__name__}: {str(e)[:400]})"
        ) from None
    model.eval()
    return model, tokenizer, path


def model_config_for(name_or_path: str | None) -> ModelConfig:
    return ModelConfig() if name_or_path is None else ModelConfig(name_or_path=name_or_path)


def load_tokenizer_for(meta: dict):
    """The tokenizer of the model a collection was made with (for decoding example tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(meta["model_path"])
