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
from rank1.core.logprobs import token_logprobs_and_entropy
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
    """Completions -> tensors with prompts left-padded and completions right-padded; per-token fields are
    aligned with targets (length L - 1).

    Each row: prompt_ids, completion_ids, advantage, engine_logprobs (one per completion token), and
    optionally weight (0 for the padding rows that keep micro-batch counts equal across learners).
    Every completion starts at column `prompt_width`, so the positions that predict completion tokens are
    one block of columns, and rows sharing a prompt (a GRPO group) share its columns exactly:
    `prompt_rows` names one row per distinct prompt and `prompt_of_row` maps each row to it, which lets
    the loss run each prompt once (`completion_logprobs`). `position_ids` count real tokens only, so the
    left padding changes no position. `completion_mask[b, t]` is 1 where token t + 1 of row b is a
    completion token (the position whose logits predict it is t). A row with an empty completion
    contributes nothing.
    """
    prompt_width = max(len(r["prompt_ids"]) for r in rows)
    # At least 2 completion columns, so the shared pass always runs a second forward: under ZeRO-3 every
    # rank must run as many forwards as the others.
    width = prompt_width + max(2, max(len(r["completion_ids"]) for r in rows))
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width - 1))
    engine_logprobs = torch.zeros((n, width - 1))
    prompt_index: dict[tuple, int] = {}  # distinct prompt -> its index in prompt_rows
    prompt_rows, prompt_of_row = [], []
    for b, r in enumerate(rows):
        p, c = len(r["prompt_ids"]), len(r["completion_ids"])
        start = prompt_width - p
        input_ids[b, start : prompt_width + c] = torch.tensor(r["prompt_ids"] + r["completion_ids"], dtype=torch.long)
        attention_mask[b, start : prompt_width + c] = 1
        completion_mask[b, prompt_width - 1 : prompt_width - 1 + c] = float(r.get("weight", 1.0))
        engine_logprobs[b, prompt_width - 1 : prompt_width - 1 + c] = torch.tensor(r["engine_logprobs"], dtype=torch.float32)
        key = tuple(r["prompt_ids"])
        if key not in prompt_index:
            prompt_index[key] = len(prompt_rows)
            prompt_rows.append(b)
        prompt_of_row.append(prompt_index[key])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_mask": completion_mask,
        "engine_logprobs": engine_logprobs,
        "advantages": torch.tensor([float(r["advantage"]) for r in rows]),
        "prompt_width": torch.tensor(prompt_width),
        "prompt_rows": torch.tensor(prompt_rows, dtype=torch.long),
        "prompt_of_row": torch.tensor(prompt_of_row, dtype=torch.long),
    }


def target_positions(batch: dict) -> torch.Tensor:
    """Positions whose logits the loss needs, the block of completion columns (collate_rollouts aligns
    every completion at `prompt_width`): the vocabulary projection runs only there. The block is never
    empty, so a micro-batch of padding rows still runs its forward (a collective)."""
    start = int(batch["prompt_width"]) - 1
    return torch.arange(start, batch["input_ids"].shape[1] - 1, device=batch["input_ids"].device)


def completion_logits(model, batch: dict, keep: torch.Tensor) -> list[torch.Tensor]:
    """Logits (B, k, V) at positions `keep`, as consecutive parts along k (one, or the prompts' last
    position and then the completions': not concatenated, which would copy the largest tensor of the step).

    A GRPO group is G completions of one prompt, so by default each distinct prompt runs once: a first
    forward over the prompts alone keeps their keys and values, which are then repeated to their rows
    (an index_select, so each row's gradient flows back into its prompt's pass) and attended to by a
    second forward over the completions. The same sums as one forward over every row (to float
    rounding), at a fraction of the prompt tokens: at G = 4 and prompts twice as long as completions,
    half the tokens. A sweep's micro-batch (rows carry `run`: rank1.trainer.batched_rank1 indexes
    adapters by row) runs as one plain forward, and so does a model training with gradient checkpointing
    (transformers then drops the cache inside each layer: the completions would attend to nothing before them).
    """
    if "prompt_rows" not in batch or "run" in batch or checkpointing(model):
        return [model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=batch.get("position_ids"),
                      logits_to_keep=keep).logits]
    width, rows, of_row = int(batch["prompt_width"]), batch["prompt_rows"], batch["prompt_of_row"]
    ids, mask, positions = batch["input_ids"], batch["attention_mask"], batch["position_ids"]
    prompts = model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width], position_ids=positions[rows, :width],
                    use_cache=True, logits_to_keep=1)
    cache = prompts.past_key_values
    cache.reorder_cache(of_row)  # (prompts, ...) -> (rows, ...), differentiably
    end = ids.shape[1] - 1  # the last token predicts nothing
    rest = model(input_ids=ids[:, width:end], attention_mask=mask[:, :end], position_ids=positions[:, width:end],
                 past_key_values=cache, use_cache=True).logits
    return [prompts.logits[of_row], rest]


def checkpointing(model) -> bool:
    """Whether a forward of `model` now runs with gradient checkpointing (transformers' layers check the same)."""
    return model.training and any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def completion_logprobs(model, batch: dict, keep: torch.Tensor, temperature: float = 1.0, with_entropy: bool = False):
    """log p_T(token t+1 | ..t) at positions `keep`, shape (B, len(keep)); and the entropy there if asked.

    Both come from one chunked pass over the logits (rank1.core.logprobs.token_logprobs_and_entropy): at a
    few thousand positions × 49k tokens they are the largest tensor of the step."""
    targets = batch["input_ids"][:, keep + 1]
    logprobs, entropy, start = [], [], 0
    for logits in completion_logits(model, batch, keep):
        width = logits.shape[1]
        lp, h = token_logprobs_and_entropy(logits, targets[:, start : start + width], temperature)
        logprobs.append(lp)
        entropy.append(h)
        start += width
    logprobs = torch.cat(logprobs, dim=1)
    if not with_entropy:
        return logprobs, None
    return logprobs, torch.cat(entropy, dim=1)


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
    keep = target_positions(batch)
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
    keep = target_positions(batch)
    logprobs, _ = completion_logprobs(model, batch, keep, temperature)
    full = torch.zeros_like(batch["completion_mask"])
    full[:, keep] = logprobs.float()
    return full
