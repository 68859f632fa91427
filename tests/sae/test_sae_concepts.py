"""Concept labels are exact on real chat-templated rows; planted features score F1 1; dictionaries match."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rank1.core.config import DataConfig
from rank1.core.data import to_messages, tokenize_messages
from rank1.sae.compare import match_dictionaries, one_to_one
from rank1.sae.concepts import (CONCEPTS, concept_f1, family_summary, heldout_split, label_store, label_tokens,
                                score_collection)
from rank1.sae.documents import load_documents
from rank1.sae.errors import SAEError
from rank1.sae.store import ActivationStore, ShardWriter

ROW = {"question": "What is 12 + 7 * 3?", "answer": "7 * 3 = 21\n12 + 21 = 33\n#### 33"}


def _tokens(labels: dict, concept: str) -> set[int]:
    return set(np.flatnonzero(labels[concept]).tolist())


def test_labels_of_an_arithmetic_row_token_by_token(tokenizer):
    ids, _ = tokenize_messages(tokenizer, to_messages(ROW, "gsm8k", DataConfig(), "row"))
    pieces = [tokenizer.decode([i]) for i in ids]
    starts = [i for i, p in enumerate(pieces) if p == "<|im_start|>"]
    ends = [i for i, p in enumerate(pieces) if p == "<|im_end|>"]
    assert len(starts) == 3 and len(ends) == 3  # SmolLM2's default system prompt, user, assistant
    q0, a0 = starts[1] + 3, starts[2] + 4  # after '<|im_start|>' 'user' '\n' and '<|im_start|>' 'ass' 'istant' '\n'
    assert "".join(pieces[q0 : ends[1]]) == ROW["question"] and "".join(pieces[a0 : ends[2]]) == ROW["answer"]
    # the answer as SmolLM2 splits it (digits are single tokens):
    assert pieces[a0 : ends[2]] == ["7", " *", " ", "3", " =", " ", "2", "1", "\n", "1", "2", " +", " ", "2", "1", " =", " ",
                                    "3", "3", "\n", "####", " ", "3", "3"]
    labels = label_tokens(ids, tokenizer)
    assert set(labels) == set(CONCEPTS) and all(v.shape == (len(ids),) and v.dtype == bool for v in labels.values())
    assert _tokens(labels, "operand_digit") == {q0 + 3, q0 + 4, q0 + 7, q0 + 10}  # '1' '2' '7' '3' of the question
    assert _tokens(labels, "intermediate_digit") == {a0 + 6, a0 + 7}  # '21' of the first step
    assert _tokens(labels, "step_result_digit") == {a0 + 6, a0 + 7, a0 + 17, a0 + 18}
    assert _tokens(labels, "final_digit") == {a0 + 22, a0 + 23}  # '33' after ####
    assert _tokens(labels, "hashes") == {a0 + 20}
    assert _tokens(labels, "step_boundary") == {a0 + 8, a0 + 19}
    assert _tokens(labels, "operator") == {q0 + 5, q0 + 8, a0 + 1, a0 + 11}
    assert _tokens(labels, "equals") == {a0 + 4, a0 + 15}
    assert _tokens(labels, "end_of_turn") == set(ends)
    headers = {s + k for s in starts for k in range(3)} | {starts[2] + 3}  # '<|im_start|>' role ('ass' 'istant') '\n'
    assert _tokens(labels, "template") == headers | set(ends) | {e + 1 for e in ends}
    assert {pieces[i] for i in _tokens(labels, "template")} == {"<|im_start|>", "system", "user", "ass", "istant", "\n", "<|im_end|>"}
    assert _tokens(labels, "question") == set(range(q0, ends[1]))
    assert _tokens(labels, "answer") == set(range(a0, ends[2]))
    assert _tokens(labels, "system") == set(range(starts[0] + 3, ends[0]))
    assert not labels["think_delimiter"].any() and not labels["thinking"].any()


def test_labels_of_collected_documents_and_s1k_markers(tokenizer):
    from rank1.core.data import arithmetic_rows

    rows = arithmetic_rows(5)
    for row, doc in zip(rows, load_documents(DataConfig(max_rows=5), tokenizer)):  # ids exactly as collection makes them
        labels = label_tokens(doc.ids, tokenizer)
        text = lambda c: "".join(tokenizer.decode([doc.ids[i]]) for i in sorted(_tokens(labels, c)))  # noqa: E731
        steps = row["answer"].split("\n")
        assert text("final_digit") == steps[-1].removeprefix("#### ")
        assert text("intermediate_digit") == steps[0].split("= ")[-1]
        assert text("operand_digit") == "".join(ch for ch in row["question"] if ch.isdigit())
        assert text("hashes") == "####"
    s1k = {"question": "Is 6 ÷ 2 = 3?", "deepseek_thinking_trajectory": "6 ÷ 2 = 3\nso yes", "deepseek_attempt": "\\boxed{3}"}
    cfg = DataConfig()
    ids, _ = tokenize_messages(tokenizer, to_messages(s1k, "s1k", cfg, "row"))
    labels = label_tokens(ids, tokenizer, cfg.think_open, cfg.think_close)
    joined = lambda c: tokenizer.decode([ids[i] for i in sorted(_tokens(labels, c))])  # noqa: E731  (decoded together)
    assert joined("think_delimiter") == cfg.think_open + cfg.think_close
    assert joined("thinking") == "6 ÷ 2 = 3\nso yes"  # '÷' is two byte-level tokens: both carry its labels
    assert joined("final_digit") == "3" and joined("step_boundary") == "\n"
    assert joined("operator") == " ÷ ÷" and joined("step_result_digit") == "3"  # in the question and the trace


@pytest.fixture(scope="module")
def planted(tokenizer):
    """~200 arithmetic documents, their labels, and a document-level held-out split."""
    docs = load_documents(DataConfig(max_rows=200), tokenizer)
    per_doc = [label_tokens(d.ids, tokenizer) for d in docs]
    labels = {c: np.concatenate([p[c] for p in per_doc]) for c in CONCEPTS}
    doc_ids = np.concatenate([np.full(len(d.ids), i) for i, d in enumerate(docs)])
    return docs, labels, doc_ids, heldout_split(doc_ids, 0.3, seed=0)


def test_planted_features_score_their_concept(planted):
    _, labels, doc_ids, split = planted
    T, gen = len(doc_ids), torch.Generator().manual_seed(0)
    magnitude = torch.rand(T, generator=gen) + 0.5
    hashes, final = torch.from_numpy(labels["hashes"]), torch.from_numpy(labels["final_digit"])
    noisy_final = final & (torch.rand(T, generator=gen) > 0.03)  # misses ~3 % of final-answer digits
    density = float(hashes.float().mean())
    values = torch.stack([
        hashes * magnitude,
        (torch.rand(T, generator=gen) < density) * magnitude,  # random, the same density
        noisy_final * magnitude + (~final) * 0.05 * torch.rand(T, generator=gen),  # plus weak noise everywhere else
        torch.zeros(T),  # never fires
    ], 1)
    assert 0.2 < split.mean() < 0.4 and not set(doc_ids[split]) & set(doc_ids[~split])
    results = concept_f1(values, labels, split)
    assert results[0]["concept"] == "hashes" and results[0]["f1"] == 1.0 and results[0]["precision"] == results[0]["recall"] == 1.0
    assert results[0]["density"] == pytest.approx(density)
    assert results[1]["f1"] < 0.3
    assert results[2]["concept"] == "final_digit" and results[2]["f1"] > 0.9 and results[2]["threshold"] > 0.05
    assert results[3]["concept"] is None and results[3]["f1"] == 0.0 and results[3]["density"] == 0.0
    with pytest.raises(SAEError, match="non-negative"):
        concept_f1(-values, labels, split)


def _write_store(path, docs, columns) -> ActivationStore:
    """A collection in the real shard format, with adapter columns given as functions of each document's labels."""
    writer = ShardWriter(path, {"adapter_names": [f"a{i}" for i in range(len(columns))], "neuron_names": []}, shard_tokens=3000)
    for start in range(0, len(docs), 8):
        batch = docs[start : start + 8]
        ids = torch.tensor([t for d in batch for t in d.ids])
        adapter = torch.cat([torch.stack([f(d) for f in columns], 1) for d in batch])
        writer.add(start + len(batch), adapter=adapter, neurons=torch.zeros(len(ids), 0), token_ids=ids.int(),
                   doc_ids=torch.cat([torch.full((len(d.ids),), start + i) for i, d in enumerate(batch)]),
                   positions=torch.cat([torch.arange(len(d.ids), dtype=torch.int32) for d in batch]))
    writer.finish(done=True)
    return ActivationStore(path)


