"""The SFT learner in this process (DeepSpeed, world size 1): it overfits, only adapters move, and the
saved adapter is non-empty, equals the live weights and reproduces the trained model's logits."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from rank1.core.workers import free_port
from rank1.core.flags import load_config
from rank1.core.data import load_sft_data
from rank1.trainer.learner import Learner, Placement
from rank1.trainer.sft import SFTObjective

pytestmark = pytest.mark.slow  # trains in a module fixture: the fast tier leaves it out

STEPS = 12


@pytest.fixture(scope="module")
def trained(model_path, tokenizer, tmp_path_factory):
    cfg = load_config(["--data.arithmetic_rows", "4", "--trainer.global_batch_size", "4", "--trainer.micro_batch_size", "2",
                       "--trainer.lr", "5e-3", "--max-steps", str(STEPS), "--trainer.zero_stage", "0", "--output-dir", "unused"])
    data = load_sft_data(cfg.data, tokenizer)
    objective = SFTObjective.from_config(cfg)
    batches = [objective.collate(data.examples[:2], tokenizer.pad_token_id), objective.collate(data.examples[2:], tokenizer.pad_token_id)]
    targets = objective.normalizer(data.examples)
    learner = Learner(cfg.model, cfg.adapter, cfg.trainer, objective, model_path, Placement(0, 1, "127.0.0.1", free_port()), STEPS)
    base_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" not in n}
    adapter_before = {n: p.detach().clone() for n, p in learner.model.named_parameters() if "lora_" in n}
    losses = [learner.train_step(batches, targets)["loss_sum"] / targets for _ in range(STEPS)]
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    learner.save_adapter(str(folder))
    with torch.no_grad():
        learner.engine.eval()
        logits = learner.engine(input_ids=batches[0]["input_ids"], attention_mask=batches[0]["attention_mask"]).logits
    yield dict(learner=learner, losses=losses, base_before=base_before, adapter_before=adapter_before, folder=folder,
               batch=batches[0], logits=logits)
    learner.close()


def test_sft_overfits_a_handful_of_rows(trained):
    losses = trained["losses"]
    assert losses[-1] < losses[0] / 3, losses


def test_only_adapter_parameters_change(trained):
    model = trained["learner"].model
    for name, param in model.named_parameters():
        if "lora_" in name:
            continue
        assert torch.equal(param, trained["base_before"][name]), name
    moved = [n for n, p in model.named_parameters() if "lora_" in n and not torch.equal(p, trained["adapter_before"][n])]
    assert len(moved) == 420  # every A and B of all 210 adapters
    assert all(p.grad is None or not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    # Optimizer state exists only for the adapter vectors.
    state = trained["learner"].engine.optimizer.state
    assert sum(s["exp_avg"].numel() for s in state.values()) == 305_280


def test_saved_adapter_is_standard_nonempty_and_equal_to_live_weights(trained):
    folder = trained["folder"]
    config = json.loads((folder / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["use_rslora"], config["peft_type"]) == (1, 16, True, "LORA")
    saved = load_file(str(folder / "adapter_model.safetensors"))
    live = trained["learner"].adapter_tensors()
    assert len(saved) == 420 and sum(t.numel() for t in saved.values()) == 305_280
    assert saved.keys() == live.keys()
    assert all(torch.equal(saved[k], live[k]) for k in saved)


def test_saved_adapter_reproduces_logits_with_peft(trained, model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(trained["folder"])).eval()
    batch = trained["batch"]
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["attention_mask"].bool()
    torch.testing.assert_close(logits[mask], trained["logits"][mask], atol=1e-4, rtol=1e-4)
    with torch.no_grad(), model.disable_adapter():
        base_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert (base_logits[mask] - logits[mask]).abs().max() > 1e-2  # the adapter does something
