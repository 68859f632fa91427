"""An LLM-free interpretability score: how well a feature's firing matches a concept the data defines exactly.

Tokens are labelled from the decoded conversation as collected (ChatML: `<|im_start|>role\\n content
<|im_end|>\\n`, as SmolLM2 and Qwen2.5 render it). Each token's text is its own decode; the document text is
their concatenation, so a token spans exactly its own characters (a run of tokens that only decode
together, a multi-byte character split by byte-level BPE, is decoded jointly and every token of it spans the
whole run). A token carries a concept when it overlaps at least one character of it. Concepts:

    template            chat-template text: `<|im_start|>` + role word (system|user|assistant|tool) + the
                        newline after it, and `<|im_end|>` + the newline after it (the `<|im_start|>` of an
                        s1K think marker is data, so think_delimiter, not template)
    end_of_turn         the `<|im_end|>` marker alone
    system / question / answer   the content of system / user / assistant turns (without template text);
                        the default system prompt a template inserts counts as system content
    operator            + - * / × ÷ between two operands: after a digit, ')' or '%', before a digit, '(', '.'
                        or '$' (spaces allowed around it); also ' x ' between numbers (GSM8K writes 0.2 x 50).
                        So hyphens, list bullets, markdown '*' and negative signs are not operators
    equals              every '='
    digit               every ASCII digit 0-9
    operand_digit       digits in user turns (the numbers the question gives)
    step_result_digit   digits of a step's result: in an assistant turn, each line holding '=' is a step and
                        its result is the number right after the line's last '=' ('$' and '-' allowed)
    intermediate_digit  step_result_digit of every step but the last one of its turn (the last step's result
                        is usually the final answer)
    final_digit         digits of the number after a '####' marker, and digits inside `\\boxed{...}`
    hashes              a '####' marker (exactly four '#') in an assistant turn
    step_boundary       newlines in assistant content, other than those inside think delimiters
    think_delimiter     the `think_open` / `think_close` strings (s1K traces), wherever they occur
    thinking            assistant text between a think_open and the next think_close (or the end of its turn)

Scoring: for each feature (non-negative values, e.g. analyze.Source.values), the concept and threshold that
maximise F1 of (value ≥ threshold and value > 0) are chosen on the training tokens; F1, precision and recall
are reported for that choice on the held-out tokens, which are whole documents (heldout_split), so a
feature cannot be fitted to the documents it is judged on. Candidate thresholds are 0 (any activation) and
every edge of a log grid, 8 per octave from 2^-16 to 2^16 — so every quantile of the feature's values to
within 9 % — counted in one streaming pass from per-concept histograms (ConceptScorer).
"""

from __future__ import annotations

import re
from typing import Iterable, Sequence

import numpy as np
import torch

from rank1.sae.analyze import Source, sources_for
from rank1.sae.errors import SAEError
from rank1.sae.sae import SparseAutoencoder
from rank1.sae.store import ActivationStore

CONCEPTS = ("template", "end_of_turn", "system", "question", "answer", "operator", "equals", "digit", "operand_digit",
            "step_result_digit", "intermediate_digit", "final_digit", "hashes", "step_boundary", "think_delimiter", "thinking")
IM_END = "<|im_end|>"
_HEADER = re.compile(r"<\|im_start\|>(system|user|assistant|tool)\n")
_END = re.compile(r"<\|im_end\|>\n?")
_OPERATOR = re.compile(r"[0-9)%]([ \t]*)([+\-*/×÷x])([ \t]*)(?=[0-9(.$])")
_RESULT = re.compile(r"[ \t]*\$?-?([0-9]+(?:[.,][0-9]+)*)")
_FINAL = re.compile(r"(?<!#)####(?!#)[ \t]*\$?-?([0-9]+(?:[.,][0-9]+)*)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")
CHUNK = 4096  # tokens per step of a pass
BINS_PER_OCTAVE, EXPONENT = 8, 16  # threshold candidates 2^(j/8) for j/8 in [-16, 16]: 9 % apart
EDGES = (2.0 ** (torch.arange(-EXPONENT * BINS_PER_OCTAVE, EXPONENT * BINS_PER_OCTAVE + 1, dtype=torch.float64) / BINS_PER_OCTAVE)).float()
LOWER = torch.cat([torch.zeros(1), EDGES])  # bin b holds values in [LOWER[b], LOWER[b + 1]); bin 0: below 2^-16
N_BINS = len(LOWER)