def test_score_collection_streams_a_store(planted, tokenizer, tmp_path):
    docs, labels, _, _ = planted
    gen = torch.Generator().manual_seed(1)
    lab = lambda d, c: torch.from_numpy(label_tokens(d.ids, tokenizer)[c]).float()  # noqa: E731
    columns = [lambda d: lab(d, "hashes") * 2.0, lambda d: -3.0 * lab(d, "final_digit"), lambda d: torch.randn(len(d.ids), generator=gen)]
    store = _write_store(tmp_path / "acts", docs, columns)
    assert len(store.shards) > 3
    stored, doc_ids = label_store(store, tokenizer)
    assert all(np.array_equal(stored[c], labels[c]) for c in CONCEPTS)
    results = {r["id"]: r for r in score_collection(store, tokenizer, prefix="trained_")}
    assert len(results) == 6 and {r["family"] for r in results.values()} == {"trained_adapter"}
    assert results["adapter:0:+"]["concept"] == "hashes" and results["adapter:0:+"]["f1"] == 1.0
    assert results["adapter:1:-"]["concept"] == "final_digit" and results["adapter:1:-"]["f1"] == 1.0
    assert results["adapter:0:-"]["concept"] is None and results["adapter:1:+"]["concept"] is None
    assert results["adapter:2:+"]["f1"] < 0.5 and results["adapter:2:-"]["f1"] < 0.5
    summary = family_summary(list(results.values()))["trained_adapter"]
    assert summary["count"] == 6 and summary["share_above"] == pytest.approx(2 / 6)
    assert summary["concepts_above"] == {"hashes": 1, "final_digit": 1}


