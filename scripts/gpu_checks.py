"""The checks of scripts/gpu_check.py, one function each: (name, function(state) -> detail, packages needed).

They import only what a GPU image with torch, transformers and peft has (no math-verify, Ray, DeepSpeed
or vLLM unless the row names it), so none reaches rank1.driver.run or the rewards role.

`state` carries the model folder, device and dtype, and what one check leaves for the next (the trained
adapter). Each returns a short detail for the table or raises.
"""

from __future__ import annotations

import time

import torch


def _cfg(state, *flags: str):
    from rank1.core.flags import load_config

    precision = "bf16" if state["dtype"] == torch.bfloat16 else "fp32"
    return load_config(["--model", state["model"], "--trainer.device", state["device"], "--trainer.precision", precision,
                        "--trainer.zero_stage", "0", "--trainer.global_batch_size", "4", "--trainer.micro_batch_size", "2",
                        "--data.arithmetic_rows", "8", "--data.max_length", "96", "--output-dir", str(state["work"] / "run"), *flags])


def _batches(state, cfg, objective):
    from rank1.core.data import load_sft_data
    from rank1.core.model import load_tokenizer

    tokenizer = load_tokenizer(state["model"], cfg.model)
    data = load_sft_data(cfg.data, tokenizer)
    rows = data.examples[:4]
    return [objective.collate(rows[:2], tokenizer.pad_token_id), objective.collate(rows[2:], tokenizer.pad_token_id)], \
        objective.normalizer(rows), tokenizer


def learner_steps(state) -> str:
    """The DeepSpeed learner (ZeRO-0, one rank) in bf16 on the GPU: loss falls, the adapter is saved."""
    from rank1.core.workers import free_port
    from rank1.trainer.learner import Learner, Placement
    from rank1.trainer.sft import SFTObjective

    cfg = _cfg(state, "--lr", "5e-3")
    objective = SFTObjective.from_config(cfg)
    batches, norm, _ = _batches(state, cfg, objective)
    learner = Learner(cfg.model, cfg.adapter, cfg.trainer, objective, state["model"], Placement(0, 1, "127.0.0.1", free_port()),
                      state["steps"], cfg.seed)
    try:
        losses, began = [], time.perf_counter()
        for _ in range(state["steps"]):
            losses.append(learner.train_step(batches, norm)["loss_sum"] / norm)
        per_step = (time.perf_counter() - began) / state["steps"]
        assert losses[-1] < losses[0], losses
        learner.save_adapter(str(state["work"] / "ds-adapter"))
        return f"{learner.device}, loss {losses[0]:.3f} -> {losses[-1]:.3f}, {per_step:.2f} s/step"
    finally:
        learner.close()


def objective_steps(state) -> str:
    """The SFT objective with torch AdamW on a PEFT model (no DeepSpeed): the adapter later checks use."""
    from peft import get_peft_model_state_dict

    from rank1.core.adapter_io import write_adapter
    from rank1.core.model import attach_adapter, load_base
    from rank1.trainer.sft import SFTObjective

    cfg = _cfg(state)
    objective = SFTObjective.from_config(cfg)
    batches, norm, tokenizer = _batches(state, cfg, objective)
    model = attach_adapter(load_base(state["model"], cfg.model, state["dtype"]).to(state["device"]), cfg.adapter, "check")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=5e-3, betas=(0.9, 0.95))
    losses, began = [], time.perf_counter()
    for _ in range(state["steps"]):
        optimizer.zero_grad()
        total = sum(objective.loss(model, {k: v.to(state["device"]) for k, v in b.items()})[0] for b in batches) / norm
        total.backward()
        optimizer.step()
        losses.append(float(total))
    assert losses[-1] < losses[0], losses
    tensors = {k: v.detach().float().cpu() for k, v in get_peft_model_state_dict(model).items()}
    write_adapter(state["work"] / "adapter", tensors, model.peft_config["default"], state["model"])
    state.update(adapter=tensors, peft_config=model.peft_config["default"].to_dict(), learner=model.eval(), tokenizer=tokenizer)
    return f"loss {losses[0]:.3f} -> {losses[-1]:.3f}, {(time.perf_counter() - began) / state['steps']:.2f} s/step"


