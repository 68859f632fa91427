"""The exported adapter: the run's PEFT folder with its tensors cast to the chosen dtype.

The config keeps every PEFT field (r, alpha, use_rslora, target_modules...) so PEFT, vLLM and TGI read it
as written by PEFT itself. Only `base_model_name_or_path` may change: the embedded base is named
`smollm2-135m-instruct` inside rank1, which no other tool can resolve, so the published config names its
Hub id instead (the card says the adapter was trained on a dequantized Q4_1 GGUF of it).
"""

from __future__ import annotations

from pathlib import Path

from rank1.core.adapter_io import AdapterFolderError, read_adapter, write_adapter
from rank1.export.source import ExportError, ExportSource


def public_base_id(base_model: str) -> str:
    """The name other tools should load as the base."""
    from rank1.core.config import EMBEDDED_MODEL
    from rank1.core.model import EMBEDDED_HUB_ID

    return EMBEDDED_HUB_ID if base_model == EMBEDDED_MODEL else base_model


def write_export_adapter(source: ExportSource, out: Path, dtype: str, base_model: str | None = None) -> dict:
    """Write adapter_model.safetensors + adapter_config.json into `out`; returns the written config."""
    try:
        tensors, _ = read_adapter(source.adapter_dir)
        config = dict(source.adapter_config, base_model_name_or_path=public_base_id(base_model or source.base_model))
        write_adapter(out, tensors, config, dtype=dtype, atomic=False)
    except AdapterFolderError as e:
        raise ExportError(str(e)) from None
    return config
