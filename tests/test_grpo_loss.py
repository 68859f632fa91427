"""The GRPO loss equals TRL's GRPOTrainer's on the same model, logprobs, old logprobs, advantages and
masks (to 1e-6) for each aggregation; advantages and the batch layout; the KL reference is the base."""

from __future__ import annotations

import pytest
import torch

from rank1.driver.grpo import group_advantages
from rank1.trainer.grpo import GRPOObjective, collate_rollouts, grpo_loss_sum, rollout_logprobs

# rank1 aggregation -> TRL loss_type
AGGREGATIONS = {"token": "dapo", "sequence": "grpo", "constant": "dr_grpo"}
PROMPT_LEN, MAX_NEW = 5, 8
COMPLETION_LENS = [8, 3, 6, 1]


def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(config)


def randomize_b(model) -> None:
    """A fresh LoRA has B = 0 (policy == reference); give B values so the adapter matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


@pytest.fixture(scope="module")
def policy(tokenizer):
    """A tiny random Llama with SmolLM2's vocabulary and a rank-1 adapter whose B is not zero."""
    from peft import get_peft_model

    from rank1.core.config import AdapterConfig
    from rank1.core.model import lora_config

    model = get_peft_model(tiny_llama(tokenizer), lora_config(AdapterConfig()))
    randomize_b(model)
    return model.eval()


def rollout_rows(seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i, n in enumerate(COMPLETION_LENS):
        rows.append({
            "prompt_ids": torch.randint(10, 1000, (PROMPT_LEN,), generator=g).tolist(),
            "completion_ids": torch.randint(10, 1000, (n,), generator=g).tolist(),
            "advantage": [1.2, -0.7, 0.4, -1.5][i],
            "engine_logprobs": (-torch.rand(n, generator=g) * 3).tolist(),
        })
    return rows


def trl_inputs(rows: list[dict], batch: dict, old_full: torch.Tensor, ref_full: torch.Tensor, pad_id: int) -> dict:
    """The same batch in TRL's layout: prompt (all of one length here) + right-padded completion."""
    b = len(rows)
    prompt_ids = torch.tensor([r["prompt_ids"] for r in rows])
    completion_ids = torch.full((b, MAX_NEW), pad_id)
    completion_mask = torch.zeros((b, MAX_NEW), dtype=torch.long)
    for i, r in enumerate(rows):
        completion_ids[i, : len(r["completion_ids"])] = torch.tensor(r["completion_ids"])
        completion_mask[i, : len(r["completion_ids"])] = 1
    span = slice(PROMPT_LEN - 1, PROMPT_LEN - 1 + MAX_NEW)  # completion target positions in rank1's layout
    return {
        "prompt_ids": prompt_ids,
        "prompt_mask": torch.ones_like(prompt_ids),
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": batch["advantages"],
        "old_per_token_logps": pad_to(old_full, MAX_NEW + PROMPT_LEN - 1)[:, span],
        "ref_per_token_logps": pad_to(ref_full, MAX_NEW + PROMPT_LEN - 1)[:, span],
        "sampling_per_token_logps": pad_to(batch["engine_logprobs"], MAX_NEW + PROMPT_LEN - 1)[:, span],
        "num_items_in_batch": completion_mask.sum(),
    }


def pad_to(t: torch.Tensor, width: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]))


def trl_trainer(tokenizer, tmp_path, loss_type: str, beta: float, is_correction: bool, temperature: float = 1.0):
    """TRL's trainer with the paper's rank-1 LoRA on the tiny Llama; its model is the policy both sides use.

    The base model and a peft_config go in (not a PeftModel): then TRL's reference is the base with the
    adapter disabled, as in rank1 (with a PeftModel and beta > 0 it adds a copy of the adapter instead).
    """
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from rank1.core.config import AdapterConfig
    from rank1.core.model import lora_config

    args = GRPOConfig(output_dir=str(tmp_path), loss_type=loss_type, beta=beta, epsilon=0.2, epsilon_high=0.28,
                      num_generations=2, per_device_train_batch_size=4, max_completion_length=MAX_NEW, report_to="none",
                      use_cpu=True, bf16=False, gradient_checkpointing=False, vllm_importance_sampling_clip_max=2.0,
                      temperature=temperature)
    trainer = GRPOTrainer(model=tiny_llama(tokenizer), peft_config=lora_config(AdapterConfig()),
                          reward_funcs=lambda completions, **_: [0.0] * len(completions), args=args,
                          train_dataset=Dataset.from_dict({"prompt": ["x"] * 4}), processing_class=tokenizer)
    # TRL applies its vLLM importance weights only when it generated with vLLM; these two settings are
    # what GRPOTrainer reads for that (no vLLM server is reachable here).
    trainer.use_vllm = is_correction
    trainer.vllm_importance_sampling_correction = is_correction
    randomize_b(trainer.model)
    return trainer, trainer.model.eval()


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
@pytest.mark.parametrize("beta,is_correction,temperature", [(0.0, False, 1.0), (0.04, False, 1.0), (0.0, True, 1.0), (0.04, True, 1.0),
                                                            (0.0, False, 0.7), (0.04, True, 0.7)])
