"""A randomly initialized rank-1 adapter: the control for auto-interpretation scores.

PEFT's default init draws lora_A (the direction the SAE tools read) at random (Kaiming uniform) and
sets lora_B to zero, so the control reads random projections of the same model's inputs.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rank1.core.adapter_io import write_adapter
from rank1.core.config import AdapterConfig, ModelConfig
from rank1.core.model import attach_adapter, load_base, public_model_id, resolve_model_path


def build_random_adapter(out_dir: str | Path, model_cfg: ModelConfig, adapter_cfg: AdapterConfig | None = None, seed: int = 0) -> Path:
    from peft import get_peft_model_state_dict

    adapter_cfg = adapter_cfg or AdapterConfig()
    base = load_base(resolve_model_path(model_cfg), model_cfg, torch.float32)
    torch.manual_seed(seed)
    model = attach_adapter(base, adapter_cfg, model_cfg.name_or_path)
    out = Path(out_dir)
    write_adapter(out, get_peft_model_state_dict(model), model.peft_config["default"], public_model_id(model_cfg))
    return out
