"""Bad input gets a clear error naming the file or flag, never a crash or a hang."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rank1.sae.cli import main
from rank1.sae.errors import SAEError
from rank1.sae.sae import SparseAutoencoder, SparseAutoencoderConfig
from rank1.sae.store import ActivationStore
from rank1.core.config import SAETrainConfig
from rank1.sae.trainer import train_sae


def _error(capsys, argv) -> str:
    assert main(argv) == 2
    return capsys.readouterr().err


def test_no_activations(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    err = _error(capsys, ["train", "--activations", str(empty), "--out", str(tmp_path / "sae"), "--no-effect"])
    assert "no manifest.json" in err and str(empty) in err
    (empty / "manifest.json").write_text(json.dumps({"meta": {"adapter_names": ["a"]}, "shards": [], "tokens": 0, "done": True}))
    err = _error(capsys, ["analyze", "--activations", str(empty), "--out", str(tmp_path / "a.json")])
    assert "0 tokens" in err
    with pytest.raises(SAEError, match="no activations"):
        train_sae(SparseAutoencoder(SparseAutoencoderConfig(4, 8, k=2)), iter([]), SAETrainConfig(), progress=False)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_activations(tmp_path, collected: Path, capsys, bad):
    broken = tmp_path / "broken"
    shutil.copytree(collected, broken)
    shard = ActivationStore(broken).shards[1].file
    tensors = load_file(str(broken / shard))
    tensors["adapter"][7, 3] = bad
    save_file(tensors, str(broken / shard))
    err = _error(capsys, ["train", "--activations", str(broken), "--out", str(tmp_path / "sae"), "--no-effect", "--batch-size", "64"])
    assert shard in err and "NaN or inf" in err and "token 7, column 3" in err
    with pytest.raises(SAEError, match="NaN or inf"):
        x = torch.randn(64, 4)
        x[3, 1] = bad
        train_sae(SparseAutoencoder(SparseAutoencoderConfig(4, 8, k=2)), iter([x]), SAETrainConfig(), progress=False)


def test_k_larger_than_dictionary(tmp_path, collected: Path, capsys):
    err = _error(capsys, ["train", "--activations", str(collected), "--out", str(tmp_path / "sae"), "--k", "100", "--expansion", "2", "--no-effect"])
    assert "--k 100 is larger than the dictionary (d_sae = 28" in err
    err = _error(capsys, ["train", "--activations", str(collected), "--out", str(tmp_path / "sae"), "--k", "0", "--no-effect"])
    assert "flag --k: sae.train.k: must be > 0, got 0" in err
    err = _error(capsys, ["train", "--activations", str(collected), "--out", str(tmp_path / "sae"), "--architecture", "gated", "--no-effect"])
    assert "flag --architecture: sae.train.architecture: 'gated' is not one of batchtopk, topk, relu" in err


def test_bad_eval_data(tmp_path, collected: Path, capsys):
    base = ["train", "--activations", str(collected), "--out", str(tmp_path / "sae"), "--train-tokens", "1000"]
    err = _error(capsys, [*base, "--eval-data", str(tmp_path / "none.jsonl")])
    assert "none.jsonl: no such data file" in err
    err = _error(capsys, [*base, "--eval-data", "[arithmetic, arithmetic]"])
    assert "--eval-data arithmetic, arithmetic: two data sets would log under the same name" in err


def test_explain_refuses_an_analysis_without_window_maxima(tmp_path, capsys):
    old = tmp_path / "old.json"  # an analysis from before random windows recorded their maxima
    old.write_text(json.dumps({"vocab": {}, "random_pool": [], "features": [{"id": "adapter:0:+", "examples": [], "random_values": []}]}))
    err = _error(capsys, ["explain", "--analysis", str(old), "--out", str(tmp_path / "e.json"), "--base-url", "http://127.0.0.1:9/v1", "--llm", "m"])
    assert f"--analysis {old}: no random_window_max per feature" in err and "rerun `rank1 sae analyze`" in err


def test_adapter_not_matching_the_model(tmp_path, tiny_adapter, model_factory, model_path, capsys):
    other = model_factory(tmp_path / "other", model_path, hidden=32)  # same layer names, other shapes
    err = _error(capsys, ["collect", "--adapter", tiny_adapter, "--model", other, "--data", "arithmetic", "--tokens", "100", "--out", str(tmp_path / "acts")])
    assert f"--adapter {tiny_adapter}: does not fit base model {other}" in err
    err = _error(capsys, ["collect", "--adapter", str(tmp_path), "--model", other, "--data", "arithmetic", "--tokens", "100", "--out", str(tmp_path / "acts")])
    assert "no adapter_config.json" in err


def test_collect_refuses_to_mix_settings_and_bad_flags(tmp_path, collected: Path, tiny_adapter, tiny_model, capsys):
    copy = tmp_path / "acts"
    shutil.copytree(collected, copy)
    err = _error(capsys, ["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", "arithmetic", "--max-length", "64",
                          "--tokens", "100", "--out", str(copy), "--shard-tokens", "1500"])
    assert "other settings" in err and "max_length" in err
    err = _error(capsys, ["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", "arithmetic", "--tokens", "-5", "--out", str(copy)])
    assert "flag --tokens: sae.collect.tokens: must be > 0, got -5" in err
    err = _error(capsys, ["collect", "--adapter", tiny_adapter, "--model", tiny_model, "--data", str(tmp_path / "none.jsonl"), "--tokens", "5", "--out", str(tmp_path / "x")])
    assert "none.jsonl: no such data file" in err


def test_sae_and_collection_must_agree(tmp_path, collected: Path, capsys):
    sae_dir = tmp_path / "sae"
    assert main(["train", "--activations", str(collected), "--out", str(sae_dir), "--k", "2", "--expansion", "1", "--no-effect", "--batch-size", "512",
                 "--train-tokens", "6000"]) == 0
    cfg = json.loads((sae_dir / "rank1_sae.json").read_text())
    cfg["config"]["d_in"] = 9
    (sae_dir / "rank1_sae.json").write_text(json.dumps(cfg))
    err = _error(capsys, ["analyze", "--activations", str(collected), "--sae", str(sae_dir), "--out", str(tmp_path / "a.json")])
    assert "sae_weights.safetensors: W_enc has shape (14, 14) but rank1_sae.json describes (9, 14)" in err
    cfg["config"]["d_in"] = 14
    (sae_dir / "rank1_sae.json").write_text(json.dumps(cfg))
    # A collection of another adapter (5 dims) cannot be read by this SAE (14 dims).
    other = tmp_path / "other"
    shutil.copytree(collected, other)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["meta"]["adapter_names"] = manifest["meta"]["adapter_names"][:5]
    (other / "manifest.json").write_text(json.dumps(manifest))
    for shard in manifest["shards"]:
        tensors = load_file(str(other / shard["file"]))
        tensors["adapter"] = tensors["adapter"][:, :5].contiguous()
        save_file(tensors, str(other / shard["file"]))
    err = _error(capsys, ["analyze", "--activations", str(other), "--sae", str(sae_dir), "--out", str(tmp_path / "a.json")])
    assert "the SAE reads 14 adapter dims but the collection has 5" in err
    err = _error(capsys, ["analyze", "--activations", str(collected), "--sae", str(tmp_path / "nothing"), "--out", str(tmp_path / "a.json")])
    assert "not an SAE saved by `rank1 sae train`" in err
