"""`rank1 sae train`: an SAE on a collection's adapter activations, saved in SAELens' format."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rank1.config import DataConfig
from rank1.sae.documents import load_documents
from rank1.sae.effect import AdapterEffect
from rank1.sae.errors import SAEError
from rank1.sae.loading import load_adapted_model, model_config_for
from rank1.sae.sae import SparseAutoencoder, SparseAutoencoderConfig
from rank1.sae.saelens_format import save_sae
from rank1.sae.store import ActivationStore
from rank1.sae.trainer import SAETrainerConfig, train_sae


@dataclass
class EffectSettings:
    adapter: str | None = None  # default: the collection's adapter
    data: str | None = None  # default: the collection's data, documents it did not use
    docs: int = 16  # held-out documents
    max_length: int = 256


def build_effect(store: ActivationStore, settings: EffectSettings) -> AdapterEffect:
    meta = store.meta
    model, tokenizer, _ = load_adapted_model(settings.adapter or meta["adapter"], model_config_for(meta["model"]))
    data_cfg = DataConfig(path=settings.data or meta["data"], format=meta.get("data_format", "auto"), max_length=settings.max_length)
    docs = load_documents(data_cfg, tokenizer, meta.get("text_field"))
    if settings.data is None:  # the documents after the last collected one are unseen by the SAE
        start = store.shards[-1].next_doc
        docs = docs[start:] if len(docs) - start >= settings.docs else docs[-settings.docs :]
    return AdapterEffect(model, docs[: settings.docs], tokenizer.pad_token_id)


def train_from_store(
    activations: str,
    out: str,
    sae_cfg: dict,
    trainer_cfg: SAETrainerConfig,
    effect: EffectSettings | None,
    seed: int = 0,
) -> dict:
    store = ActivationStore(activations)
    d_in = len(store.adapter_names)
    expansion = sae_cfg.pop("expansion")
    cfg = SparseAutoencoderConfig(d_in=d_in, d_sae=d_in * expansion, **sae_cfg)
    if store.n_tokens < trainer_cfg.batch_size:
        raise SAEError(f"{activations}: {store.n_tokens} tokens is less than one batch (--batch-size {trainer_cfg.batch_size})")
    torch.manual_seed(seed)
    sae = SparseAutoencoder(cfg, seed=seed)
    evaluate = build_effect(store, effect) if effect is not None else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "train_log.jsonl").open("w")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    state = train_sae(
        sae,
        store.batches(trainer_cfg.batch_size, seed=seed),
        trainer_cfg,
        total_steps=store.n_tokens // trainer_cfg.batch_size,
        evaluate=evaluate,
        log=log,
    )
    log_file.close()
    metadata = {"model_name": store.meta["model"], "hook_name": "lora_A (all rank-1 adapters)", "adapter": store.meta["adapter"]}
    extras = {
        "adapter_names": store.adapter_names,
        "activations": str(Path(activations).resolve()),
        "trainer": dataclasses.asdict(trainer_cfg),
        "history": state.history,
        "input_scale": float(sae.scale),
    }
    save_sae(sae, out_dir, metadata, extras)
    return {"out": str(out_dir), "steps": state.step, "tokens": state.tokens, "last": state.history[-1] if state.history else {}}
