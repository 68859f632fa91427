"""`rank1 sae analyze`: top activating examples, histograms and density of every feature.

Features come from three sources, each read as non-negative values:
    adapter   each rank-1 adapter direction, its positive and negative side separately (s⁺, s⁻)
    latent    each SAE latent (inference rule)
    neuron    the baseline MLP neurons (first up_proj channels per layer), both sides too
Two streaming passes over the shards (top-k + density, then histograms), in chunks of whole documents, so
RAM stays bounded by a chunk of tokens × features. Attention-sink positions (store.skip_positions) read as
0 everywhere. Top examples are the best token of each of the top_k best *documents* (one example per
document, so near-duplicates of one text cannot fill the list or leak between explanation and scoring
sets). Contexts are ±`context` tokens within the same document, with the feature's value on every context
token. Each random-pool window also records every feature's maximum over the whole window
(`random_window_max`): a window is a negative for a feature only when that maximum is 0.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

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


def _chunk_values(store: ActivationStore, source: Source) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """(global index of the first token, values with sink positions zeroed, doc_ids) per chunk of whole documents."""
    for start, chunk in store.iter_chunks((source.field, "positions"), CHUNK):
        values = source.values(chunk[source.field]) * store.kept(chunk["positions"])[:, None]
        yield start, values, chunk["doc_ids"]


def _best_per_document(values: torch.Tensor, docs: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(D, F) maximum of each feature in each of the chunk's D documents, and the global index of its first maximum."""
    local = torch.unique_consecutive(docs, return_inverse=True)[1][:, None].expand_as(values)
    n_docs = int(local[-1, 0]) + 1
    best = torch.zeros(n_docs, values.shape[1]).scatter_reduce_(0, local, values, "amax")
    index = torch.arange(start, start + len(values))[:, None].expand_as(values)
    at_best = torch.where(values == best.gather(0, local), index, torch.iinfo(torch.long).max)
    where = torch.full_like(best, torch.iinfo(torch.long).max, dtype=torch.long).scatter_reduce_(0, local, at_best, "amin")
    return best, where


@torch.no_grad()
def _scan(store: ActivationStore, source: Source, settings: SAEAnalyzeConfig, pool_windows: tuple, bar) -> dict:
    F, K = source.n_features, settings.top_k
    top_vals, top_idx = torch.zeros(0, F), torch.zeros(0, F, dtype=torch.long)
    active, maxima = torch.zeros(F, dtype=torch.long), torch.zeros(F)
    window_of, window_token, n_windows = pool_windows
    window_max = torch.zeros(n_windows, F)
    for start, values, docs in _chunk_values(store, source):
        active += (values > 0).sum(0)
        maxima = torch.maximum(maxima, values.max(0).values)
        best, where = _best_per_document(values, docs, start)
        vals, idx = torch.cat([top_vals, best]), torch.cat([top_idx, where])
        top_vals, order = vals.topk(min(K, len(vals)), dim=0)
        top_idx = idx.gather(0, order)
        inside = (window_token >= start) & (window_token < start + len(values))
        window_max.scatter_reduce_(0, window_of[inside, None].expand(-1, F), values[window_token[inside] - start], "amax")
        bar.update(len(values))
    return {"top_vals": top_vals, "top_idx": top_idx, "active": active, "max": maxima, "window_max": window_max}


@torch.no_grad()
def _histograms(store: ActivationStore, source: Source, maxima: torch.Tensor, bins: int) -> torch.Tensor:
    F = source.n_features
    counts = torch.zeros(F * bins, dtype=torch.long)
    width = (maxima / bins).clamp(min=1e-12)
    for _, values, _ in _chunk_values(store, source):
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
    values = source.pair_values(rows, features[:, None].expand_as(idx).flatten()) * store.kept(got["positions"])
    values = values.view(idx.shape)
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


def _pool_windows(store: ActivationStore, pool: torch.Tensor, context: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(window number, global token index) of every token of every pool window, as _examples cuts them; the window count."""
    idx, same = _windows(store, pool, context)
    return torch.arange(len(pool))[:, None].expand_as(idx)[same], idx[same], len(pool)


def analyze(store: ActivationStore, sae: SparseAutoencoder | None, tokenizer, settings: SAEAnalyzeConfig, seed: int = 0,
            progress: bool = True) -> dict:
    gen = torch.Generator().manual_seed(seed)
    kept = store.kept_index
    pool = kept[torch.randperm(len(kept), generator=gen)[: min(settings.random_examples, len(kept))]].sort().values
    pool_examples = [
        {"index": e["index"], "doc": e["doc"], "pos": e["pos"], "tokens": e["tokens"], "center": e["center"]}
        for e in _examples(store, Source("adapter", "adapter", store.adapter_names, True), pool, torch.zeros_like(pool), settings.context)
    ]
    pool_windows = _pool_windows(store, pool, settings.context)
    features, vocab = [], set()
    for e in pool_examples:
        vocab.update(e["tokens"])
    for source in sources_for(store, sae):
        bar = tqdm(total=store.n_tokens, unit="tok", disable=not progress, desc=f"analyze {source.name}")
        scan = _scan(store, source, settings, pool_windows, bar)
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
                    "density": float(scan["active"][f]) / store.n_kept,
                    "max": float(scan["max"][f]),
                    "histogram": {"max": float(scan["max"][f]), "bins": settings.bins, "counts": hist[f].tolist()},
                    "examples": by_feature[f],
                    "random_window_max": [round(v, 5) for v in scan["window_max"][:, f].tolist()],
                })
    return {
        "meta": {"activations": str(store.dir), "tokens": store.n_kept, "model": store.meta.get("model"), "adapter": store.meta.get("adapter"),
                 "skip_positions": store.skip_positions, **dataclasses.asdict(settings), "seed": seed},
        "vocab": {str(t): tokenizer.decode([t]) for t in sorted(vocab)},
        "random_pool": pool_examples,
        "features": features,
    }


def write_json(data: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path
