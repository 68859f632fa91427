"""`rank1 sae analyze`: top activating examples, histograms and density of every feature.

Features come from three sources, each read as non-negative values:
    adapter   each rank-1 adapter direction, its positive and negative side separately (s⁺, s⁻)
    latent    each SAE latent (inference rule)
    neuron    the baseline MLP neurons (first up_proj channels per layer), both sides too
Two streaming passes over the shards (top-k + density, then histograms), so RAM stays bounded by a
chunk of tokens × features. Contexts are ±`context` tokens within the same document, with the
feature's value on every context token.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rank1.core.config import SAEAnalyzeConfig
from rank1.sae.errors import SAEError
from rank1.sae.sae import SparseAutoencoder
from rank1.sae.store import ActivationStore

CHUNK = 8192  # tokens per step of a pass
FEATURE_GROUP = 256  # features whose example contexts are gathered together


@dataclass
class Source:
    name: str  # adapter | latent | neuron
    field: str  # store field the values are computed from
    columns: list[str]  # names of the underlying columns
    signed: bool
    sae: SparseAutoencoder | None = None

    @property
    def n_features(self) -> int:
        return len(self.columns) * (2 if self.signed else 1)

    def values(self, rows: torch.Tensor) -> torch.Tensor:
        """(tokens, n_features) non-negative values from (tokens, d) rows of `field`."""
        if self.sae is not None:
            return self.sae.encode(rows)
        return torch.cat([rows.relu(), (-rows).relu()], dim=1) if self.signed else rows.relu()

    def pair_values(self, rows: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """values(rows)[i, features[i]] without computing every feature."""
        if self.sae is not None:
            return self.sae.latent_values(rows, features)
        n = len(self.columns)
        col, negative = features % n, features >= n
        picked = rows.gather(1, col[:, None])[:, 0]
        return torch.where(negative, -picked, picked).relu()

    def describe(self, f: int) -> dict:
        if self.sae is not None:
            return {"id": f"latent:{f}", "source": "latent", "index": f, "sign": "+", "name": f"SAE latent {f}"}
        n = len(self.columns)
        sign = "-" if f >= n else "+"
        return {"id": f"{self.name}:{f % n}:{sign}", "source": self.name, "index": f % n, "sign": sign, "name": self.columns[f % n]}


def sources_for(store: ActivationStore, sae: SparseAutoencoder | None) -> list[Source]:
    out = [Source("adapter", "adapter", store.adapter_names, signed=True)]
    if sae is not None:
        if sae.cfg.d_in != len(store.adapter_names):
            raise SAEError(f"the SAE reads {sae.cfg.d_in} adapter dims but the collection has {len(store.adapter_names)}")
        out.append(Source("latent", "adapter", [f"latent {i}" for i in range(sae.cfg.d_sae)], signed=False, sae=sae))
    if store.neuron_names:
        out.append(Source("neuron", "neurons", store.neuron_names, signed=True))
    return out


@torch.no_grad()
def _scan(store: ActivationStore, source: Source, settings: SAEAnalyzeConfig, pool: torch.Tensor, bar) -> dict:
    F, K = source.n_features, settings.top_k
    top_vals, top_idx = torch.zeros(0, F), torch.zeros(0, F, dtype=torch.long)
    active, maxima = torch.zeros(F, dtype=torch.long), torch.zeros(F)
    pool_values = torch.zeros(len(pool), F)
    for offset, shard in store.iter_shards((source.field,)):
        rows = shard[source.field]
        for start in range(0, len(rows), CHUNK):
            values = source.values(rows[start : start + CHUNK])
            index = torch.arange(offset + start, offset + start + len(values))
            active += (values > 0).sum(0)
            maxima = torch.maximum(maxima, values.max(0).values)
            vals = torch.cat([top_vals, values])
            idx = torch.cat([top_idx, index[:, None].expand_as(values)])
            top_vals, order = vals.topk(min(K, len(vals)), dim=0)
            top_idx = idx.gather(0, order)
            in_chunk = (pool >= index[0]) & (pool <= index[-1])
            pool_values[in_chunk] = values[pool[in_chunk] - index[0]]
        bar.update(len(rows))
    return {"top_vals": top_vals, "top_idx": top_idx, "active": active, "max": maxima, "pool_values": pool_values}


@torch.no_grad()
def _histograms(store: ActivationStore, source: Source, maxima: torch.Tensor, bins: int) -> torch.Tensor:
    F = source.n_features
    counts = torch.zeros(F * bins, dtype=torch.long)
    width = (maxima / bins).clamp(min=1e-12)
    for _, shard in store.iter_shards((source.field,)):
        rows = shard[source.field]
        for start in range(0, len(rows), CHUNK):
            values = source.values(rows[start : start + CHUNK])
            hit = values > 0
            b = (values / width).long().clamp(max=bins - 1)
            flat = (torch.arange(F) * bins).expand_as(b)[hit] + b[hit]
            counts += torch.bincount(flat, minlength=F * bins)
    return counts.view(F, bins)


def _windows(store: ActivationStore, centers: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, 2·context+1) global indices around each center, and a mask of those in the same document."""
    offsets = torch.arange(-context, context + 1)
    idx = (centers[:, None] + offsets).clamp(0, store.n_tokens - 1)
    docs = store.gather(idx.flatten(), ("doc_ids",))["doc_ids"].view(idx.shape)
    same = (docs == docs[:, context : context + 1]) & (centers[:, None] + offsets >= 0) & (centers[:, None] + offsets < store.n_tokens)
    return idx, same


