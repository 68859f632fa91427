"""Base model + saved rank-1 adapter for study (rank1.core.adapter_io), on CPU in fp32 or spread over GPUs in bf16.

Activations are read in the model's dtype and stored as fp32, so a 32B base in bf16 over several GPUs
(accelerate's device_map="auto") gives the paper's 448-dim collection in practical time.
"""

from __future__ import annotations

from rank1.core.adapter_io import check_adapter_folder, load_adapted_model, resolve_base


def study_device(device: str) -> str:
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device


def study_dtype(dtype: str, device: str):
    import torch

    if dtype == "auto":
        return torch.bfloat16 if device == "cuda" else torch.float32
    return getattr(torch, dtype)


def load_for_study(adapter_dir, model_cfg, device: str = "cpu", dtype: str = "float32"):
    """(PeftModel in eval mode, tokenizer, resolved base path, base name) for the adapter on its base."""
    device = study_device(device)
    model_cfg = resolve_base(check_adapter_folder(adapter_dir), model_cfg)
    model, tokenizer, path = load_adapted_model(adapter_dir, model_cfg, dtype=study_dtype(dtype, device), device=device)
    return model, tokenizer, path, model_cfg.name_or_path


def load_tokenizer_for(meta: dict):
    """The tokenizer of the model a collection was made with (for decoding example tokens)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(meta["model_path"])
