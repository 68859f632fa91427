"""`rank1 sae collect`: run base+adapter over documents and stream adapter activations to shards.

Batches are fixed groups of `batch_docs` consecutive documents and shards close on batch boundaries,
so a resumed run recomputes exactly the batches an uninterrupted run would and writes identical files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from rank1.core.config import DataConfig, ModelConfig, SAECollectConfig
from rank1.sae.capture import ActivationCapture
from rank1.sae.documents import load_documents, padded_batch
from rank1.sae.loading import load_for_study
from rank1.sae.store import ShardWriter


def decoder_only(model):
    """The adapted model without its LM head: collection needs no logits (the head is ~20 % of SmolLM2's compute)."""
    base = model.get_base_model()
    return getattr(base, base.base_model_prefix, None) or model


def collect(settings: SAECollectConfig, data_cfg: DataConfig, model_cfg: ModelConfig, progress: bool = True) -> dict:
    """Stop after the batch that reaches settings.tokens tokens (or the end of the data)."""
    adapter_dir, out_dir = settings.adapter, settings.out
    model, tokenizer, model_path, model_name = load_for_study(adapter_dir, model_cfg, settings.device, settings.dtype)
    docs = load_documents(data_cfg, tokenizer, settings.text_field)
    capture = ActivationCapture(model, neurons_per_layer=settings.neurons_per_layer)
    meta = {
        "model": model_name,
        "model_path": model_path,
        "adapter": str(Path(adapter_dir).resolve()),
        "data": data_cfg.path,
        "data_format": data_cfg.format,
        "max_length": data_cfg.max_length,
        "text_field": settings.text_field,
        "batch_docs": settings.batch_docs,
        "adapter_names": capture.adapter_names,
        "neuron_names": capture.neuron_names,
        "skip_positions": settings.skip_positions,
    }
    writer = ShardWriter(out_dir, meta, settings.shard_tokens)
    decoder = decoder_only(model)
    start = writer.next_doc
    bar = tqdm(total=settings.tokens, initial=min(writer.tokens, settings.tokens), unit="tok", disable=not progress, desc="collect")
    doc = start
    with torch.inference_mode(), capture:
        while doc < len(docs) and writer.tokens < settings.tokens:
            batch = docs[doc : doc + settings.batch_docs]
            ids, mask, _ = padded_batch(batch, tokenizer.pad_token_id)
            decoder(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
            keep = mask.bool()  # every position is stored; readers leave out the attention sink (store.py)
            positions = torch.arange(ids.shape[1]).expand_as(ids)
            doc_ids = (torch.arange(len(batch)) + doc).unsqueeze(1).expand_as(ids)
            before = writer.tokens
            writer.add(
                doc + len(batch),
                adapter=capture.adapter_activations().cpu()[keep],
                neurons=capture.neuron_activations().cpu()[keep] if capture.neurons else torch.zeros(int(keep.sum()), 0),
                token_ids=ids[keep].to(torch.int32),
                doc_ids=doc_ids[keep].to(torch.int64),
                positions=positions[keep].to(torch.int32),
            )
            bar.update(min(writer.tokens, settings.tokens) - min(before, settings.tokens))
            doc += len(batch)
    bar.close()
    writer.finish(done=doc >= len(docs))
    return {"out": str(out_dir), "tokens": writer.tokens, "shards": len(writer.shards), "documents": doc, "resumed_from_doc": start}