def _examples(store: ActivationStore, source: Source, centers: torch.Tensor, features: torch.Tensor, context: int) -> list[dict]:
    idx, same = _windows(store, centers, context)
    got = store.gather(idx.flatten(), ("token_ids", "doc_ids", "positions", source.field))
    rows = got[source.field]
    values = source.pair_values(rows, features[:, None].expand_as(idx).flatten()).view(idx.shape)
    tokens = got["token_ids"].view(idx.shape)
    out = []
    for i in range(len(centers)):
        keep = same[i]
        out.append({
            "index": int(centers[i]),
            "doc": int(got["doc_ids"].view(idx.shape)[i, context]),
            "pos": int(got["positions"].view(idx.shape)[i, context]),
            "activation": round(float(values[i, context]), 5),
            "tokens": tokens[i][keep].tolist(),
            "values": [round(v, 4) for v in values[i][keep].tolist()],
            "center": int(keep[:context].sum()),
        })
    return out


def analyze(store: ActivationStore, sae: SparseAutoencoder | None, tokenizer, settings: SAEAnalyzeConfig, seed: int = 0,
            progress: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    n_pool = min(settings.random_examples, store.n_tokens)
    pool = torch.randperm(store.n_tokens, generator=gen)[:n_pool].sort().values
    pool_examples = [
        {"index": e["index"], "doc": e["doc"], "pos": e["pos"], "tokens": e["tokens"], "center": e["center"]}
        for e in _examples(store, Source("adapter", "adapter", store.adapter_names, True), pool, torch.zeros_like(pool), settings.context)
    ]
    features, vocab = [], set()
    for e in pool_examples:
        vocab.update(e["tokens"])
    for source in sources_for(store, sae):
        bar = tqdm(total=store.n_tokens, unit="tok", disable=not progress, desc=f"analyze {source.name}")
        scan = _scan(store, source, settings, pool, bar)
        bar.close()
        hist = _histograms(store, source, scan["max"], settings.bins)
        F = source.n_features
        chosen = range(F) if settings.max_features_per_source is None else range(min(F, settings.max_features_per_source))
        chosen = list(chosen)
        for group_start in range(0, len(chosen), FEATURE_GROUP):  # one gather per group of features
            group = chosen[group_start : group_start + FEATURE_GROUP]
            pairs = [(int(c), f) for f in group for c, v in zip(scan["top_idx"][:, f], scan["top_vals"][:, f]) if v > 0]
            centers = torch.tensor([c for c, _ in pairs], dtype=torch.long)
            owners = torch.tensor([f for _, f in pairs], dtype=torch.long)
            found = _examples(store, source, centers, owners, settings.context) if pairs else []
            by_feature: dict[int, list] = {f: [] for f in group}
            for (_, f), e in zip(pairs, found):
                by_feature[f].append(e)
                vocab.update(e["tokens"])
            for f in group:
                features.append({
                    **source.describe(f),
                    "density": float(scan["active"][f]) / store.n_tokens,
                    "max": float(scan["max"][f]),
                    "histogram": {"max": float(scan["max"][f]), "bins": settings.bins, "counts": hist[f].tolist()},
                    "examples": by_feature[f],
                    "random_values": [round(v, 5) for v in scan["pool_values"][:, f].tolist()],
                })
    return {
        "meta": {"activations": str(store.dir), "tokens": store.n_tokens, "model": store.meta.get("model"), "adapter": store.meta.get("adapter"),
                 **dataclasses.asdict(settings), "seed": seed},
        "vocab": {str(t): tokenizer.decode([t]) for t in sorted(vocab)},
        "random_pool": pool_examples,
        "features": features,
    }


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
