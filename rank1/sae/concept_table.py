"""`rank1 sae concepts`: the LLM-free interpretability table, per family of features.

Every feature's best concept F1 on held-out documents (concepts.py: the concept and threshold are chosen on
the other documents) for the families
    adapter          each adapter direction, + and − sides
    latent           the latents of an SAE trained on the collection (with --sae)
    neuron           the MLP baseline collected with it (first up_proj neurons of each layer)
    random_adapter   the directions of a randomly initialised adapter (with --control: a collection made
                     with `rank1 sae random-adapter`'s adapter on the same model), the control
and per family the F1 distribution and the share of features above a threshold (family_summary), as JSON
and a PNG of the distributions.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from rank1.core.config_commands import SAEConceptsConfig
from rank1.sae.concepts import family_summary, score_collection
from rank1.sae.errors import SAEError
from rank1.sae.loading import load_tokenizer_for
from rank1.sae.plots import pyplot, save
from rank1.sae.saelens_format import load_sae
from rank1.sae.store import ActivationStore

FAMILY_TITLES = {"adapter": "adapter directions (±)", "latent": "SAE latents", "neuron": "MLP neurons (up_proj)",
                 "random_adapter": "random adapter (control)"}


def concept_table(settings: SAEConceptsConfig, think_open: str, think_close: str, seed: int = 0) -> dict:
    store = ActivationStore(settings.activations)
    tokenizer = load_tokenizer_for(store.meta)
    sae = load_sae(settings.sae)[0] if settings.sae else None
    common = dict(heldout_fraction=settings.heldout_fraction, seed=seed, think_open=think_open, think_close=think_close)
    results = score_collection(store, tokenizer, sae, **common)
    if settings.control:
        control = ActivationStore(settings.control)
        if control.meta.get("model") != store.meta.get("model"):
            raise SAEError(f"--control {settings.control}: collected on {control.meta.get('model')}, not on {store.meta.get('model')}")
        results += score_collection(control, tokenizer, prefix="random_", sources=["adapter"], **common)
    return {
        "meta": {"activations": str(store.dir), "control": settings.control, "sae": settings.sae, "model": store.meta.get("model"),
                 "adapter": store.meta.get("adapter"), "heldout_fraction": settings.heldout_fraction, "seed": seed,
                 "skip_positions": store.skip_positions},
        "summary": family_summary(results, threshold=settings.threshold),
        "features": results,
    }


def plot_f1(table: dict, path: str | Path) -> Path:
    """Share of each family's features with held-out F1 ≥ x, against x (a survival curve: higher is better)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    grid = np.linspace(0, 1, 101)
    for family, row in table["summary"].items():
        f1 = np.array([r["f1"] for r in table["features"] if r["family"] == family])
        ax.plot(grid, [(f1 >= x).mean() for x in grid], label=f"{FAMILY_TITLES.get(family, family)} (n={len(f1)})")
    threshold = next(iter(table["summary"].values()))["threshold"]
    ax.axvline(threshold, color="#999", linestyle="--", linewidth=1)
    ax.set_xlabel("held-out concept F1")
    ax.set_ylabel("share of features with F1 ≥ x")
    ax.legend(fontsize=7)
    return save(fig, path)


def write_concept_table(settings: SAEConceptsConfig, think_open: str, think_close: str, seed: int = 0) -> dict:
    table = concept_table(settings, think_open, think_close, seed)
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table))
    png = plot_f1(table, out.with_suffix(".png"))
    shares = {family: round(row["share_above"], 4) for family, row in table["summary"].items()}
    return {"out": str(out), "png": str(png), "share_above": shares}
