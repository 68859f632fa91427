"""`rank1 sae compare` (shared/unique features, adapter change per module and layer) and `rank1 sae ablate` (KL by layer)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from rank1.sae.cli import main


def _dense_changes(folder: str) -> dict[str, torch.Tensor]:
    """ΔW = scale·B·A of every module, formed as dense matrices from the files."""
    config = json.loads((Path(folder) / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / config["r"]
    tensors = load_file(str(Path(folder) / "adapter_model.safetensors"))
    out = {}
    for key, A in tensors.items():
        if ".lora_A." in key:
            B = tensors[key.replace(".lora_A.", ".lora_B.")]
            out[key.removeprefix("base_model.model.").split(".lora_")[0]] = (scale * B.double() @ A.double(), A.double(), B.double())
    return out


def test_compare_saes_and_the_adapter_change(collected: Path, tiny_adapter, tiny_model, adapter_factory, tmp_path, capsys):
    sae_a, sae_b = tmp_path / "sae_a", tmp_path / "sae_b"
    assert main(["train", "--activations", str(collected), "--out", str(sae_a), "--k", "3", "--expansion", "2", "--batch-size", "128",
                 "--train-tokens", "6000", "--no-effect"]) == 0
    shutil.copytree(sae_a, sae_b)  # B: A's first 14 latents, and 14 new random ones
    weights = load_file(str(sae_b / "sae_weights.safetensors"))
    weights["W_dec"][14:] = torch.randn(14, 14, generator=torch.Generator().manual_seed(123))  # not the SAE's init stream
    save_file(weights, str(sae_b / "sae_weights.safetensors"))
    assert main(["analyze", "--activations", str(collected), "--sae", str(sae_a), "--out", str(tmp_path / "a.json"), "--top-k", "4",
                 "--context", "3", "--random-examples", "10"]) == 0
    other = adapter_factory(tiny_model, tmp_path / "adapter_b", seed=7, b_scale=0.5)
    capsys.readouterr()
    out = tmp_path / "compare.json"
    assert main(["compare", "--sae-a", str(sae_a), "--sae-b", str(sae_b), "--analysis-a", str(tmp_path / "a.json"),
                 "--adapter-b", other, "--out", str(out), "--examples", "2"]) == 0
    result = json.loads(out.read_text())
    # The 14 latents B kept are shared with themselves; the 14 random ones are (almost all) unique to each side.
    same = [p for p in result["shared"] if p["a"] < 14]
    assert sorted(p["a"] for p in same) == list(range(14)) and all(p["b"] == p["a"] and p["cosine"] == pytest.approx(1.0) for p in same)
    assert result["d_sae_a"] == 28 and 14 <= result["n_shared"] <= 16 and result["n_unique_a"] == result["n_unique_b"] >= 12
    assert {u["latent"] for u in result["unique_a"]} <= set(range(14, 28)) and 0 < result["threshold"] < 0.99
    densities = [u["density"] for u in result["unique_a"]]
    assert densities == sorted(densities, reverse=True)  # the most active unique features first, with their examples
    examples = [e for p in same for e in p["feature_a"]["examples"]] + [e for u in result["unique_a"] for e in u["examples"]]
    assert examples and all("[[" in e["text"] for e in examples)
    assert all(len(p["feature_a"]["examples"]) <= 2 and p["feature_b"] is None for p in same)  # no analysis given for B
    # The adapter change, against dense matrices formed by hand (A defaults to the adapter SAE A was trained on).
    change = result["adapter_change"]
    assert Path(change["adapter_a"]).resolve() == Path(tiny_adapter).resolve()
    a, b = _dense_changes(tiny_adapter), _dense_changes(other)
    assert {m["module"] for m in change["modules"]} == set(a) and len(a) == 14
    for m in change["modules"]:
        (dw_a, A_a, B_a), (dw_b, A_b, B_b) = a[m["module"]], b[m["module"]]
        assert m["delta_w_a"] == pytest.approx(float(torch.linalg.norm(dw_a)), rel=1e-9)
        assert m["delta_w_b"] == pytest.approx(float(torch.linalg.norm(dw_b)), rel=1e-9)
        assert m["diff_delta_w"] == pytest.approx(float(torch.linalg.norm(dw_a - dw_b)), rel=1e-6)
        assert (m["norm_A_a"], m["norm_B_b"]) == pytest.approx((float(A_a.norm()), float(B_b.norm())), rel=1e-9)
        assert m["diff_A"] == pytest.approx(float((A_a - A_b).norm()), rel=1e-9)
    for layer in change["layers"]:
        mine = [m for m in a if f".layers.{layer['layer']}." in m]
        assert layer["modules"] == 7
        assert layer["diff_delta_w"] == pytest.approx(math.sqrt(sum(float(torch.linalg.norm(a[m][0] - b[m][0])) ** 2 for m in mine)), rel=1e-6)
    assert {t["type"] for t in change["types"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert out.with_suffix(".png").stat().st_size > 5000
    # An analysis of another SAE is refused, naming the flag.
    assert main(["compare", "--sae-a", str(sae_a), "--sae-b", str(sae_b), "--analysis-b", str(tmp_path / "a.json"), "--out", str(out)]) == 2
    assert f"--analysis-b {tmp_path / 'a.json'}: made with --sae {sae_a}, not {sae_b}" in capsys.readouterr().err


def test_leave_one_layer_out_kl(tiny_model, adapter_factory, tmp_path, capsys):
    folder = Path(adapter_factory(tiny_model, tmp_path / "adapter", seed=3, b_scale=0.5))
    weights = load_file(str(folder / "adapter_model.safetensors"))
    for key in weights:
        if ".layers.0." in key and ".lora_B." in key:
            weights[key].zero_()  # layer 0's adapters change nothing
    save_file(weights, str(folder / "adapter_model.safetensors"))
    capsys.readouterr()
    out = tmp_path / "ablation.json"
    assert main(["ablate", "--adapter", str(folder), "--model", tiny_model, "--data", "arithmetic", "--max-rows", "6",
                 "--docs", "6", "--batch-docs", "4", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    layers = {r["layer"]: r for r in result["layers"]}
    assert set(layers) == {0, 1} and layers[0]["adapters"] == layers[1]["adapters"] == 7 and result["documents"] == 6
    assert layers[0]["kl"] == 0.0
    assert layers[1]["kl"] > 1e-4 and result["kl_base"] > 1e-4
    # With layer 0 inert, leaving layer 1 out leaves no adapter at all: the same as the base model (PEFT's disable_adapter).
    assert layers[1]["kl"] == pytest.approx(result["kl_base"], rel=1e-4)
    assert out.with_suffix(".png").stat().st_size > 3000
    assert json.loads(capsys.readouterr().out)["kl"]["1"] == pytest.approx(layers[1]["kl"])
