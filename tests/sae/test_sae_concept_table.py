"""`rank1 sae concepts`: the per-family concept-F1 table on a real collection, its SAE and the random-adapter control."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

from rank1.sae.cli import main
from rank1.sae.store import ActivationStore


def _plant(collected: Path, out: Path, tokenizer) -> Path:
    """A copy of the collection where adapter 0 fires exactly on '####' and adapter 1 only on the attention sink."""
    shutil.copytree(collected, out)
    hashes = tokenizer.convert_tokens_to_ids("####")
    for shard in ActivationStore(out).shards:
        data = load_file(str(out / shard.file))
        data["adapter"][:, 0] = 2.0 * (data["token_ids"] == hashes)
        data["adapter"][:, 1] = 5.0 * (data["positions"] == 0)
        save_file(data, str(out / shard.file))
    return out


def test_concept_table_per_family(collected: Path, random_collected: Path, tiny_model, tmp_path, capsys):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    acts = _plant(collected, tmp_path / "acts", tokenizer)
    assert main(["train", "--activations", str(acts), "--out", str(tmp_path / "sae"), "--k", "3", "--expansion", "2",
                 "--batch-size", "128", "--train-tokens", "6000", "--no-effect"]) == 0
    capsys.readouterr()
    out = tmp_path / "concepts.json"
    assert main(["concepts", "--activations", str(acts), "--sae", str(tmp_path / "sae"), "--control", str(random_collected),
                 "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    table = json.loads(out.read_text())
    features = table["features"]
    counts = {family: sum(f["family"] == family for f in features) for family in table["summary"]}
    assert counts == {"adapter": 28, "latent": 28, "neuron": 24, "random_adapter": 28}
    by_id = {(f["family"], f["id"]): f for f in features}
    planted = by_id[("adapter", "adapter:0:+")]
    assert planted["concept"] == "hashes" and planted["f1"] == 1.0 and planted["precision"] == planted["recall"] == 1.0
    sink = by_id[("adapter", "adapter:1:+")]  # fires only at position 0, which is not scored
    assert sink["concept"] is None and sink["f1"] == 0.0 and sink["density"] == 0.0
    for family, row in table["summary"].items():
        f1 = [f["f1"] for f in features if f["family"] == family]
        assert all(0.0 <= v <= 1.0 for v in f1)
        assert row["count"] == len(f1) and row["share_above"] == pytest.approx(sum(v >= 0.5 for v in f1) / len(f1))
        assert printed["share_above"][family] == pytest.approx(row["share_above"], abs=1e-4)
    assert table["summary"]["adapter"]["concepts_above"].get("hashes", 0) >= 1
    assert table["meta"]["skip_positions"] == 1 and table["meta"]["heldout_fraction"] == 0.3
    assert Path(printed["png"]) == out.with_suffix(".png") and out.with_suffix(".png").stat().st_size > 5000


def test_concepts_refuses_a_control_of_another_model(collected: Path, tmp_path, capsys):
    other = tmp_path / "other"
    shutil.copytree(collected, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["meta"]["model"] = "some/other-model"
    (other / "manifest.json").write_text(json.dumps(manifest))
    assert main(["concepts", "--activations", str(collected), "--control", str(other), "--out", str(tmp_path / "c.json")]) == 2
    assert f"--control {other}: collected on some/other-model" in capsys.readouterr().err
    assert main(["concepts", "--activations", str(tmp_path / "none"), "--out", str(tmp_path / "c.json")]) == 2
    assert "no manifest.json" in capsys.readouterr().err
