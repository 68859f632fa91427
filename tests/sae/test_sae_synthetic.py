"""On data made from a known dictionary with k-sparse codes, the SAE recovers the atoms."""

from __future__ import annotations

import pytest
import torch

from rank1.sae.sae import SparseAutoencoder, SparseAutoencoderConfig
from rank1.core.config import SAETrainConfig
from rank1.sae.trainer import evaluate_reconstruction, train_sae


def synthetic(d_in=32, atoms=64, k=3, n=120_000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    dictionary = torch.randn(atoms, d_in, generator=gen)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    support = torch.rand(n, atoms, generator=gen).argsort(1)[:, :k]
    codes = torch.zeros(n, atoms).scatter(1, support, torch.rand(n, k, generator=gen) * 2 + 0.5)
    return codes @ dictionary + 0.3, dictionary  # an offset, so b_dec has something to learn


@pytest.mark.parametrize("architecture", ["batchtopk", "topk", "relu"])
def test_sae_recovers_known_dictionary(architecture):
    data, dictionary = synthetic(n=104_096)
    x, held_out = data[:-4096], data[-4096:]
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=32, d_sae=128, k=3, architecture=architecture))
    cfg = SAETrainConfig(lr=3e-3, batch_size=512, warmup_steps=20, log_every=50, dead_after_tokens=20_000)
    state = train_sae(sae, (x[i : i + 512] for i in range(0, len(x) - 511, 512)), cfg, progress=False)
    cosine = (torch.nn.functional.normalize(sae.W_dec, dim=1) @ dictionary.T).max(0).values
    assert (cosine > 0.9).float().mean() >= 0.9, f"{architecture}: only {(cosine > 0.9).float().mean():.2f} of atoms recovered"
    metrics = evaluate_reconstruction(sae, [held_out])
    assert metrics["fvu"] < 0.2
    if architecture != "relu":
        assert abs(metrics["l0"] - 3) < 1.5  # the inference rule (threshold for batchtopk) keeps ~k latents
    logged = state.history[-1]
    assert {"fvu", "l0", "dead_fraction", "step", "tokens"} <= logged.keys()


def _mostly_dead(seed: int) -> SparseAutoencoder:
    """128 latents for 64 atoms, 96 of them dead: their encoder columns are shrunk 100x, so their pre-activations
    are small, of both signs, and never win the top-k (dead latents as training leaves them, not pushed below 0).
    The 32 live ones cannot cover the 64 atoms, so reviving the others is what lowers the FVU."""
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=32, d_sae=128, k=3), seed=seed)
    with torch.no_grad():
        sae.W_enc[:, 32:] *= 0.01
    return sae


def test_auxk_revives_dead_latents():
    x, _ = synthetic(n=60_000)
    common = dict(lr=3e-3, warmup_steps=10, log_every=10, dead_after_tokens=2048)
    batches = lambda: (x[i : i + 512] for i in range(0, len(x) - 511, 512))  # noqa: E731
    revived_sae, dead_sae = _mostly_dead(0), _mostly_dead(0)
    revived = train_sae(revived_sae, batches(), SAETrainConfig(aux_coefficient=1 / 32, **common), progress=False)
    dead = train_sae(dead_sae, batches(), SAETrainConfig(aux_coefficient=0.0, **common), progress=False)
    assert dead.history[-1]["dead_fraction"] >= 0.74  # without AuxK nothing brings them back
    assert not (dead_sae.encode(x[:8192]) > 0).any(0)[32:].any()
    assert revived.history[-1]["dead_fraction"] < dead.history[-1]["dead_fraction"] - 0.2
    assert (revived_sae.encode(x[:8192]) > 0).any(0)[32:].float().mean() > 0.2
    assert revived.history[-1]["fvu"] < dead.history[-1]["fvu"] - 0.1  # the revived latents reconstruct atoms


@pytest.mark.parametrize("architecture", ["batchtopk", "topk"])
def test_sparse_step_gradients_equal_autograd(architecture):
    from rank1.sae.sparse_step import batch_topk_pairs, row_topk_pairs, sparse_step

    torch.manual_seed(0)
    sae = SparseAutoencoder(SparseAutoencoderConfig(d_in=12, d_sae=40, k=3, architecture=architecture), seed=1)
    x = torch.randn(32, 12)
    dead = torch.zeros(40, dtype=torch.bool)
    dead[::3] = True
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(0, 0.1)
        sae.b_enc[dead] -= 1.5  # some of the top aux_k dead pre-activations are negative: AuxK's ReLU zeroes them
        pre = sae.pre_acts(x)
    flat = batch_topk_pairs(pre, 3 * 32, None)[0] if architecture == "batchtopk" else row_topk_pairs(pre, 3)
    step = sparse_step(sae, x, pre, flat, dead, aux_k=5, aux_coefficient=0.25)
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}

    # The same loss, dense, through autograd.
    sae.zero_grad(set_to_none=True)
    pre = sae.pre_acts(x)
    mask = torch.zeros(32 * 40, dtype=torch.bool)
    mask[flat] = True
    acts = pre.relu() * mask.view(32, 40)
    x_hat = acts @ sae.W_dec + sae.b_dec
    mse = ((x_hat - x) ** 2).sum(-1).mean()
    residual = (x - x_hat).detach()
    chosen = pre.detach().masked_fill(~dead, -float("inf")).topk(5, dim=-1).indices
    # AuxK trains the dead latents, not the shared decoder bias: its path sees b_dec as a constant.
    pre_aux = (x - sae.b_dec.detach()) @ sae.W_enc + sae.b_enc
    torch.testing.assert_close(pre_aux, pre)
    aux_acts = torch.zeros_like(pre).scatter(-1, chosen, pre_aux.gather(-1, chosen).relu())  # ReLU (Gao et al. 2024)
    aux = (((aux_acts @ sae.W_dec) - residual) ** 2).sum(-1).mean() / ((residual - residual.mean(0)) ** 2).sum(-1).mean()
    assert (pre.gather(-1, chosen) < 0).any() and (pre.gather(-1, chosen) > 0).any()
    (mse + 0.25 * aux).backward()
    torch.testing.assert_close(step.mse, mse.detach())
    torch.testing.assert_close(step.aux, aux.detach())
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)
