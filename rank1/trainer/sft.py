"""SFT objective: next-token cross-entropy on completion tokens only (labels -100 elsewhere)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rank1.data import IGNORE_INDEX


def sft_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed token loss and the number of target tokens.

    Summing (not averaging) per micro-batch lets the learner divide by the token count of the whole
    global batch, so the gradient does not depend on how rows are split over micro-batches and
    learners (1 learner × 2 micro-batches == 2 learners × 1).
    """
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )
    return loss, int((shift_labels != IGNORE_INDEX).sum())


def count_target_tokens(labels: torch.Tensor) -> int:
    return int((labels[:, 1:] != IGNORE_INDEX).sum())
