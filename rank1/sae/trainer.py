"""Training loop for the SAE: takes any iterator of activation batches (SAELens style).

Loss = ‖x - x̂‖² (summed over dims, mean over tokens)
     + aux_coefficient · AuxK: the residual x - x̂ reconstructed from the top aux_k pre-activations
       of *dead* latents (not fired for dead_after_tokens), normalized by the residual's variance
       (Gao et al. 2024), which gives dead latents gradient and revives them
     + l1_coefficient · Σ acts·‖W_dec‖ for the relu variant.
Adam with linear warmup (at most a tenth of the run, so a short run reaches its learning rate); decoder
rows projected to unit norm after each step. Before the first step the input scale and b_dec are fitted
(sae.fit_normalization) and the tied encoder is scaled so the first reconstruction is no worse than the
mean (sae.fit_encoder_scale).
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from tqdm.auto import tqdm

from rank1.core.config import SAETrainConfig
from rank1.sae.errors import SAEError
from rank1.sae.sae import SparseAutoencoder
from rank1.sae.sparse_step import batch_topk_pairs, row_topk_pairs, sparse_step


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0
    history: list[dict] = field(default_factory=list)


def _checked(batches: Iterable[torch.Tensor], d_in: int) -> Iterator[torch.Tensor]:
    for i, x in enumerate(batches):
        if x.ndim != 2 or x.shape[1] != d_in:
            raise SAEError(f"activation batch {i} has shape {tuple(x.shape)}; expected (tokens, {d_in})")
        if not torch.isfinite(x).all():
            raise SAEError(f"activation batch {i} holds NaN or inf values; the SAE cannot train on it")
        yield x.float()


def batch_metrics(x: torch.Tensor, x_hat: torch.Tensor) -> dict:
    """Fraction of variance unexplained of one batch."""
    residual = ((x - x_hat) ** 2).sum()
    total = ((x - x.mean(0)) ** 2).sum().clamp(min=1e-12)
    return {"fvu": float(residual / total)}


def train_sae(
    sae: SparseAutoencoder,
    batches: Iterable[torch.Tensor],
    cfg: SAETrainConfig,
    total_steps: int | None = None,
    evaluate: Callable[[SparseAutoencoder], dict] | None = None,
    log: Callable[[dict], None] | None = None,
    progress: bool = True,
) -> TrainState:
    """Train in place for one pass over `batches`; every log_every steps record metrics (and `evaluate`)."""
    d_in, d_sae = sae.cfg.d_in, sae.cfg.d_sae
    stream = _checked(batches, d_in)
    first = list(itertools.islice(stream, cfg.normalization_batches))
    if not first:
        raise SAEError("no activations to train on (the iterator is empty or shorter than one batch)")
    sae.fit_normalization(torch.cat(first))
    sae.fit_encoder_scale(torch.cat(first) / sae.scale)
    stream = itertools.chain(first, stream)

    opt = torch.optim.Adam(sae.parameters(), lr=cfg.lr, betas=tuple(cfg.betas))
    # Warmup is at most a tenth of the run: a short run (a small collection) must still reach its learning rate.
    warmup = min(cfg.warmup_steps, total_steps // 10) if total_steps else cfg.warmup_steps
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, warmup)))
    aux_k = min(cfg.aux_k or d_in // 2, d_sae)
    since_fired = torch.zeros(d_sae, dtype=torch.long)
    state = TrainState()
    bar = tqdm(total=total_steps, unit="step", disable=not progress, desc="train sae")
    started = time.perf_counter()
    guess = None  # batchtopk: where to start looking for the batch's k·B-th value (see sparse_step)
    for x_raw in stream:
        x = x_raw / sae.scale
        arch = sae.cfg.architecture
        dead = since_fired >= cfg.dead_after_tokens
        aux = torch.zeros(())
        opt.zero_grad(set_to_none=True)
        if arch == "relu":  # dense, with autograd: every latent can be active
            acts = sae.pre_acts(x).relu()
            x_hat = acts @ sae.W_dec + sae.b_dec
            mse = ((x_hat - x) ** 2).sum(-1).mean()
            loss = mse + sae.cfg.l1_coefficient / d_in * (acts * sae.W_dec.norm(dim=1)).sum(-1).mean()
            loss.backward()
            fired = (acts > 0).any(0)
        else:  # sparse, gradients by hand (sparse_step.py)
            with torch.no_grad():
                pre = sae.pre_acts(x)
            if arch == "batchtopk":
                flat, kth = batch_topk_pairs(pre, sae.cfg.k * len(x), guess)
                guess = 0.9 * kth
            else:
                flat = row_topk_pairs(pre, sae.cfg.k)
            step = sparse_step(sae, x, pre, flat, dead, aux_k, cfg.aux_coefficient)
            x_hat, acts, mse, aux = step.x_hat, step.acts, step.mse, step.aux
            loss = mse + cfg.aux_coefficient * aux
            fired = torch.zeros(d_sae, dtype=torch.bool)
            fired[step.cols[acts > 0]] = True
        sae.remove_parallel_decoder_grad()
        opt.step()
        sched.step()
        sae.normalize_decoder()
        with torch.no_grad():
            since_fired += len(x)
            since_fired[fired] = 0
            if arch == "batchtopk":
                positive = acts[acts > 0]
                if len(positive):
                    low = positive.min()
                    ema = 1.0 if state.step == 0 else sae.cfg.threshold_ema
                    sae.threshold.mul_(1 - ema).add_(ema * low)
        state.step += 1
        state.tokens += len(x)
        bar.update(1)
        if state.step % cfg.log_every == 0 or (total_steps is not None and state.step == total_steps):
            with torch.no_grad():
                record = {"step": state.step, "tokens": state.tokens, "loss": float(loss), "aux_loss": float(aux)}
                record.update(batch_metrics(x, x_hat.detach()))
                record["l0"] = float((acts > 0).sum()) / len(x)
                record["dead_fraction"] = float((since_fired >= cfg.dead_after_tokens).float().mean())
                record["tokens_per_s"] = state.tokens / (time.perf_counter() - started)
            if evaluate is not None:
                record.update(evaluate(sae))
            state.history.append(record)
            bar.set_postfix(fvu=f"{record['fvu']:.3f}", l0=f"{record['l0']:.1f}", dead=f"{record['dead_fraction']:.2f}")
            if log is not None:
                log(record)
    bar.close()
    if state.step == 0:
        raise SAEError("no activations to train on")
    return state


@torch.no_grad()
def evaluate_reconstruction(sae: SparseAutoencoder, batches: Iterable[torch.Tensor]) -> dict:
    """FVU and L0 of the inference rule over held-out batches (raw units)."""
    residual, l0, n, rows = 0.0, 0.0, 0, []
    for x in batches:
        acts = sae.encode(x)
        residual += float(((x - sae.decode(acts)) ** 2).sum())
        l0 += float((acts > 0).sum())
        n += len(x)
        rows.append(x)
    if not n:
        raise SAEError("no held-out activations to evaluate")
    x = torch.cat(rows)
    total = float(((x - x.mean(0)) ** 2).sum())
    return {"fvu": residual / max(total, 1e-12), "l0": l0 / n}
