"""A randomly initialized rank-1 adapter: the control for auto-interpretation scores.

PEFT's default init draws lora_A (the direction the SAE tools read) at random (Kaiming uniform) and
sets lora_B to zero, so the control reads random projections of the same model's inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rank1.config import AdapterConfig, ModelConfig
from rank1.model import attach_adapter, load_base, resolve_model_path


def build_random_adapter(out_dir: str | Path, model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None = None, seed: int = 0) -> Path:
    adapter_cfg = adapter_cfg or AdapterConfig()
    path = resolve_model_path(model_cfg)
    base = load_base(path, model_cfg, torch.float32)
    torch.manual_seed(seed)
    model = attach_adapter(base, adapter_cfg, model_cfg.name_or_path)
    out = Path(out_dir)
    model.save_pretrained(str(out))
    return out
