"""Activations on disk: sharded safetensors files plus a manifest of the complete shards.

Each shard holds, for a run of whole batches of documents:
    adapter    float32 (tokens, n_adapters)   s = A·x of every rank-1 adapter
    neurons    float32 (tokens, n_neurons)    baseline MLP neurons (first up_proj channels per layer)
    token_ids  int32   (tokens,)
    doc_ids    int64   (tokens,)              index of the document in the data set
    positions  int32   (tokens,)              offset of the token in its document
Every token of every document is stored, so documents are whole (concept labels need the whole text). The
first `skip_positions` positions of each document (meta; sae.collect.skip_positions) are the attention
sink: every reader leaves them out — SAE training (batches), the adapter effect, analysis and concept
scores (kept(), kept_index) — so one setting, recorded with the collection, applies everywhere.
`manifest.json` lists the shards in order; a shard is written to a temporary name and renamed, then
the manifest is rewritten the same way, so a crash never leaves a listed shard half-written.
"""

from __future__ import annotations

import functools
import json
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rank1.sae.errors import SAEError

MANIFEST = "manifest.json"
FIELDS = ("adapter", "neurons", "token_ids", "doc_ids", "positions")


@dataclass
class ShardInfo:
    file: str
    tokens: int
    first_doc: int
    next_doc: int  # the document to start from after this shard
    full: bool  # closed because it reached shard_tokens (a short last shard is redone on resume)


def write_json_atomic(path: Path, data) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


class ShardWriter:
    """Appends shards to `out_dir`, continuing after the last full shard of a previous run."""

    def __init__(self, out_dir: str | Path, meta: dict, shard_tokens: int):
        self.dir = Path(out_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta, shard_tokens=shard_tokens)
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        manifest = self.dir / MANIFEST
        if manifest.is_file():
            old = json.loads(manifest.read_text())
            changed = {k: (old["meta"].get(k), v) for k, v in self.meta.items() if old["meta"].get(k) != v}
            if changed:
                detail = "; ".join(f"{k}: {a!r} -> {b!r}" for k, (a, b) in changed.items())
                raise SAEError(f"{self.dir}: holds a collection made with other settings ({detail}); use a new --out")
            self.shards = [ShardInfo(**s) for s in old["shards"]]
            while self.shards and not self.shards[-1].full:  # redo a short tail shard so runs line up
                (self.dir / self.shards.pop().file).unlink(missing_ok=True)
        self._buffer: dict[str, list[torch.Tensor]] = {f: [] for f in FIELDS}
        self._buffered = 0
        self._first_doc = self.next_doc

    @property
    def next_doc(self) -> int:
        return self.shards[-1].next_doc if self.shards else 0

    @property
    def tokens(self) -> int:
        return sum(s.tokens for s in self.shards) + self._buffered

    def add(self, next_doc: int, **tensors: torch.Tensor) -> None:
        """Buffer one batch of documents (all fields, same token count); close a shard when full."""
        for name in FIELDS:
            self._buffer[name].append(tensors[name])
        self._buffered += len(tensors["token_ids"])
        self._next_doc = next_doc
        if self._buffered >= self.shard_tokens:
            self._close(full=True)

    def finish(self, done: bool) -> None:
        """Write what is buffered as a short shard; `done` marks the data set as fully collected."""
        if self._buffered:
            self._close(full=False)
        self._write_manifest(done)

    def _close(self, full: bool) -> None:
        info = ShardInfo(f"shard_{len(self.shards):05d}.safetensors", self._buffered, self._first_doc, self._next_doc, full)
        data = {name: torch.cat(parts).contiguous() for name, parts in self._buffer.items()}
        tmp = self.dir / (info.file + ".tmp")
        save_file(data, str(tmp))
        os.replace(tmp, self.dir / info.file)
        self.shards.append(info)
        self._write_manifest(done=False)
        self._buffer = {f: [] for f in FIELDS}
        self._buffered = 0
        self._first_doc = self._next_doc

    def _write_manifest(self, done: bool) -> None:
        write_json_atomic(
            self.dir / MANIFEST,
            {"meta": self.meta, "shards": [asdict(s) for s in self.shards], "tokens": sum(s.tokens for s in self.shards), "done": done},
        )


