"""Adapter folders, the one place they are read, written, checked and loaded onto a base.

A folder is PEFT's: `adapter_config.json` + `adapter_model.safetensors`, loadable with
`PeftModel.from_pretrained` and vLLM's `LoRARequest`. Writers hand over tensors (gathered from ZeRO-3
shards where needed; PeftModel.save_pretrained under ZeRO-3 reads the local, empty shards and writes a
0-element adapter) and the config as a dict; folders appear atomically, whole or not at all.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

from rank1.core.model import ModelError

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
DTYPES = {"fp32": "float32", "bf16": "bfloat16", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


class AdapterFolderError(ModelError):
    """An adapter folder that cannot be read or written; the message names it."""


def fresh_tmp_dir(final: Path, atomic: bool = True) -> Path:
    """An empty folder beside `final` to build it in (`final` itself when not atomic): replace_dir swaps it in."""
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}") if atomic else final
    if atomic:
        shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True, exist_ok=not atomic)
    return tmp


def replace_dir(tmp: Path, final: Path) -> None:
    """Swap a finished folder into place: readers see the old folder or the whole new one."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def config_dict(peft_config) -> dict:
    """A LoraConfig (or its to_dict()) as plain JSON values: sets become sorted lists, enums strings."""
    data = peft_config if isinstance(peft_config, dict) else peft_config.to_dict()
    data = json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, set) else str(v)))
    data.setdefault("peft_type", "LORA")
    return data


def check_adapter_folder(folder: str | Path, what: str = "--adapter") -> dict:
    """The folder's adapter config, or AdapterFolderError saying what is missing."""
    folder = Path(folder)
    if not (folder / CONFIG).is_file():
        raise AdapterFolderError(f"{what} {folder}: no {CONFIG} there (not a PEFT adapter folder)")
    if not (folder / WEIGHTS).is_file():
        raise AdapterFolderError(f"{what} {folder}: has {CONFIG} but no {WEIGHTS}")
    try:
        config = json.loads((folder / CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise AdapterFolderError(f"{folder / CONFIG}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise AdapterFolderError(f"{folder / CONFIG}: expected a JSON object")
    return config


def read_adapter(folder: str | Path, what: str = "--adapter") -> tuple[dict, dict]:
    """(tensors, config) of an adapter folder."""
    from safetensors.torch import load_file

    config = check_adapter_folder(folder, what)
    try:
        tensors = load_file(str(Path(folder) / WEIGHTS))
    except Exception as e:  # safetensors raises its own SafetensorError for a torn or foreign file
        raise AdapterFolderError(f"{Path(folder) / WEIGHTS}: cannot read the adapter weights ({e})") from None
    if not tensors or not any("lora_" in k for k in tensors):
        raise AdapterFolderError(f"{Path(folder) / WEIGHTS}: holds no LoRA tensors (keys: {', '.join(list(tensors)[:5]) or 'none'})")
    return tensors, config


def check_tensors(tensors: dict) -> None:
    """Refuse what must never be written or served: an empty adapter, or NaN / inf values."""
    import torch

    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise AdapterFolderError("refusing to save an empty adapter (were ZeRO-3 shards gathered?)")
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise AdapterFolderError(f"refusing to save adapter tensor {name}: it holds NaN or inf values")


def write_adapter(folder: str | Path, tensors: dict, peft_config, base_model: str | None = None,
                  dtype: str | None = None, atomic: bool = True) -> int:
    """Write the folder (tensors cast to `dtype` when given); returns the bytes of the weights file."""
    import torch
    from safetensors.torch import save_file

    check_tensors(tensors)
    folder = Path(folder)
    target = getattr(torch, DTYPES[dtype]) if dtype else None
    tmp = fresh_tmp_dir(folder, atomic)
    cast = {k: (v.to(target) if target is not None and v.is_floating_point() else v).detach().to("cpu").contiguous()
            for k, v in tensors.items()}
    save_file(cast, str(tmp / WEIGHTS), metadata={"format": "pt"})
    config = config_dict(peft_config)
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    if atomic:
        replace_dir(tmp, folder)
    return (folder / WEIGHTS).stat().st_size


def adapter_shapes(folder: str | Path) -> dict[str, tuple[int, int]]:
    """module name -> (in_features, out_features) the adapter was trained for, read from the file's header."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    with safe_open(str(Path(folder) / WEIGHTS), "pt") as f:
        for key in f.keys():
            if ".lora_A." not in key and ".lora_B." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_")[0]
            shape = f.get_slice(key).get_shape()
            entry = shapes.setdefault(module, [0, 0])
            if ".lora_A." in key:
                entry[0] = shape[1]  # A: (r, in)
            else:
                entry[1] = shape[0]  # B: (out, r)
    return {k: (v[0], v[1]) for k, v in shapes.items()}


def resolve_base(adapter_config: dict, model_cfg):
    """The model section to load under an adapter: the one the user named, else the adapter's own base."""
    import dataclasses

    from rank1.core.config import EMBEDDED_MODEL

    named = adapter_config.get("base_model_name_or_path")
    if model_cfg.name_or_path != EMBEDDED_MODEL or not named:
        return model_cfg
    return dataclasses.replace(model_cfg, name_or_path=named)


def load_adapted_model(folder: str | Path, model_cfg, *, dtype=None, device: str = "cpu", trainable: bool = False,
                       what: str = "--adapter"):
    """(PeftModel, tokenizer, resolved base path) for an adapter folder on its base; eval mode unless trainable."""
    import torch
    from peft import PeftModel

    from rank1.core.model import load_base, load_tokenizer, resolve_model_path

    config = check_adapter_folder(folder, what)
    model_cfg = resolve_base(config, model_cfg)
    path = resolve_model_path(model_cfg)
    tokenizer = load_tokenizer(path, model_cfg)
    base = load_base(path, model_cfg, dtype or torch.float32, device=device)
    try:
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable)
    except (RuntimeError, ValueError, KeyError) as e:  # size mismatch, missing target modules
        raise ModelError(
            f"{what} {folder}: does not fit base model {model_cfg.name_or_path} ({type(e).__name__}: {str(e)[:400]})"
        ) from None
    return (model if trainable else model.eval()), tokenizer, path


def adapter_scale(config: dict) -> float:
    """PEFT's scaling of B·A: alpha / sqrt(r) with rsLoRA, alpha / r otherwise."""
    r, alpha = config["r"], config.get("lora_alpha", config["r"])
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
