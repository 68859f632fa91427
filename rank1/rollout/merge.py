"""Serving a rank-1 adapter merged into the weights (rollout.adapter_mode merged).

Each targeted matrix is rebuilt from the base's own checkpoint, W = W0 + s · b aᵀ, every sync: the
engines still receive only the adapter vectors, and no rounding accumulates across versions (adding
deltas onto already-rounded bf16 weights would drift). W0 is read from the base's safetensors files
one tensor at a time (memory-mapped: after the first sync they sit in the page cache), so merged mode
holds no second copy of the weights; the transient cost is the tensors of one layer in fp32.

vLLM packs q/k/v into one `qkv_proj` and gate/up into `gate_up_proj`, and its in-place reload
processes a packed layer only once every member is loaded, so a group is always sent whole.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from rank1.core.adapter_io import adapter_scale

PEFT_PREFIX = "base_model.model."
# Projections that Llama/Qwen2/Mistral-style models in vLLM serve as one packed layer.
PACKED = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def checkpoint_folder(model_path: str, revision: str | None = None) -> Path:
    """The local folder of the base's safetensors: the path itself, or a Hub id's snapshot in the Hugging Face
    cache (which the engine's own load filled; downloaded there if not, weights and index only)."""
    folder = Path(model_path).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(model_path, revision=revision, allow_patterns=["*.safetensors", "*.safetensors.index.json"]))
    except Exception as e:  # offline, gated, no such repo: say which base and why
        raise FileNotFoundError(f"{model_path}: cannot find its safetensors locally or on the Hub ({type(e).__name__}: {e}); "
                                "merged mode rebuilds weights from them (or use rollout.adapter_mode lora)") from None


class BaseWeights:
    """The base model's checkpoint tensors by name, read on demand from its safetensors files."""

    def __init__(self, model_path: str, revision: str | None = None):
        folder = checkpoint_folder(model_path, revision)
        index = folder / "model.safetensors.index.json"
        if index.is_file():
            self.file_of = {n: folder / f for n, f in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            single = folder / "model.safetensors"
            if not single.is_file():
                raise FileNotFoundError(f"{folder}: no model.safetensors (merged mode reads the base weights from it)")
            with safe_open(str(single), "pt") as f:
                self.file_of = {n: single for n in f.keys()}

        self._open: dict = {}

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        path = self.file_of[name]
        if path not in self._open:  # one handle per file for the object's life: a sync reads hundreds of tensors
            self._open[path] = safe_open(str(path), "pt")
        return self._open[path].get_tensor(name)

    def has(self, name: str) -> bool:
        return name in self.file_of


def rank1_deltas(tensors: dict[str, torch.Tensor], peft_config: dict) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """module name -> (A (r, in), B (out, r), scale) from PEFT state-dict keys."""
    from rank1.rollout.engine import AdapterError

    for key, plain in (("use_dora", False), ("bias", "none")):
        if peft_config.get(key, plain) not in (plain, None):
            raise AdapterError(f"peft_config[{key!r}]: {peft_config[key]!r}; merged mode serves plain LoRA (W0 + s·BA) only: "
                               "use rollout.adapter_mode lora")
    scale = adapter_scale(peft_config)
    deltas: dict[str, list] = {}
    for key, t in tensors.items():
        module, _, rest = key.removeprefix(PEFT_PREFIX).partition(".lora_")
        deltas.setdefault(module, [None, None, scale])[0 if rest.startswith("A") else 1] = t
    return {m: (a, b, s) for m, (a, b, s) in deltas.items()}


def merged(w0: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scale: float) -> torch.Tensor:
    """W0 + scale · B A in fp32 (rounded once, by the caller's cast)."""
    return w0.float() + scale * (b.float() @ a.float())


def packed_group(module: str) -> list[str]:
    """The modules served as one layer with `module` (itself alone if it is not packed)."""
    parent, _, leaf = module.rpartition(".")
    for group in PACKED:
        if leaf in group:
            return [f"{parent}.{m}" for m in group]
    return [module]


def parameters_to_send(base: BaseWeights, modules: set[str], packed: bool) -> list[str]:
    """Checkpoint names (weights and biases) of every layer the modules belong to, whole packed groups included."""
    groups = {m2 for m in modules for m2 in (packed_group(m) if packed else [m])}
    return [f"{m}.{p}" for m in sorted(groups) for p in ("weight", "bias") if base.has(f"{m}.{p}")]


def merged_weights(base: BaseWeights, names: list[str], deltas: dict, dtype: torch.dtype):
    """(name, tensor) for each checkpoint name: W0 + s·baᵀ where an adapter targets it, W0 otherwise; lazily."""
    for name in names:
        w = base.get(name)
        module, _, kind = name.rpartition(".")
        if kind == "weight" and module in deltas:
            a, b, scale = deltas[module]
            w = merged(w, a, b, scale)
        yield name, w.to(dtype)
