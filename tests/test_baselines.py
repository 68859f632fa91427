"""The baselines "recovered" is measured against: rank-r adapters train exactly r × (in + out) parameters per
module with the base frozen, and the full fine-tune moves every weight and writes a plain model folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1_testing import run_rank1

SMALL = ["--data.arithmetic_rows", "16", "--data.max_length", "96", "--trainer.global_batch_size", "2",
         "--trainer.micro_batch_size", "2", "--logging.progress", "false", "--trainer.checkpoint_every", "0", "--max-steps", "1"]


@pytest.mark.parametrize("r", [1, 8, 64])
def test_rank_r_trains_r_times_in_plus_out_per_module_and_nothing_of_the_base(model_path, r):
    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, linear_shapes, load_base

    cfg = AdapterConfig(r=r)
    base = load_base(model_path, ModelConfig(), torch.float32)
    shapes = {name: shape for name, shape in linear_shapes(base).items() if name.rsplit(".", 1)[-1] in cfg.target_modules}
    model = attach_adapter(base, cfg, "smollm2-135m-instruct")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_A" in n or "lora_B" in n for n in trainable)  # the base is frozen
    assert len(shapes) == 30 * 7  # SmolLM2-135M: 30 layers × q, k, v, o, gate, up, down
    assert sum(trainable.values()) == r * sum(i + o for i, o in shapes.values())


@pytest.mark.slow
def test_a_rank_8_run_writes_a_rank_8_adapter(tmp_path):
    out = tmp_path / "r8"
    result = run_rank1("train", *SMALL, "--adapter.r", "8", "--eval.in_training", "false", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    tensors = load_file(str(out / "adapter" / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in tensors.items() if "lora_A" in k} == {8}
    assert any(float(t.abs().max()) > 0 for k, t in tensors.items() if "lora_B" in k)  # B left 0 by the step: it learned


@pytest.mark.slow
def test_the_full_fine_tune_moves_every_weight_and_is_evaluated_like_an_adapter(tmp_path, model_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "full"
    result = run_rank1("train", *SMALL, "--adapter.full_finetune", "true", "--lr", "1e-5", "--rollout.backend", "transformers",
                       "--eval.heldout_rows", "4", "--eval.max_new_tokens", "8", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "full fine-tune baseline, all 134,515,008 weights trained" in result.stderr
    assert not (out / "adapter").exists()
    tuned = AutoModelForCausalLM.from_pretrained(out / "model", dtype=torch.float32).state_dict()
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).state_dict()
    assert tuned.keys() == base.keys()
    unmoved = [k for k in base if torch.equal(base[k], tuned[k])]
    assert not unmoved, unmoved[:5]  # AdamW moves every weight (weight decay reaches even unused embedding rows)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "heldout_accuracy" in r] == [0, 1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["heldout_problems"] == 4


@pytest.mark.parametrize("flags, message", [
    (["--objective", "grpo"], "the full fine-tune baseline trains SFT only"),
    (["--trainer.zero_stage", "3"], "a small-model baseline at trainer.zero_stage 0"),
    (["--export.push_to_hub", "me/x"], "the baseline's model is not pushed"),
])
def test_full_fine_tune_refuses_what_it_does_not_do(tmp_path, flags, message):
    result = run_rank1("train", *SMALL, "--adapter.full_finetune", "true", *flags, "--output-dir", str(tmp_path / "x"))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr
