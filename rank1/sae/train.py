"""`rank1 sae train`: an SAE on a collection's adapter activations, saved in SAELens' format."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from pathlib import Path
from typing import Callable

import torch

from rank1.core.config import DataConfig, ModelConfig, SAETrainConfig
from rank1.sae.documents import load_documents
from rank1.sae.effect import AdapterEffect
from rank1.sae.errors import SAEError
from rank1.sae.loading import load_for_study
from rank1.sae.sae import SparseAutoencoder, SparseAutoencoderConfig
from rank1.sae.saelens_format import save_sae
from rank1.sae.store import ActivationStore
from rank1.sae.trainer import train_sae

EFFECT_MAX_LENGTH = 256  # tokens per held-out document for the adapter effect


def data_label(data: str) -> str:
    """A short key suffix for a data set: 'arithmetic', or '<folder>-<stem>' of a file (gsm8k-test)."""
    path = Path(data)
    if not path.suffix:
        return data
    return f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem


def build_effects(store: ActivationStore, eval_data: list[str], docs_wanted: int, adapter: str | None = None) -> Callable[[SparseAutoencoder], dict]:
    """The adapter effect on the collection's own data past what it collected (plain keys, e.g. effect_recovered)
    and on every `eval_data` set (keys suffixed '@label', e.g. effect_recovered@gsm8k-test), one model for all."""
    meta = store.meta
    labels = [data_label(d) for d in eval_data]
    if len(set(labels)) < len(labels):
        raise SAEError(f"--eval-data {', '.join(eval_data)}: two data sets would log under the same name ({', '.join(labels)})")
    model, tokenizer, _, _ = load_for_study(adapter or meta["adapter"], ModelConfig(name_or_path=meta["model"]))
    effects: dict[str, AdapterEffect] = {}
    for data in [None, *eval_data]:
        path = data or meta["data"]
        data_cfg = DataConfig(path=path, format=meta.get("data_format", "auto") if data is None else "auto", max_length=EFFECT_MAX_LENGTH)
        docs = load_documents(data_cfg, tokenizer, meta.get("text_field") if data is None else None)
        if path == meta["data"]:  # the documents after the last collected one are unseen by the SAE
            start = store.shards[-1].next_doc
            docs = docs[start:] if len(docs) - start >= docs_wanted else docs[-docs_wanted:]
        suffix = "" if data is None else "@" + data_label(data)
        effects[suffix] = AdapterEffect(model, docs[:docs_wanted], tokenizer.pad_token_id, skip_positions=store.skip_positions)

    def evaluate(sae: SparseAutoencoder) -> dict:
        return {key + suffix: value for suffix, effect in effects.items() for key, value in effect(sae).items()}

    return evaluate


def sae_config(cfg: SAETrainConfig, d_in: int) -> SparseAutoencoderConfig:
    return SparseAutoencoderConfig(d_in=d_in, d_sae=d_in * cfg.expansion, k=cfg.k, architecture=cfg.architecture,
                                   normalize_activations=cfg.normalize, l1_coefficient=cfg.l1_coefficient)


def train_from_store(trainer_cfg: SAETrainConfig, seed: int = 0, progress: bool = True) -> dict:
    activations, out = trainer_cfg.activations, trainer_cfg.out
    store = ActivationStore(activations)
    cfg = sae_config(trainer_cfg, len(store.adapter_names))
    if store.n_kept < trainer_cfg.batch_size:
        raise SAEError(f"{activations}: {store.n_kept} tokens is less than one batch (--batch-size {trainer_cfg.batch_size})")
    torch.manual_seed(seed)
    sae = SparseAutoencoder(cfg, seed=seed)
    evaluate = build_effects(store, trainer_cfg.eval_data, trainer_cfg.eval_docs) if trainer_cfg.effect else None
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    log_file = (out_dir / "train_log.jsonl").open("w")

    def log(record: dict) -> None:
        log_file.write(json.dumps(record) + "\n")
        log_file.flush()

    # A small collection is passed over several times (a new shuffle each pass) up to train_tokens.
    per_pass = store.n_kept // trainer_cfg.batch_size
    passes = max(1, math.ceil(trainer_cfg.train_tokens / (per_pass * trainer_cfg.batch_size)))
    stream = itertools.chain.from_iterable(store.batches(trainer_cfg.batch_size, seed=seed + p) for p in range(passes))
    state = train_sae(
        sae,
        stream,
        trainer_cfg,
        total_steps=per_pass * passes,
        evaluate=evaluate,
        log=log,
        progress=progress,
    )
    log_file.close()
    metadata = {"model_name": store.meta["model"], "hook_name": "lora_A (all rank-1 adapters)", "adapter": store.meta["adapter"]}
    extras = {
        "adapter_names": store.adapter_names,
        "activations": str(Path(activations).resolve()),
        "trainer": dataclasses.asdict(trainer_cfg),
        "history": state.history,
        "input_scale": float(sae.scale),
        "passes": passes,
    }
    save_sae(sae, out_dir, metadata, extras)
    return {"out": str(out_dir), "steps": state.step, "tokens": state.tokens, "last": state.history[-1] if state.history else {}}