def grpo_loss(state) -> str:
    """The GRPO loss at temperature 0.7 with KL and importance weights: finite, with gradients on the adapter."""
    from rank1.trainer.grpo import GRPOObjective

    model, ids = state["learner"], state["tokenizer"].encode("What is 6 * 7? The answer is 42.")
    objective = GRPOObjective(2, 256, 8, temperature=0.7, kl_coef=0.04)
    rows = [{"prompt_ids": ids[:6], "completion_ids": ids[6:], "advantage": a, "engine_logprobs": [-1.0] * len(ids[6:])}
            for a in (1.0, -1.0)]
    batch = {k: v.to(state["device"]) for k, v in objective.collate(rows, state["tokenizer"].pad_token_id).items()}
    model.train()
    with model.disable_adapter():
        batch["ref_logprobs"] = objective.logprobs(model, batch)
    loss, stats = objective.loss(model, batch)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad and p.grad is not None]
    model.zero_grad()
    model.eval()
    assert torch.isfinite(loss) and grads and all(torch.isfinite(g).all() for g in grads)
    # The chunked logprob pass on the device (CUDA chunks are larger) against log_softmax + gather.
    from rank1.core.logprobs import token_logprobs, token_logprobs_and_entropy

    logits = (torch.randn(2, 300, 32000, device=state["device"]) * 4).requires_grad_()
    targets = torch.randint(0, 32000, (2, 300), device=state["device"])
    ours, _ = token_logprobs_and_entropy(logits, targets, 0.7)
    theirs = token_logprobs(logits, targets, 0.7)
    grad_ours, = torch.autograd.grad(ours.sum(), logits)
    grad_theirs, = torch.autograd.grad(theirs.sum(), logits)
    diff = max(float((ours - theirs).abs().max()), float((grad_ours - grad_theirs).abs().max()))
    assert diff < 1e-4, f"chunked logprobs differ from log_softmax by {diff:.3g}"
    return f"loss {float(loss):.4f}, kl {stats['kl_sum']:.2e}, chunked logprobs max diff {diff:.2g}"


def engine_sync(state) -> str:
    """The transformers engine in bf16: the adapter sync and its probe against the learner, and a stale engine caught."""
    from rank1.core.logprobs import sequence_logprobs
    from rank1.rollout.engine import AdapterReceipt, SamplingSpec, adapter_digest, max_abs_diff
    from rank1.rollout.hf_engine import HFEngine
    from rank1.rollout.sync import PROBE_NOISE, AdapterSyncError, check_receipts

    name = "bfloat16" if state["dtype"] == torch.bfloat16 else "float32"
    engine = HFEngine(state["model"], dtype=name, device=state["device"])
    atol = 2 * PROBE_NOISE[name]
    probe = engine.probe_token_ids()
    receipt = engine.load_adapter(state["adapter"], state["peft_config"], 1)
    expected = sequence_logprobs(state["learner"], probe)
    noise = check_receipts([receipt], 1, adapter_digest(state["adapter"]), expected, atol)
    v2 = {k: v * 3 if "lora_B" in k else v for k, v in state["adapter"].items()}
    stale = AdapterReceipt(2, adapter_digest(v2), receipt.probe_logprobs)
    from peft import set_peft_model_state_dict

    set_peft_model_state_dict(state["learner"], {k: v.to(state["dtype"]) for k, v in v2.items()})
    expected_v2 = sequence_logprobs(state["learner"], probe)
    set_peft_model_state_dict(state["learner"], {k: v.to(state["dtype"]) for k, v in state["adapter"].items()})
    try:
        check_receipts([stale], 2, adapter_digest(v2), expected_v2, atol, previous_probe=expected, noise=noise)
        caught = "not decisive (versions closer than the noise)"
    except AdapterSyncError:
        caught = "caught"
    prompts = [state["tokenizer"].encode(f"Count to {i}.") for i in range(8)]
    began = time.perf_counter()
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=32, temperature=1.0, seed=0))
    tokens = sum(len(c.token_ids) for c in out)
    return (f"probe max diff {max_abs_diff(receipt.probe_logprobs, expected):.3g} (tol {atol}), stale engine {caught}, "
            f"{tokens / (time.perf_counter() - began):.0f} tok/s; diff to v2 {max_abs_diff(expected_v2, expected):.2f}")


