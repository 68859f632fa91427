"""`rank1 sae ablate`: the paper's leave-one-layer-out ablation, measured as KL to the full adapter.

For each decoder layer L, every rank-1 adapter of that layer is switched off (its lora_A output, the
scalar s = A·x, replaced by 0, so B·s adds nothing) while the adapters of the other layers run as usual on
whatever inputs they now get. The figure is the mean over tokens of KL(p_full || p_without_L) of the
next-token distributions, on every non-padding position of the documents read; KL(full || base model)
(all adapters off) is the scale it is read against. A layer whose adapters are zero scores exactly 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from rank1.core.config import DataConfig, ModelConfig
from rank1.core.config_commands import SAEAblateConfig
from rank1.sae.adapter_change import layer_index
from rank1.sae.capture import adapter_sites
from rank1.sae.documents import load_documents, padded_batch
from rank1.sae.loading import load_for_study
from rank1.sae.plots import pyplot, save


class SwitchOff:
    """Context manager: the given lora_A modules output zeros (their adapters add nothing)."""

    def __init__(self, modules: list[torch.nn.Module]):
        self.modules, self._handles = modules, []

    def __enter__(self) -> SwitchOff:
        self._handles = [m.register_forward_hook(lambda module, inputs, output: torch.zeros_like(output)) for m in self.modules]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


def _kl_sum(full: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> float:
    """Σ over unmasked positions of KL(full || softmax(logits)); `full` holds log-probabilities."""
    kl = (full.exp() * (full - F.log_softmax(logits.float(), dim=-1))).sum(-1)
    return float(kl[mask].sum())


@torch.no_grad()
def layer_ablation(model, docs, pad_id: int, batch_docs: int = 8) -> dict:
    """Mean per-token KL(full || without layer L) for every layer with adapters, and KL(full || base)."""
    by_layer: dict[int, list] = {}
    for site in adapter_sites(model):
        by_layer.setdefault(layer_index(site.name), []).append(site.lora_A)
    kl = dict.fromkeys(by_layer, 0.0)
    kl_base, tokens = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(docs), batch_docs):
        ids, mask, _ = padded_batch(docs[start : start + batch_docs], pad_id)
        ids, mask = ids.to(device), mask.to(device)
        run = lambda: model(input_ids=ids, attention_mask=mask).logits  # noqa: E731
        full, valid = F.log_softmax(run().float(), dim=-1), mask.bool()
        with model.disable_adapter():
            kl_base += _kl_sum(full, run(), valid)
        for layer, modules in by_layer.items():
            with SwitchOff(modules):
                kl[layer] += _kl_sum(full, run(), valid)
        tokens += int(valid.sum())
    rows = [{"layer": layer, "adapters": len(by_layer[layer]), "kl": kl[layer] / tokens,
             "share_of_base": kl[layer] / kl_base if kl_base > 0 else None} for layer in sorted(by_layer)]
    return {"tokens": tokens, "documents": len(docs), "kl_base": kl_base / tokens, "layers": rows}


def plot_ablation(result: dict, path: str | Path) -> Path:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(result["layers"]) + 2), 3.2))
    ax.bar([r["layer"] for r in result["layers"]], [r["kl"] for r in result["layers"]], color="#4a7")
    ax.set_xlabel("layer left out")
    ax.set_ylabel("KL(full adapter ‖ without layer)")
    ax.set_title(f"KL(full adapter ‖ base) = {result['kl_base']:.3g} nats/token", fontsize=9)
    return save(fig, path)


def ablate(settings: SAEAblateConfig, data_cfg: DataConfig, model_cfg: ModelConfig) -> dict:
    model, tokenizer, _, model_name = load_for_study(settings.adapter, model_cfg, settings.device, settings.dtype)
    docs = load_documents(data_cfg, tokenizer)[: settings.docs]
    result = layer_ablation(model, docs, tokenizer.pad_token_id, settings.batch_docs)
    result = {"adapter": str(Path(settings.adapter).resolve()), "model": model_name, "data": data_cfg.path, **result}
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = plot_ablation(result, out.with_suffix(".png"))
    return {"out": str(out), "png": str(png), "kl_base": result["kl_base"], "kl": {r["layer"]: r["kl"] for r in result["layers"]}}