class ActivationStore:
    """Read access to a collection: shard by shard, shuffled batches, or gathered rows."""

    def __init__(self, path: str | Path):
        self.dir = Path(path)
        manifest = self.dir / MANIFEST
        if not manifest.is_file():
            raise SAEError(f"{self.dir}: no {MANIFEST} (not an activation collection; run `rank1 sae collect` first)")
        data = json.loads(manifest.read_text())
        self.meta: dict = data["meta"]
        self.shards = [ShardInfo(**s) for s in data["shards"]]
        if not self.shards or sum(s.tokens for s in self.shards) == 0:
            raise SAEError(f"{self.dir}: the collection holds no activations (0 tokens)")
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s.tokens)

    @property
    def n_tokens(self) -> int:
        return self.offsets[-1]

    @property
    def skip_positions(self) -> int:
        """Positions below this are left out by every reader (collections made before the setting: 0)."""
        return int(self.meta.get("skip_positions", 0))

    def kept(self, positions: torch.Tensor) -> torch.Tensor:
        """True where a token is read (its position is not an attention-sink position)."""
        return positions >= self.skip_positions

    @functools.cached_property
    def kept_index(self) -> torch.Tensor:
        """Global indices of every kept token, in order."""
        parts = [offset + self.kept(shard["positions"]).nonzero()[:, 0] for offset, shard in self.iter_shards(("positions",))]
        return torch.cat(parts).long()

    @property
    def n_kept(self) -> int:
        return len(self.kept_index)

    @property
    def adapter_names(self) -> list[str]:
        return self.meta["adapter_names"]

    @property
    def neuron_names(self) -> list[str]:
        return self.meta.get("neuron_names", [])

    def load_shard(self, i: int, fields=FIELDS, check_finite: bool = True) -> dict[str, torch.Tensor]:
        path = self.dir / self.shards[i].file
        if not path.is_file():
            raise SAEError(f"{path}: listed in {MANIFEST} but missing")
        with safe_open(str(path), framework="pt") as f:
            out = {name: f.get_tensor(name) for name in fields}
        if check_finite:
            for name in ("adapter", "neurons"):
                if name in out and not torch.isfinite(out[name]).all():
                    bad = (~torch.isfinite(out[name])).nonzero()[0].tolist()
                    raise SAEError(
                        f"{path}: field '{name}' holds NaN or inf values (first at token {bad[0]}, column {bad[1]}); "
                        "the activations cannot be used"
                    )
        return out

    def iter_shards(self, fields=FIELDS) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(global index of the shard's first token, tensors) for each shard in order."""
        for i in range(len(self.shards)):
            yield self.offsets[i], self.load_shard(i, fields)

    def iter_chunks(self, fields, chunk_tokens: int) -> Iterator[tuple[int, dict[str, torch.Tensor]]]:
        """(global index of the first token, tensors) for runs of whole documents of about chunk_tokens tokens.

        A shard holds whole documents, so cutting at the first document start after chunk_tokens keeps every
        document inside one chunk (per-document reductions need no carry-over)."""
        fields = tuple(dict.fromkeys((*fields, "doc_ids")))
        for offset, shard in self.iter_shards(fields):
            docs, start = shard["doc_ids"], 0
            while start < len(docs):
                stop = min(start + chunk_tokens, len(docs))
                while stop < len(docs) and docs[stop] == docs[stop - 1]:
                    stop += 1
                yield offset + start, {name: value[start:stop] for name, value in shard.items()}
                start = stop

    def batches(self, batch_size: int, field: str = "adapter", seed: int = 0, window: int = 4, drop_last: bool = True) -> Iterator[torch.Tensor]:
        """One epoch of the kept rows of `field`, shuffled within windows of `window` shards (RAM stays bounded)."""
        rng = random.Random(seed)
        order = list(range(len(self.shards)))
        rng.shuffle(order)
        gen = torch.Generator().manual_seed(seed)
        carry = None
        for start in range(0, len(order), window):
            shards = [self.load_shard(i, (field, "positions")) for i in order[start : start + window]]
            rows = torch.cat([s[field][self.kept(s["positions"])] for s in shards])
            rows = rows[torch.randperm(len(rows), generator=gen)]
            if carry is not None:
                rows = torch.cat([carry, rows])
            usable = len(rows) - len(rows) % batch_size
            for b in range(0, usable, batch_size):
                yield rows[b : b + batch_size]
            carry = rows[usable:]
        if carry is not None and len(carry) and not drop_last:
            yield carry

    def gather(self, indices: torch.Tensor, fields=("token_ids", "doc_ids")) -> dict[str, torch.Tensor]:
        """Rows at global token `indices` (any order), loading each needed shard once."""
        indices = indices.long()
        offsets = torch.tensor(self.offsets)
        shard_of = torch.bucketize(indices, offsets[1:], right=True)
        out: dict[str, torch.Tensor] = {}
        for s in shard_of.unique().tolist():
            mask = shard_of == s
            data = self.load_shard(s, fields, check_finite=False)
            for name in fields:
                if name not in out:
                    out[name] = torch.zeros((len(indices),) + data[name].shape[1:], dtype=data[name].dtype)
                out[name][mask] = data[name][indices[mask] - self.offsets[s]]
        return out