# ---------------------------------------------------------------- token labels


def decode_pieces(tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token decoded on its own (one call; no clean-up, which would drop spaces before punctuation)."""
    return tokenizer.batch_decode([[int(i)] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _spans(ids: Sequence[int], pieces: Sequence[str], tokenizer) -> tuple[str, np.ndarray, np.ndarray]:
    """Document text and each token's [start, end) in it."""
    parts, starts, ends, pos, i = [], [], [], 0, 0
    while i < len(ids):
        j = i + 1
        piece = pieces[i]
        if "\ufffd" in piece:  # part of a character split over tokens: decode the run together
            while j < len(ids) and "\ufffd" in pieces[j]:
                j += 1
            if j - i > 1:
                piece = tokenizer.decode([int(t) for t in ids[i:j]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        parts.append(piece)
        starts += [pos] * (j - i)
        pos += len(piece)
        ends += [pos] * (j - i)
        i = j
    return "".join(parts), np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64)


def _codes(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)


def _character_flags(text: str, think_open: str, think_close: str) -> dict[str, np.ndarray]:
    flags = {name: np.zeros(len(text), dtype=bool) for name in CONCEPTS}
    codes = _codes(text)
    flags["digit"] = (codes >= ord("0")) & (codes <= ord("9"))
    flags["equals"] = codes == ord("=")
    for m in _OPERATOR.finditer(text):
        if m.group(2) != "x" or (m.group(1) and m.group(3)):
            flags["operator"][m.start(2)] = True
    for marker in (think_open, think_close):
        for m in re.finditer(re.escape(marker), text) if marker else ():
            flags["think_delimiter"][m.start() : m.end()] = True
    for m in _END.finditer(text):
        flags["template"][m.start() : m.end()] = True
        flags["end_of_turn"][m.start() : m.start() + len(IM_END)] = True
    for m in _HEADER.finditer(text):
        flags["template"][m.start() : m.end()] = True
        start, role = m.end(), m.group(1)
        end = text.find(IM_END, start)
        end = len(text) if end < 0 else end
        if role == "system":
            flags["system"][start:end] = True
        elif role == "user":
            flags["question"][start:end] = True
            flags["operand_digit"][start:end] = flags["digit"][start:end]
        elif role == "assistant":
            flags["answer"][start:end] = True
            _assistant(text, start, end, flags, think_open, think_close)
    return flags


def _assistant(text: str, start: int, end: int, flags: dict[str, np.ndarray], think_open: str, think_close: str) -> None:
    """Step, result and final-answer concepts of the assistant content text[start:end]."""
    content = text[start:end]

    def digits(name: str, a: int, b: int) -> None:
        flags[name][a:b] |= flags["digit"][a:b]

    flags["step_boundary"][start:end] = (_codes(content) == ord("\n")) & ~flags["think_delimiter"][start:end]
    results, line_start = [], start
    for line in content.split("\n"):
        if "=" in line:
            m = _RESULT.match(text, line_start + line.rindex("=") + 1, end)
            if m:
                results.append(m.span(1))
        line_start += len(line) + 1
    for i, (a, b) in enumerate(results):
        digits("step_result_digit", a, b)
        if i < len(results) - 1:
            digits("intermediate_digit", a, b)
    for m in _FINAL.finditer(content):
        flags["hashes"][start + m.start() : start + m.start() + 4] = True
        if m.group(1):
            digits("final_digit", start + m.start(1), start + m.end(1))
    for m in _BOXED.finditer(content):
        digits("final_digit", start + m.start(1), start + m.end(1))
    for m in re.finditer(re.escape(think_open), content) if think_open else ():
        stop = content.find(think_close, m.end()) if think_close else -1
        flags["thinking"][start + m.end() : start + (len(content) if stop < 0 else stop)] = True


def label_tokens(token_ids: Sequence[int], tokenizer, think_open: str = "<|im_start|>think", think_close: str = "<|im_start|>answer",
                 pieces: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Per-token boolean labels (CONCEPTS) of one whole document; `pieces` = decode_pieces(tokenizer, ids) if known."""
    ids = [int(i) for i in token_ids]
    text, starts, ends = _spans(ids, decode_pieces(tokenizer, ids) if pieces is None else pieces, tokenizer)
    flags = _character_flags(text, think_open, think_close)
    stacked = np.stack([flags[name] for name in CONCEPTS]).astype(np.int32)
    cum = np.concatenate([np.zeros((len(CONCEPTS), 1), dtype=np.int64), stacked.cumsum(1)], axis=1)
    overlap = cum[:, ends] > cum[:, starts]
    return {name: overlap[i] for i, name in enumerate(CONCEPTS)}


def heldout_split(doc_ids, fraction: float = 0.3, seed: int = 0) -> np.ndarray:
    """(T,) True on the tokens of a random `fraction` of the documents (at least one held out and one kept)."""
    doc_ids = np.asarray(doc_ids)
    docs = np.unique(doc_ids)
    if len(docs) < 2:
        raise SAEError(f"a held-out split by document needs at least 2 documents, got {len(docs)}")
    n_held = min(max(1, round(fraction * len(docs))), len(docs) - 1)
    held = np.random.default_rng(seed).permutation(docs)[:n_held]
    return np.isin(doc_ids, held)


def label_store(store: ActivationStore, tokenizer, think_open: str = "<|im_start|>think", think_close: str = "<|im_start|>answer") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(labels of every token of an ActivationStore, doc_ids), documents cut at doc_id changes.

    Collection writes each document whole and in order (collect.py), which is checked here: a document
    that is split, repeated or not starting at position 0 would give wrong turn and step labels."""
    fields = ("token_ids", "doc_ids", "positions")
    parts = {f: [] for f in fields}
    for _, shard in store.iter_shards(fields):
        for f in fields:
            parts[f].append(shard[f].numpy())
    ids, docs, positions = (np.concatenate(parts[f]).astype(np.int64) for f in fields)
    cuts = np.flatnonzero(np.diff(docs) != 0) + 1
    starts, stops = np.concatenate([[0], cuts]), np.concatenate([cuts, [len(ids)]])
    expected = np.arange(len(ids)) - np.repeat(starts, stops - starts)
    if len(np.unique(docs)) != len(starts) or not np.array_equal(positions, expected):
        raise SAEError(f"{store.dir}: documents are not stored whole and in order (doc_ids/positions); cannot label them")
    vocab = np.unique(ids)
    lookup = dict(zip(vocab.tolist(), decode_pieces(tokenizer, vocab.tolist())))
    labels = {name: np.zeros(len(ids), dtype=bool) for name in CONCEPTS}
    for a, b in zip(starts.tolist(), stops.tolist()):
        doc = ids[a:b].tolist()
        for name, value in label_tokens(doc, tokenizer, think_open, think_close, [lookup[t] for t in doc]).items():
            labels[name][a:b] = value
    return labels, docs


# ---------------------------------------------------------------- F1 against concepts


class ConceptScorer:
    """One streaming pass: add() every chunk of tokens, then results().

    For every feature it keeps a histogram of its non-zero values over log bins for each
    (split, concept) and for each split's tokens as a whole: (2·concepts + 2, features, bins) counts.
    Tail sums of those give, for every bin edge t as threshold, the predicted count (value ≥ t) and the
    true positives of every concept on both splits, so the best (concept, threshold) is found exactly to
    bin resolution without a second pass. Memory: 4·(2·concepts + 2)·N_BINS bytes per feature (~35 KB)."""

    def __init__(self, n_features: int, concepts: Sequence[str], device: str = "cpu"):
        self.F, self.concepts, self.device = n_features, list(concepts), device
        L = len(self.concepts)
        self.counts = torch.zeros(2 * L + 2, n_features * N_BINS, dtype=torch.int32, device=device)
        self.positives = torch.zeros(2 * L + 2, dtype=torch.float64)
        self.edges = EDGES.to(device)

    def _bins(self, v: torch.Tensor) -> torch.Tensor:
        """torch.bucketize(v, EDGES, right=True) (the number of edges ≤ v) for v > 0, via log2 (20x faster) and a fix-up."""
        b = ((torch.log2(v) + EXPONENT) * BINS_PER_OCTAVE).floor().long().add_(1).clamp_(0, len(EDGES))
        b -= ((b > 0) & (v < self.edges[(b - 1).clamp(min=0)])).long()  # log2 rounding: at most one bin off
        b += ((b < len(EDGES)) & (v >= self.edges[b.clamp(max=len(EDGES) - 1)])).long()
        return b

    def add(self, values: torch.Tensor, labels: torch.Tensor, heldout: torch.Tensor) -> None:
        """values (tokens, features) ≥ 0, labels (tokens, concepts) bool in self.concepts order, heldout (tokens,) bool."""
        values = values.detach().float().to(self.device)
        if (values < 0).any():
            raise SAEError("concept scores need non-negative feature values (split signed values into + and − sides)")
        h, labels = heldout.to(self.device)[:, None], labels.to(self.device)
        indicators = torch.cat([labels & ~h, ~h, labels & h, h], 1)
        self.positives += indicators.sum(0).double().cpu()
        active = values > 0
        token, feature = active.nonzero(as_tuple=True)  # row-major: each token's hits are contiguous
        flat = self._bins(values[token, feature]) + feature * N_BINS
        per_token = torch.bincount(token, minlength=len(values))  # (active.sum(1) is 10x slower on bool)
        first_hit = per_token.cumsum(0) - per_token
        for col in range(indicators.shape[1]):  # the hits of the tokens in this column, gathered CSR-style
            rows = indicators[:, col].nonzero()[:, 0]
            lengths = per_token[rows]
            total = int(lengths.sum())
            if total:
                start = torch.repeat_interleave(first_hit[rows] - (lengths.cumsum(0) - lengths), lengths)
                hits = flat[start + torch.arange(total, device=self.device)]
                if total * 16 < self.F * N_BINS:  # sparse (SAE latents): scatter, don't sweep every bin
                    self.counts[col].index_add_(0, hits, torch.ones(total, dtype=torch.int32, device=self.device))
                else:
                    self.counts[col] += torch.bincount(hits, minlength=self.F * N_BINS).int()

    def results(self, group: int = 1024) -> list[dict]:
        L = len(self.concepts)
        pos_train, pos_held = self.positives[:L, None, None], self.positives[L + 1 : 2 * L + 1]
        out = []
        for g in range(0, self.F, group):
            counts = self.counts.view(2 * L + 2, self.F, N_BINS)[:, g : g + group].cpu().double()
            tails = counts.flip(-1).cumsum(-1).flip(-1)  # [..., b]: non-zero values in bin b or above
            tp_train, pred_train, tp_held, pred_held = tails[:L], tails[L], tails[L + 1 : 2 * L + 1], tails[2 * L + 1]
            f1_train = 2 * tp_train / (pred_train[None] + pos_train).clamp(min=1)  # (L, group, bins)
            best = f1_train.permute(1, 0, 2).flatten(1).max(1)  # first maximum: lowest concept index, lowest threshold
            for i in range(counts.shape[1]):
                active = float(pred_train[i, 0] + pred_held[i, 0])
                row = {"feature": g + i, "concept": None, "threshold": None, "f1": 0.0, "precision": 0.0, "recall": 0.0,
                       "train_f1": float(best.values[i]), "density": active / max(1.0, float(self.positives[L] + self.positives[2 * L + 1]))}
                if best.values[i] > 0:
                    c, b = divmod(int(best.indices[i]), N_BINS)
                    tp, pred, pos = float(tp_held[c, i, b]), float(pred_held[i, b]), float(pos_held[c])
                    row.update(concept=self.concepts[c], threshold=float(LOWER[b]), f1=2 * tp / max(1.0, pred + pos),
                               precision=tp / pred if pred else 0.0, recall=tp / pos if pos else 0.0)
                out.append(row)
        return out


def _label_matrix(labels: dict, n_tokens: int) -> tuple[list[str], torch.Tensor]:
    names = list(labels)
    matrix = torch.stack([torch.as_tensor(np.asarray(labels[n]), dtype=torch.bool) for n in names], 1)
    if matrix.shape[0] != n_tokens:
        raise SAEError(f"labels cover {matrix.shape[0]} tokens but there are {n_tokens} feature values")
    return names, matrix


def concept_f1(values: torch.Tensor, labels: dict, split, chunk_tokens: int = CHUNK, device: str = "cpu") -> list[dict]:
    """Best held-out F1 of each column of `values` (T, F) against `labels` {concept: (T,) bool}; `split` marks held-out tokens.

    Per feature: concept, threshold (predicted = value ≥ threshold and value > 0; 0 = any activation), f1,
    precision and recall on the held-out tokens, train_f1 (of the choice, on the others), density (all tokens)."""
    names, matrix = _label_matrix(labels, len(values))
    heldout = torch.as_tensor(np.asarray(split), dtype=torch.bool)
    scorer = ConceptScorer(values.shape[1], names, device)
    for s in range(0, len(values), chunk_tokens):
        scorer.add(values[s : s + chunk_tokens], matrix[s : s + chunk_tokens], heldout[s : s + chunk_tokens])
    return scorer.results()


@torch.no_grad()
def score_collection(store: ActivationStore, tokenizer, sae: SparseAutoencoder | None = None, prefix: str = "", sources: Iterable[str] | None = None, heldout_fraction: float = 0.3,
                     seed: int = 0, think_open: str = "<|im_start|>think", think_close: str = "<|im_start|>answer",
                     device: str = "cpu") -> list[dict]:
    """Concept F1 of every feature of a collection (adapter ± sides, SAE latents, MLP neurons; analyze.sources_for).

    Each result gets analyze's id/source/index/sign/name and family = prefix + source ('random_' for the
    collection made with the randomly initialised control adapter); `sources` keeps only those named.
    Positions below store.skip_positions (the attention sink) are left out."""
    labels, doc_ids = label_store(store, tokenizer, think_open, think_close)  # whole documents, sink included
    names, matrix = _label_matrix(labels, store.n_tokens)
    heldout = torch.from_numpy(heldout_split(doc_ids, heldout_fraction, seed))
    kept = torch.zeros(store.n_tokens, dtype=torch.bool)
    kept[store.kept_index] = True  # attention-sink positions are labelled but not scored
    wanted = None if sources is None else set(sources)
    out = []
    for source in sources_for(store, sae):
        if wanted is not None and source.name not in wanted:
            continue
        scorer = ConceptScorer(source.n_features, names, device)
        for span, values in _source_chunks(store, source):
            keep = kept[span]
            scorer.add(values[keep], matrix[span][keep], heldout[span][keep])
        for r in scorer.results():
            out.append({**source.describe(r["feature"]), "family": prefix + source.name, **r})
    return out


def _source_chunks(store: ActivationStore, source: Source) -> Iterable[tuple[slice, torch.Tensor]]:
    """(global token slice, feature values) for CHUNK tokens at a time, in store order."""
    for offset, shard in store.iter_shards((source.field,)):
        rows = shard[source.field]
        for s in range(0, len(rows), CHUNK):
            chunk = rows[s : s + CHUNK]
            yield slice(offset + s, offset + s + len(chunk)), source.values(chunk)


# ---------------------------------------------------------------- the table per family


def family_summary(results: list[dict], families: dict[str, list[int]] | None = None, threshold: float = 0.5, bins: int = 10) -> dict:
    """Per family: count, mean/median F1, share with F1 ≥ threshold, an F1 histogram on [0, 1], matched concepts.

    `families` maps a name to indices into `results`; without it each result's 'family' key groups them."""
    if families is None:
        families = {}
        for i, r in enumerate(results):
            families.setdefault(r["family"], []).append(i)
    summary = {}
    for name, members in families.items():
        f1 = np.array([results[i]["f1"] for i in members], dtype=np.float64)
        counts, edges = np.histogram(f1, bins=bins, range=(0.0, 1.0))
        concepts: dict[str, int] = {}
        for i in members:
            if results[i]["concept"] is not None and results[i]["f1"] >= threshold:
                concepts[results[i]["concept"]] = concepts.get(results[i]["concept"], 0) + 1
        summary[name] = {
            "count": len(members),
            "mean_f1": float(f1.mean()) if len(f1) else 0.0,
            "median_f1": float(np.median(f1)) if len(f1) else 0.0,
            "threshold": threshold,
            "share_above": float((f1 >= threshold).mean()) if len(f1) else 0.0,
            "histogram": {"edges": edges.tolist(), "counts": counts.tolist()},
            "concepts_above": dict(sorted(concepts.items(), key=lambda kv: -kv[1])),
        }
    return summary