def capture(state) -> str:
    """Activation capture in the GPU dtype: one scalar per adapter and token, stored as fp32."""
    from rank1.core.config import DataConfig, ModelConfig
    from rank1.sae.capture import ActivationCapture
    from rank1.sae.collect import decoder_only
    from rank1.sae.documents import load_documents, padded_batch
    from rank1.sae.loading import load_for_study

    model, tokenizer, _, _ = load_for_study(state["work"] / "adapter", ModelConfig(name_or_path=state["model"]), state["device"],
                                            "bfloat16" if state["dtype"] == torch.bfloat16 else "float32")
    docs = load_documents(DataConfig(max_rows=8, max_length=96), tokenizer)
    ids, mask, _ = padded_batch(docs, tokenizer.pad_token_id)
    with torch.inference_mode(), ActivationCapture(model, neurons_per_layer=6) as cap:
        decoder_only(model)(input_ids=ids.to(model.device), attention_mask=mask.to(model.device))
        acts = cap.adapter_activations()
    assert acts.dtype == torch.float32 and torch.isfinite(acts).all()
    return f"{tuple(acts.shape)} on {acts.device}"


def vllm_engine(state, adapter_mode: str = "lora") -> str:
    """vLLM with the rank-1 adapter on the GPU (CUDA graphs), through LoRA or merged into the weights: the sync's
    probe against the learner, and generation speed (which mode to use where: the README's Rollouts section)."""
    from rank1.core.logprobs import sequence_logprobs
    from rank1.rollout.engine import SamplingSpec, adapter_digest, max_abs_diff
    from rank1.rollout.sync import PROBE_NOISE, check_receipts
    from rank1.rollout.vllm_engine import VLLMEngine

    name = "bfloat16" if state["dtype"] == torch.bfloat16 else "float32"
    engine = VLLMEngine(state["model"], dtype=name, max_model_len=1024, gpu_memory_utilization=0.3, adapter_mode=adapter_mode)
    receipt = engine.load_adapter(state["adapter"], state["peft_config"], 1)
    expected = sequence_logprobs(state["learner"], engine.probe_token_ids())
    check_receipts([receipt], 1, adapter_digest(state["adapter"]), expected, 2 * PROBE_NOISE[name])
    prompts = [state["tokenizer"].encode(f"Count to {i}.") for i in range(32)]
    began = time.perf_counter()
    out = engine.generate(prompts, SamplingSpec(max_new_tokens=64, temperature=1.0, seed=0))
    tokens = sum(len(c.token_ids) for c in out)
    rate = tokens / (time.perf_counter() - began)
    del engine  # its GPU memory back before the next engine starts
    return f"probe max diff {max_abs_diff(receipt.probe_logprobs, expected):.3g}, {rate:.0f} tok/s at batch 32"


def vllm_merged(state) -> str:
    return vllm_engine(state, "merged")


def ray_device(state) -> str:
    """A Ray actor given one GPU sees exactly it, as device 0 (the learners' device rule)."""
    import ray

    from rank1.core.workers import WorkerGroup
    from rank1.driver.placement import RewardProbe

    ray.init(num_cpus=2, num_gpus=1 if state["device"] == "cuda" else 0, include_dashboard=False)
    try:
        group = WorkerGroup(RewardProbe, 1, lambda i, ips: (), num_cpus=1, num_gpus=1 if state["device"] == "cuda" else 0, placement="PACK")
        report = group.call("report")[0]
        group.shutdown()
    finally:
        ray.shutdown()
    return f"CUDA_VISIBLE_DEVICES={report['cuda_visible_devices'] or '-'}, device {report['device']}"


CHECKS = [
    ("learner steps (DeepSpeed)", learner_steps, ("deepspeed",)),
    ("objective steps (torch AdamW)", objective_steps, ()),
    ("GRPO loss, T=0.7, KL", grpo_loss, ()),
    ("transformers engine sync + probe", engine_sync, ()),
    ("activation capture", capture, ()),
    ("vLLM engine (LoRA)", vllm_engine, ("vllm",)),
    ("vLLM engine (merged)", vllm_merged, ("vllm",)),
    ("Ray actor device", ray_device, ("ray",)),
]
