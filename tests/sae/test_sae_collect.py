"""Collection writes shards that load back, and a resumed run writes the same bytes as one run."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from rank1.sae.cli import main
from rank1.sae.store import ActivationStore


def _collect(adapter, model, out, tokens) -> int:
    return main(["collect", "--adapter", adapter, "--model", model, "--data", "arithmetic", "--max-rows", "200",
                 "--tokens", str(tokens), "--out", str(out), "--shard-tokens", "1000", "--batch-docs", "4"])


def test_resumed_collection_is_bit_identical(tmp_path, tiny_model, tiny_adapter):
    assert _collect(tiny_adapter, tiny_model, tmp_path / "once", 5000) == 0
    assert _collect(tiny_adapter, tiny_model, tmp_path / "twice", 2300) == 0  # "interrupted" early
    first = json.loads((tmp_path / "twice" / "manifest.json").read_text())
    assert first["shards"][-1]["full"] is False and 2300 <= first["tokens"] < 5000
    assert _collect(tiny_adapter, tiny_model, tmp_path / "twice", 5000) == 0  # continues
    once = json.loads((tmp_path / "once" / "manifest.json").read_text())
    twice = json.loads((tmp_path / "twice" / "manifest.json").read_text())
    assert once["shards"] == twice["shards"] and once["tokens"] == twice["tokens"] >= 5000
    files = sorted(p.name for p in (tmp_path / "once").glob("shard_*"))
    assert files == sorted(p.name for p in (tmp_path / "twice").glob("shard_*")) and len(files) >= 5
    for name in files:
        assert (tmp_path / "once" / name).read_bytes() == (tmp_path / "twice" / name).read_bytes(), name
    assert not list((tmp_path / "twice").glob("*.tmp"))


def test_shards_hold_consistent_tokens_and_activations(collected: Path, tiny_model):
    from transformers import AutoTokenizer

    from rank1.core.config import DataConfig
    from rank1.sae.documents import load_documents

    store = ActivationStore(collected)
    assert store.n_tokens >= 6000
    assert len(store.adapter_names) == 2 * 7 and store.adapter_names[0] == "model.layers.0.self_attn.q_proj"
    assert len(store.neuron_names) == 2 * 6
    docs = load_documents(DataConfig(path="arithmetic", max_rows=400), AutoTokenizer.from_pretrained(tiny_model))
    seen = 0
    for offset, shard in store.iter_shards():
        assert offset == seen
        n = len(shard["token_ids"])
        assert shard["adapter"].shape == (n, 14) and shard["neurons"].shape == (n, 12)
        assert shard["adapter"].dtype == torch.float32 and torch.isfinite(shard["adapter"]).all()
        for tok, doc, pos in zip(shard["token_ids"].tolist(), shard["doc_ids"].tolist(), shard["positions"].tolist()):
            assert docs[doc].ids[pos] == tok
        seen += n
    # The first batch's activations equal a capture around the full model's forward (collection skips the LM head).
    from rank1.sae.capture import ActivationCapture
    from rank1.sae.documents import padded_batch
    from rank1.core.adapter_io import load_adapted_model
    from rank1.core.config import ModelConfig

    model, tokenizer, _ = load_adapted_model(store.meta["adapter"], ModelConfig(name_or_path=store.meta["model"]))
    ids, mask, _ = padded_batch(docs[:8], tokenizer.pad_token_id)
    with torch.inference_mode(), ActivationCapture(model, neurons_per_layer=6) as cap:
        model(input_ids=ids, attention_mask=mask)
    first = store.load_shard(0)
    n = int(mask.sum())
    torch.testing.assert_close(first["adapter"][:n], cap.adapter_activations()[mask.bool()], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(first["neurons"][:n], cap.neuron_activations()[mask.bool()], rtol=1e-5, atol=1e-5)
    # Documents are stored whole and in order.
    all_docs = torch.cat([load_file(str(collected / s.file))["doc_ids"] for s in store.shards])
    assert (all_docs[1:] >= all_docs[:-1]).all()
    assert sum(len(docs[d].ids) for d in all_docs.unique().tolist()) == store.n_tokens


def test_readers_leave_out_the_attention_sink(collected: Path):
    """Position 0 is stored (documents stay whole) but SAE training batches never see it (skip_positions 1)."""
    store = ActivationStore(collected)
    assert store.meta["skip_positions"] == store.skip_positions == 1
    positions = torch.cat([s["positions"] for _, s in store.iter_shards(("positions",))])
    adapter = torch.cat([s["adapter"] for _, s in store.iter_shards(("adapter",))])
    docs = torch.cat([s["doc_ids"] for _, s in store.iter_shards(("doc_ids",))]).unique()
    assert int((positions == 0).sum()) == len(docs) > 50  # every document's first token is stored
    assert torch.equal(store.kept_index, (positions >= 1).nonzero()[:, 0]) and store.n_kept == int((positions >= 1).sum())
    seen = torch.cat(list(store.batches(100, seed=3, drop_last=False)))
    assert len(seen) == store.n_kept
    assert sorted(map(tuple, seen.tolist())) == sorted(map(tuple, adapter[positions >= 1].tolist()))  # the same rows, shuffled
    # Whole-document chunks: no document is cut between two chunks.
    starts = [(start, chunk["doc_ids"]) for start, chunk in store.iter_chunks(("doc_ids",), 300)]
    assert sum(len(d) for _, d in starts) == store.n_tokens and len(starts) > 5
    assert all(a[-1] != b[0] for (_, a), (_, b) in zip(starts, starts[1:]))


def test_random_adapter_control(tmp_path, tiny_model):
    from rank1.sae.cli import main as sae_main

    out = tmp_path / "random"
    assert sae_main(["random-adapter", "--out", str(out), "--model", tiny_model, "--seed", "3"]) == 0
    weights = load_file(str(out / "adapter_model.safetensors"))
    a = [v for k, v in weights.items() if "lora_A" in k]
    b = [v for k, v in weights.items() if "lora_B" in k]
    assert len(a) == len(b) == 14
    assert all(t.abs().sum() > 0 for t in a) and all(t.abs().sum() == 0 for t in b)
    assert _collect(str(out), tiny_model, tmp_path / "acts", 500) == 0
    assert ActivationStore(tmp_path / "acts").n_tokens >= 500


def test_collect_plain_text_and_shared_gsm8k(tmp_path, tiny_model, tiny_adapter, capsys):
    from transformers import AutoTokenizer

    rows = tmp_path / "text.jsonl"
    rows.write_text("\n".join(json.dumps({"text": t}) for t in ["The sum of 2 and 3 is 5.", "Tom has 4 apples and eats 1.", ""]) + "\n")
    out = tmp_path / "text_acts"
    # The empty third row is an error that names its line.
    assert main(["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", str(rows), "--tokens", "10", "--out", str(out)]) == 2
    assert f"{rows}:3: no text in field 'text'" in capsys.readouterr().err
    rows.write_text("\n".join(json.dumps({"text": t}) for t in ["The sum of 2 and 3 is 5.", "Tom has 4 apples and eats 1."]) + "\n")
    assert main(["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", str(rows), "--tokens", "10", "--out", str(out)]) == 0
    store = ActivationStore(out)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    ids = torch.cat([s["token_ids"] for _, s in store.iter_shards(("token_ids",))]).tolist()
    assert tokenizer.decode(ids) == "The sum of 2 and 3 is 5.Tom has 4 apples and eats 1."

    gsm8k = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "gsm8k" / "test.jsonl"
    if not gsm8k.is_file():
        import pytest

        pytest.skip(f"{gsm8k} not found (the shared data folder is outside the repo)")
    out = tmp_path / "gsm8k_acts"
    assert main(["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", str(gsm8k), "--max-rows", "6", "--tokens", "300", "--out", str(out)]) == 0
    store = ActivationStore(out)
    text = tokenizer.decode(store.load_shard(0)["token_ids"].tolist())
    assert "Janet" in text and store.meta["data"] == str(gsm8k)
