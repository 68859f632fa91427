"""SFT objective: next-token cross-entropy on completion tokens only (labels -100 elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rank1.data import IGNORE_INDEX


def sft_loss_sum(model, batch: dict) -> tuple[torch.Tensor, int]:
    """Summed completion-token loss of a micro-batch, and its number of target tokens.

    Logits are computed only at positions whose next token is a target in some row (`logits_to_keep`):
    the vocabulary projection and its fp32 loss are the largest tensors of a step, and prompts are a
    large share of math SFT tokens. Summing (not averaging) lets the learner divide by the token count
    of the whole global batch, so the gradient does not depend on how rows are split over micro-batches
    and learners (1 learner × 2 micro-batches == 2 learners × 1).
    """
    targets = batch["labels"][:, 1:]
    keep = (targets != IGNORE_INDEX).any(dim=0).nonzero().squeeze(1)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], logits_to_keep=keep).logits
    targets = targets[:, keep]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int((targets != IGNORE_INDEX).sum())


def count_target_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
