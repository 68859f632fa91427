"""`analyze` finds the true top examples; `report` renders a dashboard that opens in headless Chromium."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rank1.sae.cli import main
from rank1_testing import IMAGES_LOADED, PAGE_TEXT, HeadlessChromium
from rank1.sae.saelens_format import load_sae
from rank1.sae.store import ActivationStore

pytestmark = pytest.mark.slow  # trains in a module fixture: the fast tier leaves it out


@pytest.fixture(scope="module")
def analysis(collected: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("analysis")
    assert main(["train", "--activations", str(collected), "--out", str(root / "sae"), "--k", "3", "--expansion", "2",
                 "--batch-size", "128", "--lr", "3e-3", "--no-effect", "--train-tokens", "20000"]) == 0
    assert main(["analyze", "--activations", str(collected), "--sae", str(root / "sae"), "--out", str(root / "analysis.json"),
                 "--top-k", "12", "--context", "6", "--random-examples", "60", "--bins", "10"]) == 0
    return root / "analysis.json", root / "sae", collected


def _all(store: ActivationStore, field: str) -> torch.Tensor:
    return torch.cat([shard[field] for _, shard in store.iter_shards((field,))])


def test_analysis_matches_brute_force(analysis):
    path, sae_dir, collected = analysis
    data = json.loads(path.read_text())
    store = ActivationStore(collected)
    adapter, neurons, tokens = _all(store, "adapter"), _all(store, "neurons"), _all(store, "token_ids")
    docs, kept = _all(store, "doc_ids"), _all(store, "positions") >= 1  # position 0, the attention sink, reads as 0
    feats = {f["id"]: f for f in data["features"]}
    assert len([f for f in data["features"] if f["source"] == "adapter"]) == 28  # 14 adapters x 2 sides
    assert len([f for f in data["features"] if f["source"] == "neuron"]) == 24
    assert len([f for f in data["features"] if f["source"] == "latent"]) == 28
    latents = load_sae(sae_dir)[0].encode(adapter)
    busiest = int((latents > 0).sum(0).argmax())
    checks = [("adapter:3:+", adapter[:, 3]), ("adapter:3:-", -adapter[:, 3]), ("neuron:5:+", neurons[:, 5]), (f"latent:{busiest}", latents[:, busiest])]
    pool = torch.tensor([e["index"] for e in data["random_pool"]])
    for fid, column in checks:
        f = feats[fid]
        values = column.relu() * kept
        # One example per document: the best token of each of the 12 best documents.
        per_doc = torch.zeros(int(docs.max()) + 1).scatter_reduce(0, docs, values, "amax")
        top = per_doc.topk(12).values
        got = torch.tensor([e["activation"] for e in f["examples"]])
        torch.testing.assert_close(got, top[: len(got)], rtol=1e-4, atol=1e-5)
        assert len({e["doc"] for e in f["examples"]}) == len(f["examples"]) == int((top > 0).sum())
        assert all(values[e["index"]] == per_doc[e["doc"]] for e in f["examples"])
        assert f["density"] == pytest.approx(float((values > 0).sum() / kept.sum()))
        assert sum(f["histogram"]["counts"]) == int((values > 0).sum())
        first = f["examples"][0]
        assert first["tokens"][first["center"]] == int(tokens[first["index"]])
        assert first["values"][first["center"]] == pytest.approx(first["activation"], abs=1e-4)
        assert len(first["tokens"]) <= 13
        # The random windows' maxima: ±6 tokens of the same document.
        for i, center in enumerate(pool.tolist()):
            lo, hi = max(0, center - 6), min(len(values), center + 7)
            same = docs[lo:hi] == docs[center]
            assert f["random_window_max"][i] == pytest.approx(float(values[lo:hi][same].max()), abs=1e-4)
    assert len(data["random_pool"]) == 60 and all(len(f["random_window_max"]) == 60 for f in data["features"])
    assert kept[pool].all() and all(str(t) in data["vocab"] for t in data["random_pool"][0]["tokens"])
    assert any(0 < f["random_window_max"].count(0) < 60 for f in data["features"])  # some windows are negatives, not all


def test_dashboard_opens_in_headless_chromium(analysis, tmp_path):
    path, _, _ = analysis
    out = tmp_path / "dashboard"
    assert main(["report", "--analysis", str(path), "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "density.png").stat().st_size > 1000
    with HeadlessChromium(tmp_path / "profile") as chromium:
        # Use the page as a person would: filter to SAE latents.
        errors, (text, _, visible, images_ok) = chromium.open(out / "index.html", [
            PAGE_TEXT,
            "var s=document.getElementById('source-filter'); s.value='latent'; s.dispatchEvent(new Event('change'))",
            "Array.from(document.querySelectorAll('.feature')).filter(c => c.style.display !== 'none').map(c => c.dataset.source).join(',')",
            IMAGES_LOADED])
        # The error check itself works: a page with a broken script is reported.
        broken = tmp_path / "broken.html"
        broken.write_text("<!DOCTYPE html><html><body><select id='source-filter'></select><script>no_such_function()</script></body></html>")
        broken_errors, _ = chromium.open(broken)
    assert errors == []
    assert any("no_such_function" in e for e in broken_errors), broken_errors
    data = json.loads(path.read_text())
    top = next(f for f in data["features"] if f["id"] == "adapter:0:+")["examples"][0]
    center_text = data["vocab"][str(top["tokens"][top["center"]])].strip()
    assert "adapter:0:+" in text and "LoRA directions" in text and "SAE latents" in text and "MLP neurons" in text
    assert f"{top['activation']:.3g}" in text and center_text in text
    assert set(visible.split(",")) == {"latent"}
    assert images_ok is True
