"""GRPO objective: PPO-clipped policy gradient with group-relative advantages (DeepSeekMath), on the adapter.

    advantage_i = (r_i - mean(r_group)) / (std(r_group) + 1e-4)     (no division with scale_rewards none)
    ratio_t     = exp(logp_t - old_logp_t)
    loss_t      = -min(ratio_t * A, clip(ratio_t, 1 - eps_low, 1 + eps_high) * A) * w_t + beta * k3_t
    w_t         = min(exp(old_logp_t - engine_logp_t), is_cap)      (truncated importance weight)
    k3_t        = (exp(ref_t - logp_t) - (ref_t - logp_t) - 1) * ratio_t   (ref: the base, adapter disabled)

The formulas are TRL's GRPOTrainer's (tests/test_grpo_loss.py checks equality to 1e-6, at T = 1 and
T = 0.7). Logprobs are those of the distribution the engines sampled: logits divided by
grpo.temperature. `GRPOObjective.loss` returns a *sum* over this micro-batch; the learner divides by
`normalizer(rows)` of the whole global batch (completion tokens, sequences, or sequences ×
max_completion_length), so the gradient does not depend on how completions are split over
micro-batches and learners — as for SFT. Advantages are the driver's (rank1.driver.grpo).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rank1.core.config import Config, ConfigError
from rank1.core.logprobs import token_logprobs
from rank1.trainer.sft import split_rows, weighted_rows


@dataclass(frozen=True)
class GRPOObjective:
    rows_per_step: int  # completions per rollout batch: prompts_per_step × num_generations
    max_sequence_tokens: int  # prompt + completion: rollout.max_model_len
    max_completion_length: int
    temperature: float = 1.0
    epsilon_low: float = 0.2
    epsilon_high: float = 0.2
    aggregation: str = "token"  # token | sequence | constant
    kl_coef: float = 0.0
    is_correction: bool = True
    is_cap: float = 3.0
    name: str = "grpo"
    rollout_engines: bool = True  # trains on the engines' samples
    instruction: str | None = None  # grpo.instruction, appended to each question in training (and so in eval)

    @classmethod
    def from_config(cls, cfg: Config) -> GRPOObjective:
        g, t = cfg.grpo, cfg.trainer
        rows = g.prompts_per_step * g.num_generations
        split_rows(rows, t.micro_batch_size, t.num_learners, "grpo.prompts_per_step × grpo.num_generations")
        if g.max_completion_length >= cfg.rollout.max_model_len:
            raise ConfigError(f"grpo.max_completion_length: {g.max_completion_length} leaves no room for a prompt in "
                              f"rollout.max_model_len={cfg.rollout.max_model_len}")
        if g.top_p != 1.0:
            raise ConfigError(f"grpo.top_p: {g.top_p} truncates the sampling distribution, which the learner's logprobs "
                              "cannot follow (the PPO ratio would compare different distributions); GRPO samples with top_p 1")
        return cls(rows, cfg.rollout.max_model_len, g.max_completion_length, g.temperature, g.epsilon_low, g.epsilon_high,
                   g.aggregation, g.kl_coef, g.is_correction, g.is_cap, instruction=g.instruction)

    # ------------------------------------------------------------ batches

    def collate(self, rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
        return collate_rollouts(rows, pad_id)

    def normalizer(self, rows: list[dict]) -> float:
        """What the summed loss of a global batch is divided by (see the module docstring)."""
        lengths = [len(r["completion_ids"]) for r in rows if r.get("weight", 1.0)]
        if self.aggregation == "token":
            return float(max(1, sum(lengths)))
        if self.aggregation == "sequence":
            return float(max(1, len(lengths)))
        return float(max(1, len(lengths)) * self.max_completion_length)  # constant: Dr. GRPO

    # ------------------------------------------------------------ the loss

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        return grpo_loss_sum(model, batch, self)

    def logprobs(self, model, batch: dict) -> torch.Tensor:
        return rollout_logprobs(model, batch, self.temperature)


# ---------------------------------------------------------------- batches


def collate_rollouts(rows: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Completions -> right-padded tensors; per-token fields are aligned with targets (length L - 1).

    Each row: prompt_ids, completion_ids, advantage, engine_logprobs (one per completion token), and
    optionally weight (0 for the padding rows that keep micro-batch counts equal across learners).
    `completion_mask[b, t]` is 1 where token t + 1 of row b is a completion token (the position whose
    logits predict it is t). A row with an empty completion contributes nothing.
    """
    width = max(len(r["prompt_ids"]) + len(r["completion_ids"]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width - 1))
    engine_logprobs = torch.zeros((n, width - 1))
    for b, r in enumerate(rows):
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        input_ids[b, : p + c] = torch.tensor(r["prompt_ids"] + r["completion_ids"], dtype=torch.long)
        attention_mask[b, : p + c] = 1
        completion_mask[b, p - 1 : p - 1 + c] = float(r.get("weight", 1.0))
        engine_logprobs[b, p - 1 : p - 1 + c] = torch.tensor(r["engine_logprobs"], dtype=torch.float32)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "engine_logprobs": engine_logprobs,
        "advantages": torch.tensor([float(r["advantage"]) for r in rows]),
    }


