"""The exported adapter: the run's PEFT folder with its tensors cast to the chosen dtype.

The config keeps every PEFT field (r, alpha, use_rslora, target_modules...) so PEFT, vLLM and TGI read it
as written by PEFT itself. Only `base_model_name_or_path` may change: the embedded base is named
`smollm2-135m-instruct` inside rank1, which no other tool can resolve, so the published config names its
Hub id instead (the card says the adapter was trained on a dequantized Q4_1 GGUF of it).
"""

from __future__ import annotations

import json
from pathlib import Path

from rank1.export.source import ExportError, ExportSource

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


def public_base_id(base_model: str) -> str:
    """The name other tools should load as the base."""
    from rank1.config import EMBEDDED_MODEL
    from rank1.model import EMBEDDED_HUB_ID

    return EMBEDDED_HUB_ID if base_model == EMBEDDED_MODEL else base_model


def write_adapter(source: ExportSource, out: Path, dtype: str, base_model: str | None = None) -> dict:
    """Write adapter_model.safetensors + adapter_config.json into `out`; returns the written config."""
    import torch
    from safetensors.torch import load_file, save_file

    torch_dtype = getattr(torch, DTYPES[dtype])
    try:
        tensors = load_file(str(source.adapter_dir / WEIGHTS))
    except Exception as e:  # safetensors raises its own SafetensorError for a torn or foreign file
        raise ExportError(f"{source.adapter_dir / WEIGHTS}: cannot read the adapter weights ({e})") from None
    if not tensors or not any("lora_" in k for k in tensors):
        raise ExportError(f"{source.adapter_dir / WEIGHTS}: holds no LoRA tensors (keys: {', '.join(list(tensors)[:5]) or 'none'})")
    out.mkdir(parents=True, exist_ok=True)
    cast = {k: (v.to(torch_dtype) if v.is_floating_point() else v).contiguous() for k, v in tensors.items()}
    save_file(cast, str(out / WEIGHTS), metadata={"format": "pt"})
    config = dict(source.adapter_config)
    config["base_model_name_or_path"] = public_base_id(base_model or source.base_model)
    (out / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config
