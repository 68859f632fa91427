"""Captured adapter activations are A·x of the real PEFT model; splicing puts values back in."""

from __future__ import annotations

import torch

from rank1.core.config import ModelConfig
from rank1.core.model import load_base
from rank1.sae.capture import ActivationCapture, SpliceAdapters, adapter_sites


def test_capture_equals_A_times_module_input_on_smollm2(model_path, tmp_path, adapter_factory):
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter = adapter_factory(model_path, tmp_path / "adapter", seed=1, b_scale=0.05)
    model = PeftModel.from_pretrained(load_base(model_path, ModelConfig(), torch.float32), adapter).eval()
    sites = adapter_sites(model)
    assert len(sites) == 210  # 30 layers x 7 projections
    assert all(s.lora_A.weight.abs().sum() > 0 for s in sites)

    # Module inputs read independently of lora_A: a pre-hook on each LoRA-wrapped layer.
    inputs = {}
    wrappers = {n.removeprefix("base_model.model."): m for n, m in model.named_modules()}
    handles = [wrappers[s.name].register_forward_pre_hook(lambda m, args, name=s.name: inputs.__setitem__(name, args[0].detach())) for s in sites]
    tok = AutoTokenizer.from_pretrained(model_path)
    ids = tok(["Natalia sold clips to 48 of her friends.", "What is 2 + 3?"], return_tensors="pt", padding=True)
    with torch.inference_mode():
        plain = model(**ids).logits
        with ActivationCapture(model, neurons_per_layer=6) as cap:
            captured_logits = model(**ids).logits
    for h in handles:
        h.remove()
    s = cap.adapter_activations()
    by_hand = torch.cat([inputs[site.name] @ site.lora_A.weight.T for site in sites], dim=-1)
    assert s.shape == (2, ids["input_ids"].shape[1], 210)
    torch.testing.assert_close(s, by_hand, rtol=1e-5, atol=1e-6)
    assert s.abs().mean() > 1e-3  # not trivially zero
    torch.testing.assert_close(captured_logits, plain, rtol=0, atol=0)  # capture does not change the forward
    neurons = cap.neuron_activations()
    assert neurons.shape[-1] == 30 * 6 and len(cap.neuron_names) == 180

    # Splicing the captured values back changes nothing; splicing zeros equals the base model.
    with torch.inference_mode():
        with SpliceAdapters(model, s):
            same = model(**ids).logits
        with SpliceAdapters(model, torch.zeros_like(s)):
            zeroed = model(**ids).logits
        with model.disable_adapter():
            base = model(**ids).logits
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(zeroed, base, rtol=1e-5, atol=1e-5)
    assert (plain - base).abs().max() > 1e-3  # the adapter does change the model
