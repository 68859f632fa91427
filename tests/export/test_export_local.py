"""Export without the Hub: the PEFT folder and the merged model reproduce the trained model; the card says
what users need; bad input gets one clear line."""

from __future__ import annotations

import json
import re

import torch
import yaml

from rank1.export import main
from rank1.core.model import EMBEDDED_HUB_ID


def load_peft(model_path: str, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).eval()


def front_matter(readme: str) -> dict:
    assert readme.startswith("---\n")
    return yaml.safe_load(readme.split("---\n")[1])


def test_adapter_export_reproduces_trained_logits(run_dir, model_path, tmp_path, capsys):
    (run_dir["dir"] / "eval").mkdir(exist_ok=True)
    summary = {"data": "/work/shared/data/gsm8k_test.jsonl", "model": "smollm2-135m-instruct", "adapter": "/secret/run/adapter",
               "problems": 16, "pass@1": 0.4375, "pass@4": 0.625}  # what `rank1 eval` writes
    (run_dir["dir"] / "eval" / "summary.json").write_text(json.dumps(summary))
    try:
        assert main([str(run_dir["dir"]), "--out", str(tmp_path / "fp32")]) == 0
    finally:
        (run_dir["dir"] / "eval" / "summary.json").unlink()
    out = tmp_path / "fp32"
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == EMBEDDED_HUB_ID  # a name other tools can resolve
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (1, 16, True)
    with torch.no_grad():
        logits = load_peft(model_path, out)(input_ids=run_dir["ids"]).logits[0]
    assert (logits - run_dir["logits"]).abs().max() < 1e-4

    card = (out / "README.md").read_text()
    meta = front_matter(card)
    assert meta["base_model"] == EMBEDDED_HUB_ID and meta["library_name"] == "peft" and meta["license"] == "apache-2.0"
    assert {"rank1", "lora", "rank-1", "math", "reasoning"} <= set(meta["tags"])
    assert "dequantized Q4_1 GGUF" in card
    assert "| pass@1 | 0.4375 |" in card and "| problems | 16 |" in card and "/secret/run" not in card  # the run's eval results
    (index,) = meta["model-index"]
    assert {(m["type"], m["value"]) for r in index["results"] for m in r["metrics"]} == {("pass@1", 0.4375), ("pass@4", 0.625)}
    assert index["results"][0]["dataset"]["name"] == "gsm8k_test"
    assert "completion loss 1.2345" in card and "objective: sft" in card  # the training config
    assert "PeftModel.from_pretrained" in card and "LoRARequest(" in card and "max_lora_rank=1" in card


