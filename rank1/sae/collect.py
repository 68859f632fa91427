"""`rank1 sae collect`: run base+adapter over documents and stream adapter activations to shards.

Batches are fixed groups of `batch_docs` consecutive documents and shards close on batch boundaries,
so a resumed run recomputes exactly the batches an uninterrupted run would and writes identical files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rank1.config import DataConfig, ModelConfig
from rank1.sae.capture import ActivationCapture
from rank1.sae.documents import load_documents, padded_batch
from rank1.sae.errors import SAEError
from rank1.sae.loading import load_adapted_model
from rank1.sae.store import ShardWriter


@dataclass
class CollectSettings:
    max_tokens: int  # stop after the batch that reaches this many tokens
    batch_docs: int = 8
    shard_tokens: int = 65536
    neurons_per_layer: int = 6  # the paper's MLP baseline: first 6 up_proj channels per layer
    text_field: str | None = None
    progress: bool = True


def decoder_only(model):
    """The adapted model without its LM head: collection needs no logits (the head is ~20 % of SmolLM2's compute)."""
    base = model.get_base_model()
    return getattr(base, base.base_model_prefix, None) or model


def collect(adapter_dir: str, data_cfg: DataConfig, model_cfg: ModelConfig, out_dir: str, settings: CollectSettings) -> dict:
    if settings.max_tokens <= 0:
        raise SAEError(f"--tokens must be > 0, got {settings.max_tokens}")
    model, tokenizer, model_path = load_adapted_model(adapter_dir, model_cfg)
    docs = load_documents(data_cfg, tokenizer, settings.text_field)
    capture = ActivationCapture(model, neurons_per_layer=settings.neurons_per_layer)
    meta = {
        "model": model_cfg.name_or_path,
        "model_path": model_path,
        "adapter": str(Path(adapter_dir).resolve()),
        "data": data_cfg.path,
        "data_format": data_cfg.format,
        "max_length": data_cfg.max_length,
        "text_field": settings.text_field,
        "batch_docs": settings.batch_docs,
        "adapter_names": capture.adapter_names,
        "neuron_names": capture.neuron_names,
    }
    writer = ShardWriter(out_dir, meta, settings.shard_tokens)
    decoder = decoder_only(model)
    start = writer.next_doc
    bar = tqdm(total=settings.max_tokens, initial=min(writer.tokens, settings.max_tokens), unit="tok", disable=not settings.progress, desc="collect")
    doc = start
    with torch.inference_mode(), capture:
        while doc < len(docs) and writer.tokens < settings.max_tokens:
            batch = docs[doc : doc + settings.batch_docs]
            ids, mask, _ = padded_batch(batch, tokenizer.pad_token_id)
            decoder(input_ids=ids, attention_mask=mask)
            keep = mask.bool()
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            doc_ids = (torch.arange(len(batch)) + doc).unsqueeze(1).expand_as(ids)
            before = writer.tokens
            writer.add(
                doc + len(batch),
                adapter=capture.adapter_activations()[keep],
                neurons=capture.neuron_activations()[keep] if capture.neurons else torch.zeros(int(keep.sum()), 0),
                token_ids=ids[keep].to(torch.int32),
                doc_ids=doc_ids[keep].to(torch.int64),
                positions=positions[keep].to(torch.int32),
            )
            bar.update(min(writer.tokens, settings.max_tokens) - min(before, settings.max_tokens))
            doc += len(batch)
    bar.close()
    writer.finish(done=doc >= len(docs))
    return {"out": str(out_dir), "tokens": writer.tokens, "shards": len(writer.shards), "documents": doc, "resumed_from_doc": start}
