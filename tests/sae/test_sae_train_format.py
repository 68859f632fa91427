"""`train` logs FVU, L0, dead fraction and adapter effect recovered, and saves what SAELens loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1.sae.cli import main
from rank1.sae.saelens_format import load_sae
from rank1.sae.store import ActivationStore

pytestmark = pytest.mark.slow  # trains in a module fixture: the fast tier leaves it out


OTHER_TEXT = ["The river flows north through the old town before it reaches the sea.",
              "She painted the fence blue, then sat down to read a long letter from her brother.",
              "Most birds in this valley leave in autumn and come back when the snow melts."]


@pytest.fixture(scope="module")
def trained(collected: Path, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sae")
    other = root / "other" / "prose.jsonl"  # text unlike the arithmetic the adapter and the collection saw: key '@other-prose'
    other.parent.mkdir()
    other.write_text("".join(json.dumps({"text": t}) + "\n" for t in OTHER_TEXT * 3))
    code = main(["train", "--activations", str(collected), "--out", str(root / "sae"), "--k", "4", "--expansion", "4",
                 "--batch-size", "128", "--lr", "3e-3", "--warmup-steps", "5", "--log-every", "8",
                 "--dead-after-tokens", "2000", "--eval-docs", "8", "--train-tokens", "20000", "--eval-data", str(other)])
    assert code == 0
    return root / "sae"


def test_training_log_has_metrics_and_adapter_effect(trained: Path):
    records = [json.loads(line) for line in (trained / "train_log.jsonl").read_text().splitlines()]
    assert len(records) >= 12  # several passes over the ~6k-token collection up to --train-tokens
    last = records[-1]
    assert {"fvu", "l0", "dead_fraction"} <= last.keys()
    for key in ("effect_recovered", "loss_base", "loss_adapter", "loss_spliced", "heldout_fvu", "heldout_l0"):
        assert key in last and key + "@other-prose" in last, key
    # The trend, not one step: the last third of the log is far below the first record and below the mean's
    # FVU of 1, with no late blow-up, on the training batches and on held-out documents alike.
    late = records[-(len(records) // 3) :]
    for key in ("fvu", "heldout_fvu"):
        first = records[0][key]
        assert max(r[key] for r in late) < min(1.0, 0.5 * first), (key, [round(r[key], 3) for r in records])
    assert 0 < last["l0"] <= 4 + 1e-6
    # The effect on the collection's own data (past what it collected) and on other text, each checked
    # against its logged losses; a good reconstruction keeps most of the effect on the adapter's own data.
    for suffix in ("", "@other-prose"):
        assert last["loss_base" + suffix] != last["loss_adapter" + suffix]
        expected = (last["loss_base" + suffix] - last["loss_spliced" + suffix]) / (last["loss_base" + suffix] - last["loss_adapter" + suffix])
        assert last["effect_recovered" + suffix] == pytest.approx(expected)
    assert last["loss_base"] != last["loss_base@other-prose"]  # two different sets of documents
    assert last["effect_recovered"] > 0.5


@pytest.mark.parametrize("seed", [0, 1])
def test_training_trend_on_a_random_adapter_collection(random_collected: Path, tmp_path, seed):
    """Activations spread over many dims (a random adapter's), with dead latents revived by AuxK along the way."""
    out = tmp_path / "sae"
    assert main(["train", "--activations", str(random_collected), "--out", str(out), "--k", "4", "--expansion", "4",
                 "--batch-size", "128", "--lr", "3e-3", "--warmup-steps", "5", "--log-every", "8", "--dead-after-tokens", "2000",
                 "--train-tokens", "40000", "--no-effect", "--seed", str(seed)]) == 0
    records = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    late = records[-(len(records) // 3) :]
    fvu = [round(r["fvu"], 3) for r in records]
    assert len(records) >= 30 and records[0]["fvu"] < 1.0, fvu  # the first reconstruction already beats the mean
    assert max(r["fvu"] for r in late) < min(0.15, 0.5 * records[0]["fvu"]), fvu
    assert max(r["dead_fraction"] for r in late) < 0.5


def test_saved_format_matches_saelens_field_by_field(trained: Path, collected: Path):
    cfg = json.loads((trained / "cfg.json").read_text())
    assert cfg["architecture"] == "jumprelu"  # SAELens saves BatchTopK SAEs as JumpReLU for inference
    for key, value in {"d_in": 14, "d_sae": 56, "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True,
                       "normalize_activations": "none", "reshape_activations": "none"}.items():
        assert cfg[key] == value, key
    assert cfg["metadata"]["sae_lens_version"] and cfg["metadata"]["model_name"]
    weights = load_file(str(trained / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (14, 56), "b_enc": (56,), "W_dec": (56, 14), "b_dec": (14,), "threshold": (56,)}
    # The file's weights alone reproduce our SAE on raw activations (JumpReLU rule, as SAELens computes it).
    sae, _ = load_sae(trained)
    x = ActivationStore(collected).load_shard(0)["adapter"][:300]
    pre = (x - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    acts = pre.relu() * (pre > weights["threshold"])
    torch.testing.assert_close(acts @ weights["W_dec"] + weights["b_dec"], sae(x), rtol=1e-4, atol=1e-5)


def test_saelens_loads_the_saved_sae(trained: Path, collected: Path):
    sae_lens = pytest.importorskip("sae_lens", reason="sae-lens is not installed; the field-by-field test covers the format")
    theirs = sae_lens.SAE.load_from_disk(str(trained))
    assert type(theirs).__name__ == "JumpReLUSAE"
    ours, _ = load_sae(trained)
    x = ActivationStore(collected).load_shard(0)["adapter"][:300]
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), ours.encode(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("architecture,saelens_name", [("topk", "TopKSAE"), ("relu", "StandardSAE")])
def test_other_architectures_save_and_load(collected: Path, tmp_path, architecture, saelens_name):
    out = tmp_path / architecture
    assert main(["train", "--activations", str(collected), "--out", str(out), "--architecture", architecture, "--k", "4",
                 "--expansion", "2", "--batch-size", "256", "--log-every", "100", "--no-effect", "--train-tokens", "6000"]) == 0
    ours, _ = load_sae(out)
    x = ActivationStore(collected).load_shard(0)["adapter"][:200]
    sae_lens = pytest.importorskip("sae_lens")
    theirs = sae_lens.SAE.load_from_disk(str(out))
    assert type(theirs).__name__ == saelens_name
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x), rtol=1e-4, atol=1e-5)
