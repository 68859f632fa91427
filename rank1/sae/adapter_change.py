"""How much two rank-1 adapters differ, per module, per module type and per layer (e.g. SFT vs the GRPO run from it).

For a module with rank-1 factors A (1, in) and B (out, 1) and PEFT's scale c, the weight change is
ΔW = c·B·A, so ‖ΔW‖_F = c·‖A‖·‖B‖, and between two adapters, without forming any matrix,

    ‖ΔW₁ − ΔW₂‖²_F = c₁²‖A₁‖²‖B₁‖² + c₂²‖A₂‖²‖B₂‖² − 2·c₁c₂·(A₁·A₂)(B₁·B₂).

‖A₁ − A₂‖ and ‖B₁ − B₂‖ are reported too; they depend on the factors' sign (ΔW does not), which a GRPO run
started from the SFT adapter keeps. A layer's (or module type's) figure is the root of the summed squares
of its modules' figures: the Frobenius norm of all its changes together.
"""

from __future__ import annotations

import math
import re

from rank1.core.adapter_io import adapter_scale, read_adapter
from rank1.sae.errors import SAEError

FIGURES = ("norm_A_a", "norm_B_a", "delta_w_a", "norm_A_b", "norm_B_b", "delta_w_b", "diff_A", "diff_B", "diff_delta_w")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_index(module: str) -> int:
    """The decoder layer a module belongs to (model.layers.3.mlp.up_proj -> 3), -1 outside the layers."""
    found = _LAYER.search("." + module)
    return int(found.group(1)) if found else -1


def rank1_factors(folder: str) -> tuple[dict[str, tuple], float]:
    """{module name: (A (in,), B (out,))} of a rank-1 adapter folder, and its scale."""
    tensors, config = read_adapter(folder)
    factors: dict[str, dict] = {}
    for key, value in tensors.items():
        if ".lora_A." not in key and ".lora_B." not in key:
            continue
        if 1 not in value.shape[:2] or value.ndim != 2:
            raise SAEError(f"--adapter {folder}: {key} has shape {tuple(value.shape)}; rank-1 factors are (1, in) and (out, 1)")
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        factors.setdefault(module, {})["A" if ".lora_A." in key else "B"] = value.double().flatten()
    return {m: (f["A"], f["B"]) for m, f in factors.items()}, adapter_scale(config)


def module_change(A1, B1, c1, A2, B2, c2) -> dict:
    n = lambda v: float(v.norm())  # noqa: E731
    cross = c1 * c2 * float(A1 @ A2) * float(B1 @ B2)
    squared = (c1 * n(A1) * n(B1)) ** 2 + (c2 * n(A2) * n(B2)) ** 2 - 2 * cross
    return {"norm_A_a": n(A1), "norm_B_a": n(B1), "delta_w_a": c1 * n(A1) * n(B1),
            "norm_A_b": n(A2), "norm_B_b": n(B2), "delta_w_b": c2 * n(A2) * n(B2),
            "diff_A": n(A1 - A2), "diff_B": n(B1 - B2), "diff_delta_w": math.sqrt(max(squared, 0.0))}


def _grouped(modules: list[dict], key: str) -> list[dict]:
    groups: dict = {}
    for m in modules:
        groups.setdefault(m[key], []).append(m)
    return [{key: name, "modules": len(rows), **{f: math.sqrt(sum(r[f] ** 2 for r in rows)) for f in FIGURES}}
            for name, rows in groups.items()]


def adapter_change(folder_a: str, folder_b: str) -> dict:
    """Per module, per module type (q_proj, ...) and per layer: the norms of A, B and ΔW of both adapters and their differences."""
    a, scale_a = rank1_factors(folder_a)
    b, scale_b = rank1_factors(folder_b)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))[:3]
        raise SAEError(f"--adapter-a {folder_a} and --adapter-b {folder_b} adapt different modules (e.g. {', '.join(only)})")
    modules = []
    for name in a:
        if a[name][0].shape != b[name][0].shape or a[name][1].shape != b[name][1].shape:
            raise SAEError(f"--adapter-a {folder_a} and --adapter-b {folder_b}: {name} has other shapes (another base model?)")
        modules.append({"module": name, "layer": layer_index(name), "type": name.rsplit(".", 1)[-1],
                        **module_change(*a[name], scale_a, *b[name], scale_b)})
    return {"adapter_a": str(folder_a), "adapter_b": str(folder_b), "scale_a": scale_a, "scale_b": scale_b, "modules": modules,
            "types": _grouped(modules, "type"), "layers": sorted(_grouped(modules, "layer"), key=lambda r: r["layer"])}
