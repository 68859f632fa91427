"""Writing a PEFT adapter folder from tensors: adapter_config.json + adapter_model.safetensors.

Written from gathered tensors rather than PeftModel.save_pretrained, which under ZeRO-3 reads the
local (empty) shards and writes a 0-element adapter.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path


def write_adapter_folder(folder: str | Path, tensors: dict, lora_config, base_model: str) -> None:
    """Atomically write the folder: a reader sees the old folder or the complete new one."""
    from safetensors.torch import save_file

    if not tensors or any(t.numel() == 0 for t in tensors.values()):
        raise ValueError("refusing to save an empty adapter (were ZeRO-3 shards gathered?)")
    folder = Path(folder)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
    lora_config.base_model_name_or_path = base_model
    lora_config.save_pretrained(str(tmp))
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    if folder.exists():
        folder.rename(old)
    tmp.rename(folder)
    shutil.rmtree(old, ignore_errors=True)