def test_label_store_refuses_documents_cut_apart(planted, tokenizer, tmp_path):
    docs = planted[0][:16]
    store = _write_store(tmp_path / "acts", docs, [lambda d: torch.zeros(len(d.ids))])
    shard = store.dir / store.shards[0].file
    from safetensors.torch import load_file, save_file

    data = load_file(str(shard))
    data["positions"] = data["positions"] + 1  # no document starts at position 0
    save_file(data, str(shard))
    with pytest.raises(SAEError, match="not stored whole"):
        label_store(store, tokenizer)


def test_family_summary_on_known_numbers():
    f1 = [0.05, 0.3, 0.65, 1.0, 0.0, 0.9]
    concepts = ["digit", "equals", "hashes", "hashes", None, "template"]
    results = [{"f1": f, "concept": c} for f, c in zip(f1, concepts)]
    summary = family_summary(results, {"adapter": [0, 1, 2, 3], "latent": [4, 5]}, threshold=0.5, bins=5)
    a = summary["adapter"]
    assert a["count"] == 4 and a["mean_f1"] == pytest.approx(0.5) and a["median_f1"] == pytest.approx(0.475)
    assert a["share_above"] == 0.5 and a["histogram"]["counts"] == [1, 1, 0, 1, 1]
    assert a["histogram"]["edges"] == pytest.approx([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    assert a["concepts_above"] == {"hashes": 2}
    assert summary["latent"]["mean_f1"] == pytest.approx(0.45) and summary["latent"]["share_above"] == 0.5
    by_key = family_summary([dict(r, family="x") for r in results])
    assert by_key["x"]["count"] == 6


def _random_dictionary(n, d, seed):
    W = torch.randn(n, d, generator=torch.Generator().manual_seed(seed))
    return W / W.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("method", ["auto", "greedy"])
def test_match_dictionaries(method):
    A = _random_dictionary(512, 64, seed=1)
    same = match_dictionaries(A * 3.0, A, method=method)  # decoder norms do not matter
    assert same["n_shared"] == 512 and not same["unique_a"] and not same["unique_b"]
    assert all(i == j and c == pytest.approx(1.0) for i, j, c in same["pairs"])
    assert 0.2 < same["threshold"] < 0.6
    independent = match_dictionaries(A, _random_dictionary(768, 64, seed=2), method=method)
    assert independent["shared_fraction_a"] <= 0.02 and independent["n_unique_b"] >= 768 - 0.02 * 512
    perm = torch.randperm(512, generator=torch.Generator().manual_seed(3))
    noisy = A[perm] + 0.02 * torch.randn(512, 64, generator=torch.Generator().manual_seed(4))
    permuted = match_dictionaries(A, noisy, method=method)
    assert permuted["n_shared"] == 512
    assert all(int(perm[j]) == i for i, j, _ in permuted["pairs"])


def test_greedy_is_greedy_by_descending_cosine():
    cos = torch.rand(40, 30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    rows, cols, used = one_to_one(cos, "greedy")
    assert used == "greedy" and len(rows) == 30
    work, expected = cos.clone(), set()
    for _ in range(30):  # the textbook loop: take the largest entry, strike its row and column
        i, j = divmod(int(work.argmax()), work.shape[1])
        expected.add((i, j))
        work[i, :], work[:, j] = -1, -1
    assert set(zip(rows.tolist(), cols.tolist())) == expected
