"""The sparse training step of TopK/BatchTopK SAEs: gradients by hand, cost O(active pairs × d_in).

Only the encoder matmul is dense (it is needed to choose the active (token, latent) pairs). The
decoder is an index_add of the chosen decoder rows, and the backward pass below touches only the
chosen rows of W_dec and columns of W_enc, so it skips the dense decode, its backward and the dense
encoder gradient that autograd would run on a (batch × d_sae) activation matrix. The gradients equal
autograd's on the dense formulation (tests/sae/test_sae_synthetic.py checks this).

    pre   = (x - b_dec) @ W_enc + b_enc            acts = relu(pre) at the chosen pairs
    x̂     = acts @ W_dec + b_dec                    mse = mean_b ‖x̂ - x‖²
    AuxK  : ê = relu(pre) @ W_dec over each token's top aux_k dead latents, target e = x - x̂
            (detached), loss = mean_b ‖ê - e‖² / mean_b ‖e - ē‖²; b_dec is a constant in this path (AuxK
            trains the dead latents, not the shared bias: see sparse_step)
            The ReLU matters (Gao et al. 2024; OpenAI's and EleutherAI's code): without it a dead latent
            learns the residual through negative pre-activations and a flipped decoder row, so it stays
            dead, and when it does fire its decoder points the wrong way (FVU rose 0.6 -> 2.7 that way).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@torch.no_grad()
def batch_topk_pairs(pre: torch.Tensor, n: int, guess: float | None) -> tuple[torch.Tensor, float]:
    """Flat indices of the n largest pre-activations of the batch, and the n-th value.

    A full top-k over batch × d_sae values is slow. With `guess` (a bit under the previous step's
    n-th value) only the values above it are ranked; that is exact whenever at least n values pass,
    and falls back to the full top-k otherwise.
    """
    flat = pre.flatten()
    if guess is not None and guess > 0:
        candidates = (flat > guess).nonzero().squeeze(1)
        if n <= len(candidates) <= 8 * n:
            top = flat[candidates].topk(n, sorted=False)
            return candidates[top.indices], float(top.values.min())
    top = flat.topk(n, sorted=False)
    return top.indices, float(top.values.min())


@torch.no_grad()
def row_topk_pairs(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of each row's k largest pre-activations (TopK)."""
    cols = pre.topk(k, dim=-1, sorted=False).indices
    return (torch.arange(pre.shape[0])[:, None] * pre.shape[1] + cols).flatten()


@dataclass
class SparseStep:
    x_hat: torch.Tensor
    acts: torch.Tensor  # values at the chosen pairs
    cols: torch.Tensor  # latent of each chosen pair
    mse: torch.Tensor
    aux: torch.Tensor


@torch.no_grad()
def sparse_step(sae, x: torch.Tensor, pre: torch.Tensor, flat: torch.Tensor, dead: torch.Tensor, aux_k: int, aux_coefficient: float) -> SparseStep:
    """Loss terms for normalized inputs `x` and chosen pairs `flat`; sets every parameter's .grad."""
    W_enc, W_dec, b_dec = sae.W_enc, sae.W_dec, sae.b_dec
    B, d_sae = x.shape[0], W_dec.shape[0]
    rows, cols = flat // d_sae, flat % d_sae
    centered = x - b_dec
    acts = pre.flatten()[flat].relu()
    dec = W_dec[cols]
    x_hat = torch.zeros_like(x).index_add_(0, rows, acts[:, None] * dec) + b_dec
    diff = x_hat - x
    mse = (diff**2).sum(-1).mean()

    g = diff * (2.0 / B)  # d mse / d x̂
    g_W_dec = torch.zeros_like(W_dec).index_add_(0, cols, acts[:, None] * g[rows])
    g_pre = (g[rows] * dec).sum(-1) * (acts > 0)
    g_W_enc_T = torch.zeros(d_sae, x.shape[1]).index_add_(0, cols, centered[rows] * g_pre[:, None])
    g_b_enc = torch.zeros(d_sae).index_add_(0, cols, g_pre)

    # b_dec's gradient from the reconstruction alone: through the dead latents' encoder input the AuxK term
    # would move the shared decoder bias too, and as the residual it is normalised by shrinks that term
    # grows until it dominates b_dec (FVU rose 0.17 -> 1.1 on a small collection; without it, it fell).
    g_b_dec = g.sum(0) - W_enc @ g_b_enc
    aux = torch.zeros(())
    dead_cols = dead.nonzero().squeeze(1)
    if aux_coefficient > 0 and len(dead_cols):
        # Dense on the dead block only (tokens × dead latents): with aux_k ≈ d_in/2 pairs per token,
        # matmuls beat an index_add over that many rows.
        k = min(aux_k, len(dead_cols))
        pre_dead = pre.index_select(1, dead_cols)
        chosen = pre_dead.topk(k, dim=-1, sorted=False)
        a_acts = torch.zeros_like(pre_dead).scatter_(1, chosen.indices, chosen.values.relu())
        a_mask = a_acts > 0
        a_dec = W_dec[dead_cols]
        residual = -diff
        aux_diff = a_acts @ a_dec - residual
        scale = ((residual - residual.mean(0)) ** 2).sum(-1).mean().clamp(min=1e-12)
        aux = (aux_diff**2).sum(-1).mean() / scale
        if torch.isfinite(aux):
            g_aux = aux_diff * (2.0 * aux_coefficient / (B * scale))
            g_W_dec.index_add_(0, dead_cols, a_acts.T @ g_aux)
            g_a = (g_aux @ a_dec.T) * a_mask
            g_W_enc_T.index_add_(0, dead_cols, g_a.T @ centered)
            g_b_enc.index_add_(0, dead_cols, g_a.sum(0))
        else:
            aux = torch.zeros(())

    # b_dec enters x̂ directly and the encoder through x - b_dec: d pre / d b_dec = -W_enc per latent,
    # and g_b_enc summed d mse / d pre over the tokens of each latent (before the AuxK terms were added).
    sae.W_dec.grad = g_W_dec
    sae.W_enc.grad = g_W_enc_T.T.contiguous()
    sae.b_enc.grad = g_b_enc
    sae.b_dec.grad = g_b_dec
    return SparseStep(x_hat, acts, cols, mse, aux)