def target_positions(completion_mask: torch.Tensor) -> torch.Tensor:
    """Positions whose logits some row needs: the vocabulary projection runs only there. A micro-batch
    of padding rows needs none, but keeps one position so its forward (a collective) still runs."""
    keep = (completion_mask > 0).any(dim=0).nonzero().squeeze(1)
    return keep if keep.numel() else torch.zeros(1, dtype=torch.long)


def completion_logprobs(model, batch: dict, keep: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """log p_T(token t+1 | ..t) at positions `keep`, shape (B, len(keep)); and the entropy there if asked.

    One log-softmax over the vocabulary serves both: at a few thousand positions × 49k tokens it is the
    largest tensor of the step (measured: a second one cost ~1.2 s of a 13 s learning step)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = batch["input_ids"][:, keep + 1]
    if not with_entropy:
        return token_logprobs(logits, targets, temperature), None
    logits = logits.float()
    log_probs = (logits / temperature if temperature != 1.0 else logits).log_softmax(-1)
    with torch.no_grad():  # a metric: no graph kept for it
        entropy = -(log_probs.exp() * log_probs).sum(-1)
    return log_probs.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


# ---------------------------------------------------------------- the loss


def per_token_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    s: GRPOObjective,
    ref_logprobs: torch.Tensor | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The per-token GRPO loss (B, T) before masking and aggregation, and per-token diagnostics."""
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - s.epsilon_low, 1 + s.epsilon_high)
    adv = advantages.unsqueeze(1)
    loss = -torch.min(ratio * adv, clipped * adv)
    parts = {"clipped": ((ratio * adv) > (clipped * adv)).float()}  # the clip changed this token's term
    if is_weights is not None:
        loss = loss * is_weights
    if s.kl_coef != 0.0:
        delta = ref_logprobs - logprobs
        # Weighted by the ratio (DeepSeek-V3.2; TRL's default use_bias_correction_kl): the k3 estimate's
        # gradient is then the unbiased reverse-KL gradient even off-policy.
        kl = (torch.exp(delta) - delta - 1) * ratio
        loss = loss + s.kl_coef * kl
        parts["kl"] = kl.detach()
    return loss, parts


def importance_weights(old_logprobs: torch.Tensor, engine_logprobs: torch.Tensor, mask: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated per-token weights pi_learner / pi_engine (TRL's token_truncate mode)."""
    return torch.clamp(torch.exp((old_logprobs - engine_logprobs) * mask), max=cap)


def aggregate_sum(loss: torch.Tensor, mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """Per-row sums (B,) of this micro-batch; their total is divided later by `normalizer(...)` of the whole global batch."""
    if aggregation == "sequence":  # each sequence's mean token loss
        return (loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
    return (loss * mask).sum(-1)


def grpo_loss_sum(model, batch: dict, s: GRPOObjective) -> tuple[torch.Tensor, dict[str, float]]:
    """Summed GRPO loss of a micro-batch (with grad) and summed statistics for the step's metrics.

    `batch` may carry `old_logprobs` (when the rollout batch is reused for several optimizer steps)
    and `ref_logprobs` (when kl_coef > 0), both (B, L - 1) like `completion_mask`; without
    `old_logprobs` the current policy is the sampling policy, so old = current (ratio 1, as in TRL).
    """
    keep = target_positions(batch["completion_mask"])
    mask = batch["completion_mask"][:, keep]
    logprobs, entropy = completion_logprobs(model, batch, keep, s.temperature, with_entropy=True)
    old = batch["old_logprobs"][:, keep] if "old_logprobs" in batch else logprobs.detach()
    ref = batch["ref_logprobs"][:, keep] if s.kl_coef != 0.0 else None
    weights = importance_weights(old, batch["engine_logprobs"][:, keep], mask, s.is_cap) if s.is_correction else None
    loss, parts = per_token_loss(logprobs, old, batch["advantages"], s, ref, weights)
    rows = aggregate_sum(loss, mask, s.aggregation)
    tokens = float(mask.sum())
    stats = {
        "completion_tokens": tokens,
        "entropy_sum": float((entropy * mask).sum()),
        "clipped_sum": float((parts["clipped"] * mask).sum()),
        "kl_sum": float((parts["kl"] * mask).sum()) if "kl" in parts else 0.0,
    }
    if weights is not None:
        on = mask > 0
        stats.update(is_sum=float(weights[on].sum()), is_min=float(weights[on].min()) if on.any() else 1.0,
                     is_max=float(weights[on].max()) if on.any() else 1.0)
    if "row_weight" in batch:  # rows of several runs (rank1 sweep)
        # Each row's mean |learner - engine| token logprob: the sweep's check that an engine sampled each
        # run's prompts from that run's adapter slot (a row served by another run's adapter stands out).
        gap = ((logprobs.detach() - batch["engine_logprobs"][:, keep]).abs() * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        stats["row_engine_gap"] = gap.tolist()
        return weighted_rows(rows, batch, stats)
    return rows.sum(), stats


@torch.no_grad()
def rollout_logprobs(model, batch: dict, temperature: float = 1.0) -> torch.Tensor:
    """Logprobs (B, L - 1) of the completion tokens under `model` as it is now (zeros elsewhere)."""
    keep = target_positions(batch["completion_mask"])
    logprobs, _ = completion_logprobs(model, batch, keep, temperature)
    full = torch.zeros_like(batch["completion_mask"])
    full[:, keep] = logprobs.float()
    return full
