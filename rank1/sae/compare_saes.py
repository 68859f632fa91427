"""`rank1 sae compare`: the features two SAEs share and those each has alone, and how their adapters differ.

Made for the paper's SFT-vs-GRPO question: an SAE on an SFT adapter's activations and one on the GRPO
adapter trained from it. Both read the same adapters (the same modules of one base), so their decoder rows
live in one space: latents are matched one to one by decoder cosine and a pair is shared when its cosine is
above what random dictionaries of the same shapes reach (compare.py; the `quantile` of theirs). Shared pairs
and unique latents come with their density and top examples when the analyses of the two SAEs are given
(`rank1 sae analyze --sae`), and the adapters' change per module, module type and layer (adapter_change.py).
Output: JSON, and a PNG (matched cosines against the threshold; the change per layer).
"""

from __future__ import annotations

import json
from pathlib import Path

from rank1.core.config_commands import SAECompareConfig
from rank1.sae.adapter_change import adapter_change
from rank1.sae.compare import match_dictionaries
from rank1.sae.errors import SAEError
from rank1.sae.plots import pyplot, save
from rank1.sae.saelens_format import CFG_FILE, load_sae


def trained_on(sae_dir: str) -> str | None:
    """The adapter folder an SAE was trained on, from its cfg.json metadata."""
    return json.loads((Path(sae_dir) / CFG_FILE).read_text())["metadata"].get("adapter")


def example_text(example: dict, vocab: dict) -> str:
    """The example's window as text, its centre token in [[ ]]."""
    pieces = [vocab.get(str(t), "?") for t in example["tokens"]]
    pieces[example["center"]] = f"[[{pieces[example['center']]}]]"
    return "".join(pieces)


def latent_cards(analysis_path: str | None, sae_dir: str, flag: str, n_examples: int) -> dict[int, dict]:
    """{latent: {density, examples: [{activation, doc, text}]}} from an analysis of this SAE ({} without one)."""
    if not analysis_path:
        return {}
    path = Path(analysis_path)
    if not path.is_file():
        raise SAEError(f"{flag} {path}: no such file (run `rank1 sae analyze --sae ...` first)")
    data = json.loads(path.read_text())
    made_with = data["meta"].get("sae")
    if not made_with or Path(made_with).resolve() != Path(sae_dir).resolve():
        raise SAEError(f"{flag} {path}: made with --sae {made_with}, not {sae_dir}")
    return {f["index"]: {"density": f["density"], "examples": [
        {"activation": e["activation"], "doc": e["doc"], "text": example_text(e, data["vocab"])} for e in f["examples"][:n_examples]]}
        for f in data["features"] if f["source"] == "latent"}


def unique_features(latents: list[int], cards: dict[int, dict]) -> list[dict]:
    """Latents in no shared pair, with their card where the analysis has one, the most active first."""
    rows = [{"latent": i, **cards.get(i, {})} for i in latents]
    return sorted(rows, key=lambda row: -row.get("density", 0.0))


def compare_saes(settings: SAECompareConfig, seed: int = 0) -> dict:
    sae_a, _ = load_sae(settings.sae_a)
    sae_b, _ = load_sae(settings.sae_b)
    if sae_a.cfg.d_in != sae_b.cfg.d_in:
        raise SAEError(f"--sae-a reads {sae_a.cfg.d_in} adapter dims but --sae-b reads {sae_b.cfg.d_in}: not the same adapter set")
    match = match_dictionaries(sae_a.W_dec, sae_b.W_dec, seed=seed, quantile=settings.quantile, method=settings.method)
    cards_a = latent_cards(settings.analysis_a, settings.sae_a, "--analysis-a", settings.examples)
    cards_b = latent_cards(settings.analysis_b, settings.sae_b, "--analysis-b", settings.examples)
    adapters = (settings.adapter_a or trained_on(settings.sae_a), settings.adapter_b or trained_on(settings.sae_b))
    return {
        "sae_a": settings.sae_a, "sae_b": settings.sae_b, "d_sae_a": sae_a.cfg.d_sae, "d_sae_b": sae_b.cfg.d_sae,
        **{k: match[k] for k in ("threshold", "quantile", "method", "n_shared", "n_unique_a", "n_unique_b",
                                 "shared_fraction_a", "shared_fraction_b", "matched_cosines")},
        "shared": [{"a": i, "b": j, "cosine": c, "feature_a": cards_a.get(i), "feature_b": cards_b.get(j)} for i, j, c in match["pairs"]],
        "unique_a": unique_features(match["unique_a"], cards_a),
        "unique_b": unique_features(match["unique_b"], cards_b),
        "adapter_change": adapter_change(*adapters) if all(adapters) else None,
    }


def plot_comparison(result: dict, path: str | Path) -> Path:
    plt = pyplot()
    change = result["adapter_change"]
    fig, axes = plt.subplots(1, 2 if change else 1, figsize=(10 if change else 5, 3.4), squeeze=False)
    ax = axes[0, 0]
    ax.hist(result["matched_cosines"], bins=40, range=(-1, 1), color="#47a")
    ax.axvline(result["threshold"], color="#c33", linestyle="--", linewidth=1, label=f"random-dictionary threshold {result['threshold']:.2f}")
    ax.set_xlabel("decoder cosine of matched latents")
    ax.set_title(f"{result['n_shared']} shared · {result['n_unique_a']} only in A · {result['n_unique_b']} only in B", fontsize=9)
    ax.legend(fontsize=7)
    if change:
        ax = axes[0, 1]
        layers = [r["layer"] for r in change["layers"]]
        width = 0.28
        for k, (key, label) in enumerate((("delta_w_a", "‖ΔW‖ A"), ("delta_w_b", "‖ΔW‖ B"), ("diff_delta_w", "‖ΔW_A − ΔW_B‖"))):
            ax.bar([x + (k - 1) * width for x in layers], [r[key] for r in change["layers"]], width, label=label)
        ax.set_xlabel("layer")
        ax.set_ylabel("Frobenius norm")
        ax.legend(fontsize=7)
    return save(fig, path)


def write_comparison(settings: SAECompareConfig, seed: int = 0) -> dict:
    result = compare_saes(settings, seed)
    out = Path(settings.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    png = plot_comparison(result, out.with_suffix(".png"))
    return {"out": str(out), "png": str(png), "n_shared": result["n_shared"], "n_unique_a": result["n_unique_a"],
            "n_unique_b": result["n_unique_b"], "threshold": result["threshold"]}
