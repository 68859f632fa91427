"""The merged model: W + scale · B·A folded into every targeted linear, saved as a plain transformers model.

Before loading any weights the adapter is checked against the base's architecture (on the meta device):
an adapter of another model would otherwise fail deep inside PEFT with a bare size-mismatch trace, or —
worse — load with missing modules silently ignored.
"""

from __future__ import annotations

from pathlib import Path

from rank1.export.source import ExportError


def check_fits(adapter_dir: Path, base_name: str, base_path: str, trust_remote_code: bool = False) -> None:
    """Raise ExportError if the adapter's modules are missing from the base or have other shapes."""
    from rank1.core.adapter_io import adapter_shapes
    from rank1.core.model import linear_shapes, load_model_config, meta_model

    config = load_model_config(base_path, trust_remote_code)
    linears = linear_shapes(meta_model(config, trust_remote_code))
    wanted = adapter_shapes(adapter_dir)
    missing = [n for n in wanted if n not in linears]
    wrong = [(n, wanted[n], linears[n]) for n in wanted if n in linears and wanted[n] != linears[n]]
    gone = f"; {len(missing)} of {len(wanted)} adapted modules are missing from it" if missing else ""
    if wrong:
        name, (i, o), (bi, bo) = wrong[0]
        raise ExportError(
            f"--merge: the adapter in {adapter_dir} does not fit base model {base_name} ({config.model_type}): {name} is "
            f"{i}->{o} in the adapter but {bi}->{bo} in the base ({len(wrong)} modules differ{gone}); "
            "pass the base it was trained on with --base-model"
        )
    if missing:
        raise ExportError(
            f"--merge: the adapter in {adapter_dir} does not fit base model {base_name} ({config.model_type}): "
            f"it has no module {missing[0]}{gone}; pass the base it was trained on with --base-model"
        )


def write_merged(adapter_dir: Path, base_name: str, out: Path, dtype: str, max_shard_size: str, trust_remote_code: bool = False) -> None:
    """Base + adapter merged, saved as sharded safetensors with the base's tokenizer."""
    import torch

    from rank1.core.adapter_io import DTYPES, load_adapted_model
    from rank1.core.config import ModelConfig
    from rank1.core.model import ModelError, resolve_model_path

    model_cfg = ModelConfig(name_or_path=base_name, trust_remote_code=trust_remote_code)
    try:
        check_fits(adapter_dir, base_name, resolve_model_path(model_cfg), trust_remote_code)
        # merged in fp32, cast once at the end
        model, tokenizer, _ = load_adapted_model(adapter_dir, model_cfg, dtype=torch.float32, what="--merge")
    except ModelError as e:
        raise ExportError(f"--merge: {e}") from None
    merged = model.merge_and_unload()
    merged = merged.to(getattr(torch, DTYPES[dtype]))
    merged.config.dtype = getattr(torch, DTYPES[dtype])
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(str(out), max_shard_size=max_shard_size)
    tokenizer.save_pretrained(str(out))