def test_loss_equals_trl_grpo_trainer(tokenizer, tmp_path, aggregation, beta, is_correction, temperature):
    # At T != 1 both sides compute logprobs of logits / T: the distribution the engines sampled from.
    trainer, policy = trl_trainer(tokenizer, tmp_path, AGGREGATIONS[aggregation], beta, is_correction, temperature)
    rows = rollout_rows(seed=1)
    batch = collate_rollouts(rows, tokenizer.pad_token_id)
    current = rollout_logprobs(policy, batch, temperature)
    noise = torch.randn(current.shape, generator=torch.Generator().manual_seed(2))
    batch["old_logprobs"] = (current + 0.3 * noise) * batch["completion_mask"]  # some ratios leave the clip range
    with policy.disable_adapter():
        batch["ref_logprobs"] = rollout_logprobs(policy, batch, temperature)
    settings = GRPOObjective(len(rows), PROMPT_LEN + MAX_NEW, MAX_NEW, temperature=temperature, epsilon_low=0.2,
                             epsilon_high=0.28, aggregation=aggregation, kl_coef=beta, is_correction=is_correction, is_cap=2.0)
    ours, stats = grpo_loss_sum(policy, batch, settings)
    ours = ours / settings.normalizer(rows)

    inputs = trl_inputs(rows, batch, batch["old_logprobs"], batch["ref_logprobs"], tokenizer.pad_token_id)
    if is_correction:  # TRL's token_truncate weights, as _generate_and_score_completions computes them
        diff = (inputs["old_per_token_logps"] - inputs["sampling_per_token_logps"]) * inputs["completion_mask"]
        inputs["importance_sampling_ratio"] = torch.clamp(torch.exp(diff), max=2.0)
    theirs = trainer._compute_loss(policy, inputs)

    assert stats["clipped_sum"] > 0  # the clip is exercised
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)
    # ... and so are the gradients (only the adapter has any)
    ours_grads = torch.autograd.grad(ours, [p for p in policy.parameters() if p.requires_grad])
    theirs_grads = torch.autograd.grad(trainer._compute_loss(policy, inputs), [p for p in policy.parameters() if p.requires_grad])
    for a, b in zip(ours_grads, theirs_grads):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)


