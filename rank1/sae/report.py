"""`rank1 sae report`: a static HTML dashboard and PNG plots from analysis (and explanation) JSON.

One self-contained index.html: a comparison table of LoRA directions vs SAE latents vs MLP neurons,
then one card per feature with its density, histogram (inline SVG), explanation and scores, and its
top examples with each token shaded by the feature's value. No network, no API keys: the explanation
file's client block lists the key's environment variable name only, and it is not shown.
"""

from __future__ import annotations

import html
import json
import statistics
from pathlib import Path

SOURCE_TITLES = {"adapter": "LoRA directions (±)", "latent": "SAE latents", "neuron": "MLP neurons (up_proj)"}

CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}
th:first-child,td:first-child{text-align:left}
.feature{border:1px solid #ddd;border-radius:6px;padding:.6em 1em;margin:1em 0}
.feature h3{margin:.2em 0;font-size:1.05em}.meta{color:#555;font-size:.9em}
.example{font-family:monospace;font-size:.85em;white-space:pre-wrap;margin:.2em 0;border-bottom:1px dotted #eee}
.tok{border-radius:2px}.center{outline:1px solid #c00}
"""

SCRIPT = """
document.getElementById('source-filter').addEventListener('change', function (e) {
  var want = e.target.value;
  document.querySelectorAll('.feature').forEach(function (card) {
    card.style.display = (want === 'all' || card.dataset.source === want) ? '' : 'none';
  });
});
"""


def comparison_rows(analysis: dict, explanations: dict | None) -> list[dict]:
    by_id = {e["id"]: e for e in (explanations or {}).get("explanations", [])}
    rows = []
    for source, title in SOURCE_TITLES.items():
        feats = [f for f in analysis["features"] if f["source"] == source]
        if not feats:
            continue
        scored = [by_id[f["id"]] for f in feats if f["id"] in by_id]
        accuracy = [e["detection_accuracy"] for e in scored if e.get("detection_accuracy") is not None]
        fuzzing = [e["fuzzing_accuracy"] for e in scored if e.get("fuzzing_accuracy") is not None]
        ratings = [e["self_rating"] for e in scored if e.get("self_rating") is not None]
        rows.append({
            "source": source,
            "title": title,
            "features": len(feats),
            "alive": sum(f["density"] > 0 for f in feats),
            "median_density": statistics.median(f["density"] for f in feats),
            "explained": len(scored),
            "detection_accuracy": statistics.mean(accuracy) if accuracy else None,
            "fuzzing_accuracy": statistics.mean(fuzzing) if fuzzing else None,
            "self_rating": statistics.mean(ratings) if ratings else None,
            "rated_4_or_more": (sum(r >= 4 for r in ratings) / len(ratings)) if ratings else None,
        })
    return rows


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _histogram_svg(hist: dict, width: int = 240, height: int = 60) -> str:
    counts = hist["counts"]
    top = max(counts) or 1
    bar = width / len(counts)
    rects = "".join(
        f'<rect x="{i * bar:.1f}" y="{height - height * c / top:.1f}" width="{bar * 0.9:.1f}" height="{height * c / top:.1f}" fill="#4a7"/>'
        for i, c in enumerate(counts)
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="histogram of non-zero values up to {hist["max"]:.3g}">{rects}</svg>'


def _example_html(example: dict, vocab: dict) -> str:
    peak = max(example["values"]) or 1.0
    spans = []
    for i, (token, value) in enumerate(zip(example["tokens"], example["values"])):
        alpha = max(0.0, value) / peak
        cls = "tok center" if i == example["center"] else "tok"
        text = html.escape(vocab.get(str(token), "?"))
        spans.append(f'<span class="{cls}" title="{value:.4g}" style="background:rgba(230,80,40,{alpha:.2f})">{text}</span>')
    return f'<div class="example">{example["activation"]:.3g} │ {"".join(spans)}</div>'


def render_html(analysis: dict, explanations: dict | None, max_examples: int = 10, plots: list[str] = ()) -> str:
    by_id = {e["id"]: e for e in (explanations or {}).get("explanations", [])}
    rows = comparison_rows(analysis, explanations)
    table = "".join(
        f"<tr><td>{html.escape(r['title'])}</td><td>{r['features']}</td><td>{r['alive']}</td><td>{_fmt(r['median_density'], 4)}</td>"
        f"<td>{r['explained']}</td><td>{_fmt(r['detection_accuracy'])}</td><td>{_fmt(r['fuzzing_accuracy'])}</td><td>{_fmt(r['self_rating'], 2)}</td><td>{_fmt(r['rated_4_or_more'], 2)}</td></tr>"
        for r in rows
    )
    cards = []
    for f in analysis["features"]:
        e = by_id.get(f["id"], {})
        scores = (
            f"<p><b>Explanation:</b> {html.escape(e['explanation'])} — detection accuracy {_fmt(e.get('detection_accuracy'))}, "
            f"fuzzing accuracy {_fmt(e.get('fuzzing_accuracy'))}, self-rating {_fmt(e.get('self_rating'))}</p>"
            if e.get("explanation") else ""
        )
        examples = "".join(_example_html(x, analysis["vocab"]) for x in f["examples"][:max_examples]) or "<p class='meta'>never active</p>"
        cards.append(
            f'<div class="feature" id="{html.escape(f["id"])}" data-source="{f["source"]}"><h3>{html.escape(f["id"])} '
            f'<span class="meta">{html.escape(f["name"])}</span></h3><p class="meta">density {f["density"]:.4g} · max {f["max"]:.4g}</p>'
            f'{_histogram_svg(f["histogram"])}{scores}{examples}</div>'
        )
    meta = analysis["meta"]
    images = "".join(f'<img src="{html.escape(p)}" alt="{html.escape(p)}" style="max-width:45%">' for p in plots)
    options = "".join(f'<option value="{s}">{html.escape(t)}</option>' for s, t in SOURCE_TITLES.items())
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>rank1 SAE dashboard</title><style>{CSS}</style></head>
<body><h1>Rank-1 adapter features</h1>
<p class="meta">model {html.escape(str(meta.get('model')))} · adapter {html.escape(str(meta.get('adapter')))} · {meta['tokens']:,} tokens</p>
<h2>LoRA directions vs SAE latents vs MLP neurons</h2>
<table id="comparison"><tr><th>features</th><th>count</th><th>ever active</th><th>median density</th><th>explained</th><th>detection accuracy</th><th>fuzzing accuracy</th><th>self-rating</th><th>rated ≥4</th></tr>{table}</table>
{images}
<h2>Features</h2><label>Show <select id="source-filter"><option value="all">all</option>{options}</select></label>
{''.join(cards)}
<script>{SCRIPT}</script></body></html>
"""


def write_plots(analysis: dict, explanations: dict | None, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = comparison_rows(analysis, explanations)
    names = []
    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in rows:
        densities = sorted((f["density"] for f in analysis["features"] if f["source"] == r["source"]), reverse=True)
        ax.plot(range(len(densities)), densities, label=r["title"])
    ax.set_yscale("symlog", linthresh=1e-4)
    ax.set_xlabel("feature rank")
    ax.set_ylabel("density (fraction of tokens active)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "density.png", dpi=100)
    plt.close(fig)
    names.append("density.png")
    if any(r["detection_accuracy"] is not None for r in rows):
        fig, axes = plt.subplots(1, 3, figsize=(10, 3.2))
        titles = [r["title"] for r in rows]
        for ax, key, color in ((axes[0], "detection_accuracy", "#4a7"), (axes[1], "fuzzing_accuracy", "#a74")):
            ax.bar(titles, [r[key] or 0 for r in rows], color=color)
            ax.axhline(0.5, color="#999", linestyle="--", linewidth=1)  # chance (balanced accuracy)
            ax.set_ylabel(key.replace("_", " "))
        axes[2].bar(titles, [r["self_rating"] or 0 for r in rows], color="#47a")
        axes[2].set_ylabel("self-rating (1-5)")
        for ax in axes:
            ax.tick_params(axis="x", labelrotation=20, labelsize=7)
        fig.tight_layout()
        fig.savefig(out / "comparison.png", dpi=100)
        plt.close(fig)
        names.append("comparison.png")
    return names


def write_report(analysis_path: str, explanations_path: str | None, out_dir: str, max_examples: int = 10) -> Path:
    analysis = json.loads(Path(analysis_path).read_text())
    explanations = json.loads(Path(explanations_path).read_text()) if explanations_path else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(analysis, explanations, out)
    (out / "comparison.json").write_text(json.dumps(comparison_rows(analysis, explanations), indent=1))
    page = out / "index.html"
    page.write_text(render_html(analysis, explanations, max_examples, plots))
    return page