def test_bf16_export_and_checkpoint_source(run_dir, model_path, tmp_path):
    from safetensors import safe_open

    checkpoint = run_dir["dir"] / "checkpoints" / "step-000002"
    assert main([str(checkpoint), "--out", str(tmp_path / "bf16"), "--dtype", "bf16"]) == 0
    with safe_open(str(tmp_path / "bf16" / "adapter_model.safetensors"), "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
        assert len(list(f.keys())) == 2 * 210  # A and B of every rank-1 adapter
    card = (tmp_path / "bf16" / "README.md").read_text()
    assert "checkpoint at step 2" in card and "No evaluation results" in card
    with torch.no_grad():
        logits = load_peft(model_path, tmp_path / "bf16")(input_ids=run_dir["ids"]).logits[0]
    # bf16 rounding of A and B only: far closer to the trained model than the base is.
    assert (logits - run_dir["logits"]).abs().max() < 0.1 * (run_dir["base_logits"] - run_dir["logits"]).abs().max()


def test_merged_model_matches_trained_model(run_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main([str(run_dir["dir"]), "--out", str(out), "--merge", "--max-shard-size", "200MB"]) == 0
    shards = sorted(p.name for p in out.glob("model*.safetensors"))
    assert len(shards) >= 2 and (out / "model.safetensors.index.json").is_file()  # 540 MB of fp32 in 200 MB shards
    assert not (out / "adapter_config.json").exists() and (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    assert not hasattr(merged, "peft_config")
    with torch.no_grad():
        logits = merged(input_ids=run_dir["ids"]).logits[0]
    assert (logits - run_dir["logits"]).abs().max() < 1e-3
    assert AutoTokenizer.from_pretrained(str(out)).chat_template
    meta = front_matter((out / "README.md").read_text())
    assert meta["library_name"] == "transformers" and "merged" in meta["tags"]


# ---------------------------------------------------------------- bad input


def test_no_adapter_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    assert main([str(tmp_path / "run"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no adapter to export" in err and str(tmp_path / "run" / "adapter" / "adapter_config.json") in err
    assert not (tmp_path / "out").exists()
    assert main([str(tmp_path / "missing"), "--out", str(tmp_path / "out")]) == 2
    assert "no such run directory" in capsys.readouterr().err


def test_merge_into_a_base_of_another_shape_is_a_clear_error(run_dir, tiny_llama, tmp_path, capsys):
    assert main([str(run_dir["dir"]), "--out", str(tmp_path / "m"), "--merge", "--base-model", tiny_llama]) == 2
    err = capsys.readouterr().err
    assert "does not fit base model" in err and tiny_llama in err
    assert re.search(r"is \d+->\d+ in the adapter but \d+->\d+ in the base", err), err
    assert not (tmp_path / "m").exists() and not list(tmp_path.glob(".m.tmp-*"))


def test_adapter_of_another_architecture_is_a_clear_error(run_dir, tiny_llama, tmp_path, capsys):
    # An adapter whose own base is the tiny Llama... but whose tensors are SmolLM2's: --merge checks before loading.
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_model.safetensors").write_bytes((run_dir["dir"] / "adapter" / "adapter_model.safetensors").read_bytes())
    config = json.loads((run_dir["dir"] / "adapter" / "adapter_config.json").read_text())
    (foreign / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": tiny_llama}))
    assert main([str(foreign), "--out", str(tmp_path / "m"), "--merge"]) == 2
    err = capsys.readouterr().err
    assert "does not fit base model" in err and tiny_llama in err and "pass the base it was trained on" in err


def test_out_folder_and_flags_are_checked(run_dir, tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("x")
    assert main([str(run_dir["dir"]), "--out", str(tmp_path / "busy")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert (tmp_path / "busy" / "keep.txt").read_text() == "x"
    assert main([str(run_dir["dir"]), "--out", str(tmp_path / "o"), "--revision", "step-2"]) == 2
    assert "--revision: only used with --push-to-hub" in capsys.readouterr().err
    assert main([str(run_dir["dir"]), "--out", str(tmp_path / "o"), "--push-to-hub", "not a repo"]) == 2
    assert "not a Hub repo id" in capsys.readouterr().err


def test_base_model_names_the_published_base(run_dir, tmp_path):
    # A run on a local base folder publishes under the base's Hub id (not checked without --merge: no network).
    assert main([str(run_dir["dir"]), "--out", str(tmp_path / "o"), "--base-model", "someorg/some-base"]) == 0
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["base_model_name_or_path"] == "someorg/some-base"
    meta = front_matter((tmp_path / "o" / "README.md").read_text())
    assert meta["base_model"] == "someorg/some-base" and "license" not in meta  # rank1 does not guess a license


def test_card_states_the_runs_held_out_accuracy_and_its_paired_gain(run_dir, tmp_path):
    summary = {"objective": "grpo", "heldout_start": 0.235, "heldout_end": 0.245, "heldout_start_step": 0, "heldout_end_step": 30,
               "heldout_ci95_end": [0.19, 0.31], "heldout_problems": 200, "heldout_sampled_start": 0.166,
               "heldout_sampled_end": 0.205, "heldout_gain_pass@1": 0.01, "heldout_gain_pass@1_ci95": [-0.03, 0.05],
               "heldout_gain_sampled_pass@1": 0.039, "heldout_gain_sampled_pass@1_ci95": [0.02, 0.059]}  # what `rank1 train` writes
    (run_dir["dir"] / "summary.json").write_text(json.dumps(summary))
    try:
        assert main([str(run_dir["dir"]), "--out", str(tmp_path / "card")]) == 0
    finally:
        (run_dir["dir"] / "summary.json").unlink()
    card = (tmp_path / "card" / "README.md").read_text()
    assert "23.5 % at step 0 -> 24.5 % at step 30 (95 % interval 19.0-31.0 %)" in card
    assert "Sampled pass@1 (the share of correct samples): 16.6 % -> 20.5 %." in card
    assert "Gain in sampled_pass@1: +3.9 points (paired over problems, 95 % interval +2.0 to +5.9)." in card
    assert "Gain in pass@1: +1.0 points" in card
