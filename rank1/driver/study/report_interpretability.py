"""The study's report: OUT/report.html and OUT/report.md (accuracy, then interpretability), results.json's
"interpretability" entry, and sae_curves.png, from what the stages wrote (rank1.driver.study.interpretability)."""

from __future__ import annotations

import json
from pathlib import Path

from markdown_it import MarkdownIt

FAMILIES = {"adapter": "adapter directions (±)", "neuron": "MLP neurons (first 6 up_proj per layer)", "latent": "SAE latents",
            "random_adapter": "random adapter (control)"}
SAE_KEYS = ("fvu", "heldout_fvu", "l0", "dead_fraction", "effect_recovered")


def _read(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def gather(out: Path, stage_names: list[str]) -> dict:
    """The numbers the report shows, per trained adapter (sft, grpo), read back from the stages' outputs."""
    work = out / "interpretability"
    adapters = [n.split("-", 1)[1] for n in stage_names if n.startswith("sae-")]
    result: dict = {"adapters": {}, "seconds": {}}
    for marker in sorted((work / ".done").glob("*")):
        result["seconds"][marker.name] = json.loads(marker.read_text())["seconds"]
    for name in adapters:
        log = [json.loads(line) for line in (work / f"sae-{name}" / "train_log.jsonl").read_text().splitlines()]
        last = log[-1] if log else {}
        concepts = _read(work / f"concepts-{name}.json") or {}
        dashboard = _read(work / f"dashboard-{name}" / "comparison.json") or []
        ablation = _read(work / f"ablate-{name}.json") or {}
        result["adapters"][name] = {
            "sae": {**{k: last.get(k) for k in SAE_KEYS}, **{k: v for k, v in last.items() if k.startswith("effect_recovered@")},
                    "steps": last.get("step"), "curve": [{k: r.get(k) for k in ("step", "fvu", "heldout_fvu", "l0", "dead_fraction")} for r in log]},
            "concepts": concepts.get("summary", {}),
            "llm_scores": [r for r in dashboard if r.get("explained")],
            "ablation": {"kl_base": ablation.get("kl_base"), "layers": ablation.get("layers", [])},
        }
    compare = _read(work / "compare.json")
    if compare:
        result["compare"] = {k: compare[k] for k in ("threshold", "quantile", "n_shared", "n_unique_a", "n_unique_b",
                                                     "shared_fraction_a", "shared_fraction_b")}
        result["compare"]["unique_examples"] = {side: [f for f in compare[f"unique_{side}"][:3]] for side in ("a", "b")}
        change = compare.get("adapter_change") or {}
        result["compare"]["change_by_type"] = change.get("types", [])
    return result


def plot_sae_curves(result: dict, path: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not result["adapters"]:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for name, a in result["adapters"].items():
        curve = [r for r in a["sae"]["curve"] if r.get("fvu") is not None]
        axes[0].plot([r["step"] for r in curve], [r["fvu"] for r in curve], label=f"{name} (batch)")
        held = [r for r in curve if r.get("heldout_fvu") is not None]
        axes[0].plot([r["step"] for r in held], [r["heldout_fvu"] for r in held], linestyle="--", label=f"{name} (held out)")
        axes[1].plot([r["step"] for r in curve], [r["dead_fraction"] for r in curve], label=name)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("FVU")
    axes[1].set_ylabel("dead latents")
    for ax in axes:
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _num(x, digits: int = 3) -> str:
    return "–" if x is None else (f"{x:.{digits}g}" if isinstance(x, float) else str(x))


def tables(result: dict) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) for every table of the interpretability half."""
    out = []
    rows = []
    for name, a in result["adapters"].items():
        others = {k.split("@", 1)[1]: v for k, v in a["sae"].items() if k.startswith("effect_recovered@")}
        rows.append([name, *(_num(a["sae"][k]) for k in SAE_KEYS), ", ".join(f"{k}: {_num(v)}" for k, v in others.items()) or "–"])
    out.append(("SAE (BatchTopK) on the adapter activations", ["adapter", "FVU", "held-out FVU", "L0", "dead", "effect recovered (own data)",
                                                                "effect recovered (other text)"], rows))
    for name, a in result["adapters"].items():
        rows = [[FAMILIES.get(f, f), str(s["count"]), _num(s["mean_f1"]), _num(s["median_f1"]), f"{100 * s['share_above']:.1f} %",
                 ", ".join(f"{c} ({n})" for c, n in list(s["concepts_above"].items())[:4]) or "–"] for f, s in a["concepts"].items()]
        threshold = next(iter(a["concepts"].values()))["threshold"] if a["concepts"] else 0.5
        out.append((f"Concept F1 per family, {name} adapter (held-out documents)",
                    ["family", "features", "mean F1", "median F1", f"share with F1 ≥ {threshold:g}", "concepts matched"], rows))
        if a["llm_scores"]:
            out.append((f"LLM scores, {name} adapter (balanced accuracy: chance 0.5)", ["family", "explained", "detection", "fuzzing", "self-rating"],
                        [[r["title"], str(r["explained"]), _num(r["detection_accuracy"]), _num(r["fuzzing_accuracy"]), _num(r["self_rating"])]
                         for r in a["llm_scores"]]))
        layers = sorted(a["ablation"]["layers"], key=lambda r: -r["kl"])[:5]
        out.append((f"Leave-one-layer-out, {name} adapter (KL(full ‖ base) = {_num(a['ablation']['kl_base'])} nats/token)",
                    ["layer", "KL(full ‖ without it)", "share of KL to base"], [[str(r["layer"]), _num(r["kl"]), _num(r["share_of_base"])] for r in layers]))
    if "compare" in result:
        c = result["compare"]
        out.append(("SFT vs GRPO: SAE features", ["shared", "only SFT", "only GRPO", "cosine threshold (random dictionaries)"],
                    [[str(c["n_shared"]), str(c["n_unique_a"]), str(c["n_unique_b"]), f"{c['threshold']:.3f} (q {c['quantile']})"]]))
        if c["change_by_type"]:
            keys = [k for k in c["change_by_type"][0] if k != "type"][:4]
            out.append(("SFT vs GRPO: adapter change per module type", ["module", *keys],
                        [[r["type"], *(_num(r[k]) for k in keys)] for r in c["change_by_type"]]))
    return out


def _md_table(title: str, header: list[str], rows: list[list[str]]) -> list[str]:
    def line(cells: list[str]) -> str:  # a '|' inside a cell (a token, a concept) must not start a new column
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return [f"### {title}", "", line(header), "|" + "---|" * len(header), *(line(r) for r in rows), ""]


STYLE = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse;margin:.5em 0 1.5em}"
         "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}img{max-width:100%;margin:.5em 0}pre{font-size:12px}")


def html_page(markdown: str, title: str) -> str:
    """report.html: the report's markdown rendered (tables, images, links). Raw HTML in it (a feature's
    example text) is escaped, not interpreted."""
    body = MarkdownIt("commonmark", {"html": False}).enable("table").render(markdown)
    return f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title><style>{STYLE}</style></head><body>\n{body}</body></html>\n"


def stage_time(seconds: dict[str, float]) -> str:
    """One line: the interpretability stages' total time and the slowest ones (from their done-markers)."""
    slowest = sorted(seconds.items(), key=lambda kv: -kv[1])[:3]
    return (f"Interpretability compute: {sum(seconds.values()) / 60:.1f} min over {len(seconds)} stages (slowest: "
            + ", ".join(f"{name} {s / 60:.1f} min" for name, s in slowest) + ")")


def write_interpretability_report(out: Path, result: dict) -> None:
    from rank1.driver.study.report_accuracy import accuracy_tables

    work = out / "interpretability"
    curves = plot_sae_curves(result, out / "sae_curves.png")
    figures = [p for p in [curves, out / "accuracy.png", *(work / f"{kind}-{name}.png" for name in result["adapters"] for kind in ("concepts", "ablate")),
                           work / "compare.png"] if p is not None and p.is_file()]
    summary = _read(out / "results.json") or {}
    summary["interpretability"] = result
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")

    md = ["# rank1 study", ""]
    if "paired" in summary:
        md += ["## Accuracy", "", *accuracy_tables(summary), ""]
    md += ["## Interpretability", "", stage_time(result["seconds"]), ""]
    for t in tables(result):
        md += _md_table(*t)
    md += [f"![{p.stem}]({p.relative_to(out)})" for p in figures] + [""]
    md += ["Dashboards: " + ", ".join(f"[{n}](interpretability/dashboard-{n}/index.html)" for n in result["adapters"]), ""]
    (out / "report.md").write_text("\n".join(md))

    (out / "report.html").write_text(html_page("\n".join(md), "rank1 study"))
