"""The sparse autoencoder: a config dataclass and a module (SAELens style).

    pre   = (x/scale - b_dec) @ W_enc + b_enc
    acts  = activation(pre)              batchtopk | topk | relu
    x_hat = (acts @ W_dec + b_dec) * scale

`scale` normalizes inputs so their mean squared norm is d_in (SAELens' "expected_average_only_in");
it is estimated from data before training and folded into the weights when saving. Decoder rows are
kept at unit norm. BatchTopK keeps the k·batch largest activations of a batch during training and, at
inference, every activation above a threshold estimated during training (so it is a JumpReLU).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from rank1.sae.errors import SAEError

ARCHITECTURES = ("batchtopk", "topk", "relu")


@dataclass
class SparseAutoencoderConfig:
    d_in: int
    d_sae: int
    k: int = 16  # active latents per token (on average over the batch for batchtopk)
    architecture: str = "batchtopk"
    normalize_activations: bool = True
    l1_coefficient: float = 5.0  # relu only: sparsity penalty on acts·‖W_dec‖
    threshold_ema: float = 0.01  # batchtopk: step size of the running inference threshold

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise SAEError(f"--architecture {self.architecture!r} is not one of {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise SAEError(f"the SAE needs d_in > 0 and d_sae > 0 (got {self.d_in}, {self.d_sae}); are there activations?")
        if self.k <= 0:
            raise SAEError(f"--k must be > 0, got {self.k}")
        if self.architecture != "relu" and self.k > self.d_sae:
            raise SAEError(f"--k {self.k} is larger than the dictionary (d_sae = {self.d_sae} latents); lower --k or raise --expansion")


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SparseAutoencoderConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        self.W_enc = nn.Parameter(W_dec.T.clone())  # tied init (Gao et al. 2024)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))
        self.register_buffer("scale", torch.tensor(1.0))  # input normalization divisor
        self.register_buffer("threshold", torch.tensor(0.0))  # batchtopk inference threshold

    # ------------------------------------------------------------ normalization

    @torch.no_grad()
    def fit_normalization(self, sample: torch.Tensor) -> None:
        """Set `scale` so that the normalized sample has mean squared norm d_in, and b_dec to its mean."""
        if self.cfg.normalize_activations:
            mean_norm = sample.norm(dim=-1).mean().clamp(min=1e-8)
            self.scale.fill_(float(mean_norm / self.cfg.d_in**0.5))
        self.b_dec.copy_((sample / self.scale).mean(0))

    @torch.no_grad()
    def fit_encoder_scale(self, sample: torch.Tensor) -> None:
        """Scale the tied encoder so the first reconstruction is the least-squares multiple of itself.

        With W_enc = W_dec.T, a token's k chosen latents each carry its whole projection on their direction, so
        their sum overshoots (BatchTopK gives large-norm tokens many latents): the first FVU was 2-10, worse
        than the mean. The choice of latents does not depend on a positive scale (b_enc is 0), so one scalar
        c = <x - b_dec, x̂0> / ||x̂0||² fixes it, and the first FVU is at most 1 on this sample.
        """
        centered = sample - self.b_dec
        x_hat0 = self.activate(self.pre_acts(sample), training=True) @ self.W_dec
        c = float((centered * x_hat0).sum() / (x_hat0**2).sum().clamp(min=1e-12))
        if c > 0:
            self.W_enc.mul_(c)

    # ------------------------------------------------------------ forward

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """Pre-activations of normalized inputs `x`."""
        return (x - self.b_dec) @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor, training: bool) -> torch.Tensor:
        arch, k = self.cfg.architecture, self.cfg.k
        relu = pre.relu()
        if arch == "relu":
            return relu
        if arch == "topk":
            values, indices = relu.topk(k, dim=-1, sorted=False)
            return torch.zeros_like(relu).scatter(-1, indices, values)
        if training:  # batchtopk: the k·batch largest over the whole batch
            flat = relu.flatten()
            values, indices = flat.topk(k * relu.shape[0], sorted=False)
            return torch.zeros_like(flat).scatter(0, indices, values).view_as(relu)
        return relu * (pre > self.threshold)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Latent activations for raw inputs (inference rule)."""
        return self.activate(self.pre_acts(x / self.scale), training=False)

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Raw-unit reconstruction from latent activations."""
        return (acts @ self.W_dec + self.b_dec) * self.scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode(self.encode(x))

    def latent_values(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """Activation of latent latents[i] on row x[i], without computing every latent (not for topk)."""
        if self.cfg.architecture == "topk":
            return self.encode(x).gather(1, latents[:, None])[:, 0]
        xn = x / self.scale - self.b_dec
        pre = (xn * self.W_enc[:, latents].T).sum(-1) + self.b_enc[latents]
        keep = pre > (self.threshold if self.cfg.architecture == "batchtopk" else 0)
        return pre.relu() * keep

    # ------------------------------------------------------------ decoder constraint

    @torch.no_grad()
    def normalize_decoder(self) -> None:
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp(min=1e-8)

    @torch.no_grad()
    def remove_parallel_decoder_grad(self) -> None:
        """Project out the gradient component along each decoder row (it would only change the norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(-1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec
