"""Save and load SAEs in SAELens' on-disk format (`cfg.json` + `sae_weights.safetensors`).

Matched field by field to sae-lens 6.54 (sae_lens/saes/sae.py `SAE.save_model` / `load_from_disk`,
sae_lens/loading/pretrained_sae_loaders.py `sae_lens_disk_loader`, sae_lens/constants.py):
  * cfg.json holds the inference config's fields — d_in, d_sae, dtype, device, apply_b_dec_to_input,
    normalize_activations, reshape_activations, metadata{sae_lens_version, sae_lens_training_version,
    model_name, hook_name, ...} — plus "architecture"; TopK adds k and rescale_acts_by_decoder_norm.
  * weights: W_enc (d_in, d_sae), b_enc (d_sae), W_dec (d_sae, d_in), b_dec (d_in), and for
    "jumprelu" a per-latent threshold (d_sae). SAELens saves a trained BatchTopK SAE as "jumprelu"
    with threshold = the running topk threshold for every latent (batchtopk_sae.py,
    process_state_dict_for_saving_inference); we do the same. TopK saves as "topk", ReLU as "standard".
  * Our input scale is folded into the weights (as SAELens' fold_activation_norm_scaling_factor does),
    so the saved SAE reads raw adapter activations and normalize_activations is "none".
rank1's own extras (adapter names, training config, history) go in a separate `rank1_sae.json`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from rank1.sae.errors import SAEError
from rank1.sae.sae import SparseAutoencoder, SparseAutoencoderConfig

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
EXTRAS_FILE = "rank1_sae.json"
SAE_LENS_VERSION = "6.54.12"  # the format version matched here
SAELENS_ARCHITECTURE = {"batchtopk": "jumprelu", "topk": "topk", "relu": "standard"}


@torch.no_grad()
def folded_weights(sae: SparseAutoencoder) -> dict[str, torch.Tensor]:
    """Weights that act on raw inputs: 1/scale folded into W_enc, the output scale into W_dec and b_dec."""
    scale = float(sae.scale)
    # (x/scale - b_dec) @ W_enc + b_enc == (x - b_dec·scale) @ (W_enc/scale) + b_enc, and
    # (acts @ W_dec + b_dec)·scale == acts @ (W_dec·scale) + b_dec·scale: b_enc and the threshold stay.
    weights = {"W_enc": sae.W_enc / scale, "b_enc": sae.b_enc.clone(), "W_dec": sae.W_dec * scale, "b_dec": sae.b_dec * scale}
    if sae.cfg.architecture == "batchtopk":
        weights["threshold"] = torch.full((sae.cfg.d_sae,), float(sae.threshold))
    return {k: v.detach().float().contiguous() for k, v in weights.items()}


def save_sae(sae: SparseAutoencoder, out_dir: str | Path, metadata: dict, extras: dict | None = None) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    architecture = SAELENS_ARCHITECTURE[sae.cfg.architecture]
    cfg = {
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"sae_lens_version": SAE_LENS_VERSION, "sae_lens_training_version": SAE_LENS_VERSION, **metadata},
        "architecture": architecture,
    }
    if architecture == "topk":
        cfg.update(k=sae.cfg.k, rescale_acts_by_decoder_norm=False)
    save_file(folded_weights(sae), str(out / WEIGHTS_FILE))
    (out / CFG_FILE).write_text(json.dumps(cfg, indent=1))
    (out / EXTRAS_FILE).write_text(json.dumps({"config": dataclasses.asdict(sae.cfg), **(extras or {})}, indent=1))
    return out


def load_sae(path: str | Path) -> tuple[SparseAutoencoder, dict]:
    """Load a folder written by save_sae (scale 1: the normalization is already folded in)."""
    path = Path(path)
    for name in (CFG_FILE, WEIGHTS_FILE, EXTRAS_FILE):
        if not (path / name).is_file():
            raise SAEError(f"--sae {path}: no {name} there (not an SAE saved by `rank1 sae train`)")
    extras = json.loads((path / EXTRAS_FILE).read_text())
    sae = SparseAutoencoder(SparseAutoencoderConfig(**extras["config"]))
    weights = load_file(str(path / WEIGHTS_FILE))
    expected = {name: getattr(sae, name).shape for name in ("W_enc", "b_enc", "W_dec", "b_dec")}
    if sae.cfg.architecture == "batchtopk":
        expected["threshold"] = torch.Size([sae.cfg.d_sae])
    for name, shape in expected.items():
        if name not in weights:
            raise SAEError(f"{path / WEIGHTS_FILE}: no tensor '{name}'")
        if weights[name].shape != shape:
            raise SAEError(
                f"{path / WEIGHTS_FILE}: {name} has shape {tuple(weights[name].shape)} but {EXTRAS_FILE} describes "
                f"{tuple(shape)} (d_in={sae.cfg.d_in}, d_sae={sae.cfg.d_sae})"
            )
    with torch.no_grad():
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            getattr(sae, name).copy_(weights[name])
        if "threshold" in weights:
            sae.threshold.fill_(float(weights["threshold"][0]))
    sae.requires_grad_(False).eval()
    return sae, extras