def test_group_advantages_and_zero_spread_groups():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = group_advantages(rewards, 4, "group")
    std = torch.tensor([1.0, 0.0, 0.0, 1.0]).std()
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]) / (std + 1e-4))
    assert torch.equal(adv[4:], torch.zeros(4))  # one answer for the whole group: no signal, no NaN
    torch.testing.assert_close(group_advantages(rewards, 4, "none")[:4], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    assert torch.isfinite(group_advantages(torch.zeros(8), 4, "batch")).all()


def test_padding_rows_contribute_nothing(policy, tokenizer):
    rows = rollout_rows(seed=3)
    only_padding = collate_rollouts([dict(rows[0], weight=0.0)], tokenizer.pad_token_id)
    loss, stats = grpo_loss_sum(policy, only_padding, GRPOObjective(1, 64, 8))
    assert float(loss) == 0.0 and stats["completion_tokens"] == 0.0
    grads = torch.autograd.grad(loss, [p for p in policy.parameters() if p.requires_grad], allow_unused=True)
    assert all(g is None or torch.count_nonzero(g) == 0 for g in grads)


def grouped_rows(seed: int, prompt_lens=(5, 9, 7), group=3) -> list[dict]:
    """GRPO groups: `group` completions of each prompt, prompts of different lengths (so some are left-padded)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for p in prompt_lens:
        prompt = torch.randint(10, 1000, (p,), generator=g).tolist()
        for _ in range(group):
            n = int(torch.randint(1, MAX_NEW + 1, (1,), generator=g))
            rows.append({"prompt_ids": prompt, "completion_ids": torch.randint(10, 1000, (n,), generator=g).tolist(),
                         "advantage": float(torch.randn(1, generator=g)), "engine_logprobs": (-torch.rand(n, generator=g) * 3).tolist()})
    return rows


def test_each_prompt_runs_once_with_the_same_loss_and_gradient(policy, tokenizer):
    """The shared-prompt pass (one forward per distinct prompt, its keys and values repeated to the group)
    gives each completion token the logprob of its own unpadded sequence, and the loss and gradient of one
    plain forward over all rows."""
    from rank1.trainer.grpo import completion_logprobs, target_positions

    rows = grouped_rows(seed=4)
    batch = collate_rollouts(rows, tokenizer.pad_token_id)
    assert batch["prompt_rows"].tolist() == [0, 3, 6] and batch["prompt_of_row"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    plain = {k: v for k, v in batch.items() if k != "prompt_rows"}  # without it, one forward over every row
    keep = target_positions(batch)
    with torch.no_grad():
        shared, _ = completion_logprobs(policy, batch, keep)
        for i, r in enumerate(rows):
            ids = torch.tensor([r["prompt_ids"] + r["completion_ids"]])
            alone = policy(input_ids=ids).logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None])[:, 0]
            n = len(r["completion_ids"])
            torch.testing.assert_close(shared[i, :n], alone[-n:], atol=2e-5, rtol=0)
    settings = GRPOObjective(len(rows), 64, MAX_NEW, aggregation="token")
    params = [p for p in policy.parameters() if p.requires_grad]
    sums = {}
    for name, b in (("shared", batch), ("plain", plain)):
        loss, stats = grpo_loss_sum(policy, b, settings)
        sums[name] = (loss.detach(), torch.autograd.grad(loss, params), stats["completion_tokens"])
    assert sums["shared"][2] == sums["plain"][2] == sum(len(r["completion_ids"]) for r in rows)
    torch.testing.assert_close(sums["shared"][0], sums["plain"][0], atol=1e-5, rtol=1e-5)
    for a, b in zip(sums["shared"][1], sums["plain"][1]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    assert any(torch.count_nonzero(a) for a in sums["shared"][1])  # the adapter gets a gradient at all


def test_gradient_checkpointing_runs_one_plain_forward(tokenizer):
    """Under gradient checkpointing transformers drops the cache inside each layer, so the shared-prompt
    pass would let completions attend to nothing before them; the loss then takes one plain forward."""
    from peft import get_peft_model

    from rank1.core.config import AdapterConfig
    from rank1.core.model import lora_config
    from rank1.trainer.grpo import checkpointing

    rows = grouped_rows(seed=5)
    batch = collate_rollouts(rows, tokenizer.pad_token_id)
    settings = GRPOObjective(len(rows), 64, MAX_NEW)
    losses = []
    for enabled in (False, True):
        model = tiny_llama(tokenizer)
        if enabled:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = get_peft_model(model, lora_config(AdapterConfig()))
        randomize_b(model)
        model.train()
        assert checkpointing(model) is enabled
        losses.append(grpo_loss_sum(model, batch, settings)[0].detach())
    torch.testing.assert_close(losses[0], losses[1], atol=1e-5, rtol=1e-5)


def test_micro_batches_keep_groups_together(tokenizer):
    """The driver hands each slot consecutive rows, so a group's prompt runs once; when no slot shares a
    prompt, every slot runs one plain forward (decided for all ranks at once: ZeRO-3 needs equal counts)."""
    from rank1.driver.grpo import split_rollouts

    rows = grouped_rows(seed=6)  # 3 prompts x 3 completions
    shards = split_rollouts(rows, 1, 3, collate_rollouts, tokenizer.pad_token_id)
    assert [mb["prompt_rows"].tolist() for mb in shards[0]] == [[0], [0], [0]]
    assert [mb["input_ids"].shape[0] for mb in shards[0]] == [3, 3, 3]
    two_ranks = split_rollouts(rows[:6], 2, 2, collate_rollouts, tokenizer.pad_token_id)  # 6 rows in 4 slots
    assert [[mb["input_ids"].shape[0] for mb in shard] for shard in two_ranks] == [[1, 2], [1, 2]]
    assert all("prompt_rows" in mb for shard in two_ranks for mb in shard)  # some slots share: all take the shared pass
    singles = split_rollouts(rows, 1, 9, collate_rollouts, tokenizer.pad_token_id)
    assert all("prompt_rows" not in mb for mb in singles[0])  # nothing shared: one plain forward each


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_chunked_logprobs_and_entropy_equal_log_softmax_in_value_and_gradient(temperature):
    from rank1.core.logprobs import token_logprobs, token_logprobs_and_entropy

    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(3, 23, 50, generator=g) * 4).requires_grad_()  # 69 positions: two chunks of 32 and a ragged one
    targets = torch.randint(0, 50, (3, 23), generator=g)
    weights = torch.randn(3, 23, generator=g)
    lp, h = token_logprobs_and_entropy(logits, targets, temperature, chunk=32)
    ref = token_logprobs(logits, targets, temperature)
    torch.testing.assert_close(lp, ref, atol=1e-6, rtol=1e-6)  # float rounding: the same sums in another order
    log_p = (logits / temperature).log_softmax(-1)
    torch.testing.assert_close(h, -(log_p.exp() * log_p).sum(-1), atol=1e-5, rtol=0)
    assert not h.requires_grad  # a statistic
    ours, = torch.autograd.grad((lp * weights).sum(), logits)
    theirs, = torch.autograd.grad((ref * weights).sum(), logits)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=0)


def test_entropy_statistic_is_the_masked_sum_of_each_positions_entropy(policy, tokenizer):
    from rank1.trainer.grpo import target_positions

    rows = rollout_rows(seed=6)
    batch = collate_rollouts(rows, tokenizer.pad_token_id)
    keep = target_positions(batch)
    with torch.no_grad():
        _, stats = grpo_loss_sum(policy, batch, GRPOObjective(len(rows), PROMPT_LEN + MAX_NEW, MAX_NEW))
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch["position_ids"]).logits
    lp = logits[:, keep].float().log_softmax(-1)
    expected = (-(lp.exp() * lp).sum(-1) * batch["completion_mask"][:, keep]).sum()
    assert stats["entropy_sum"] > 0
    torch.testing.assert_close(torch.tensor(stats["entropy_sum"]), expected, atol=1e-3, rtol=1e-5)


@pytest.mark.parametrize("aggregation", list(AGGREGATIONS))
def test_skipping_zero_advantage_rows_leaves_the_update_unchanged(policy, tokenizer, aggregation):
    """Without KL, a row whose advantage is 0 has zero gradient: the learners skip it, and the normalizer
    over every row keeps the step's gradient that of all rows (TRL's), to float rounding. With KL every row runs."""
    from rank1.core.config import GRPOConfig
    from rank1.driver.grpo import learned_rows

    rows = grouped_rows(seed=7)  # 3 groups of 3
    for r in rows[3:6]:
        r["advantage"] = 0.0  # a group whose rewards were all equal
    rows[0]["advantage"] = 0.0  # a row whose reward was its group's mean
    settings = GRPOObjective(len(rows), 64, MAX_NEW, aggregation=aggregation, epsilon_high=0.28)
    kept, norm = learned_rows(rows, settings, GRPOConfig())
    assert [rows.index(r) for r in kept] == [1, 2, 6, 7, 8]
    assert norm == settings.normalizer(rows) != settings.normalizer(kept)  # every row counted, also the skipped
    params = [p for p in policy.parameters() if p.requires_grad]
    grads = {}
    for name, which in (("all", rows), ("kept", kept)):
        batch = collate_rollouts(which, tokenizer.pad_token_id)
        loss, _ = grpo_loss_sum(policy, batch, settings)
        grads[name] = torch.autograd.grad(loss / norm, params)
    for a, b in zip(grads["all"], grads["kept"]):
        torch.testing.assert_close(a, b, atol=1e-7, rtol=1e-4)
    assert any(torch.count_nonzero(a) for a in grads["kept"])
    assert learned_rows(rows, settings, GRPOConfig(kl_coef=0.04))[0] == rows  # the KL term of every row has a gradient
    assert learned_rows(rows, settings, GRPOConfig(skip_zero_advantage_rows=False))[0] == rows
