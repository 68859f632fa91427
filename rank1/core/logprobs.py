"""Token log-probabilities, the one expression the learners, the engines and the sync probe share.

`temperature` divides the logits before the softmax: GRPO's ratios and importance weights must refer
to the distribution the engines sampled from (vLLM's processed logprobs), not the untempered one.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """log softmax(logits / T)[target] for logits (..., V) and targets (...), in fp32."""
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    return logits.log_softmax(-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sequence_logprobs(model, token_ids: list[int], temperature: float = 1.0) -> list[float]:
    """log p(ids[t] | ids[:t]) for t >= 1 by one plain forward pass of an HF/PEFT model."""
    device = next(model.parameters()).device
    ids = torch.tensor([token_ids], device=device)
    logits = model(input_ids=ids).logits
    return token_logprobs(logits[0, :-1], ids[0, 1:], temperature).tolist()
