"""The SFT objective: next-token cross-entropy on completion tokens only (labels -100 elsewhere).

An objective object owns its settings, builds its micro-batches from rows and computes the loss the
learner backpropagates (NeMo-RL's LossFunction, as a small dataclass). The loss is a *sum* over the
micro-batch; the learner divides by `normalizer(rows)` of the whole global batch (its target tokens),
so the gradient does not depend on how rows are split over micro-batches and learners (1 learner × 2
micro-batches == 2 learners × 1). That is TRL SFTTrainer's normalisation too (num_items_in_batch, with
average_tokens_across_devices), checked equal in value and gradient by tests/test_sft_loss.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rank1.core.config import Config, ConfigError
from rank1.core.data import IGNORE_INDEX

Row = tuple[list[int], list[int]]  # (input_ids, labels)


@dataclass(frozen=True)
class SFTObjective:
    rows_per_step: int  # rows of one optimizer step over all learners
    max_sequence_tokens: int  # longest row a learner sees (data.max_length)
    name: str = "sft"
    rollout_engines: bool = False  # trains on data rows; engines only for held-out evaluation
    instruction: str | None = None  # what training appended to each question (nothing: the rows as given)

    @classmethod
    def from_config(cls, cfg: Config) -> SFTObjective:
        t = cfg.trainer
        split_rows(t.global_batch_size, t.micro_batch_size, t.num_learners, "trainer.global_batch_size")
        return cls(t.global_batch_size, cfg.data.max_length)

    # ------------------------------------------------------------ batches

    def collate(self, rows: list[Row], pad_id: int) -> dict[str, torch.Tensor]:
        """Right-padded tensors: input_ids, attention_mask, labels."""
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, (ids, labs) in enumerate(rows):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            labels[b, : len(labs)] = torch.tensor(labs)
            attention_mask[b, : len(ids)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def normalizer(self, rows: list[Row]) -> float:
        """Target tokens of the global batch: the positions t whose label t + 1 is trained."""
        return float(max(1, sum(sum(1 for x in labels[1:] if x != IGNORE_INDEX) for _, labels in rows)))

    # ------------------------------------------------------------ the loss

    def loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """Summed completion-token loss of a micro-batch, and its number of target tokens.

        Logits are computed only at positions whose next token is a target in some row (`logits_to_keep`):
        the vocabulary projection and its fp32 loss are the largest tensors of a step, and prompts are a
        large share of math SFT tokens.
        """
        targets = batch["labels"][:, 1:]
        keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
        if keep.numel() == 0:  # a micro-batch without targets still runs its forward (a collective under ZeRO-3)
            keep = torch.zeros(1, dtype=torch.long, device=targets.device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
        targets = targets[:, keep]
        stats = {"target_tokens": float((targets != IGNORE_INDEX).sum())}
        if "row_weight" not in batch:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                   reduction="sum")
            return loss, stats
        # Flattened like the sum above (cross_entropy over a transposed (B, V, K) view rounds differently: ~6e-5 of the loss).
        per_token = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX,
                                    reduction="none")
        return weighted_rows(per_token.view(targets.shape).sum(-1), batch, stats)


def weighted_rows(row_losses: torch.Tensor, batch: dict, stats: dict) -> tuple[torch.Tensor, dict]:
    """Σ_row weight · loss for a batch that mixes runs (rank1 sweep: weight 1 / the row's run normalizer),
    with each row's unweighted loss and run kept for the per-run metrics."""
    stats.update(row_loss=row_losses.detach().tolist(), row_run=batch["run"].tolist())
    return (row_losses * batch["row_weight"]).sum(), stats


def split_rows(rows: int, micro_batch_size: int, learners: int, key: str) -> int:
    """Micro-batches per learner for `rows` rows a step; the rows must split evenly."""
    per_step = micro_batch_size * learners
    if rows % per_step:
        raise ConfigError(f"{key}: {rows} is not a multiple of trainer.micro_batch_size × trainer.num_learners = {per_step}")
    return rows // per_step
