"""The accuracy study's report.md and accuracy.png (from results.json's content)."""

from __future__ import annotations

from pathlib import Path


def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f} %"


def interval(ci: list) -> str:
    low, high = ci
    return "–" if low is None else f"{100 * low:.1f}–{100 * high:.1f} %"


def points(estimate: dict | None) -> str:
    if not estimate or estimate["value"] is None:
        return "–"
    low, high = estimate["ci95"]
    return f"{100 * estimate['value']:+.1f} ({100 * low:+.1f} to {100 * high:+.1f})"


def ratio(estimate: dict | None) -> str:
    if not estimate:
        return "–"
    if estimate["value"] is None:
        return "undefined"
    low, high = estimate["ci95"]
    return f"{100 * estimate['value']:.0f} % ({100 * low:.0f}–{100 * high:.0f} %)" if low is not None else f"{100 * estimate['value']:.0f} %"


def what_it_trains(arm: dict) -> str:
    if arm["kind"] == "base":
        return "nothing (the base)"
    what = "every weight" if arm["full"] else f"rank-{arm['rank']} adapters"
    return f"{what}, {arm['trained_parameters']:,} params, {arm['kind'].upper()}"


def lr_cell(arm: dict) -> str:
    if arm["kind"] == "base":
        return "–"
    tried = arm["candidates"]
    if len(tried) == 1:
        return f"{arm['picked_lr']:g}"
    shown = ", ".join(f"{c['lr']:g}: {pct(c['validation_accuracy'])}" for c in tried)
    return f"**{arm['picked_lr']:g}** (validation {shown})"


def accuracy_tables(summary: dict) -> list[str]:
    lines = []
    for data, paired in summary["paired"].items():
        lines += [f"### {data}", "", "| arm | trains | lr | accuracy | 95 % interval | gain over base, points (95 %) | recovery (95 %) | train time |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, arm in summary["arms"].items():
            test = arm["tests"][data]
            train = f"{arm['train_s'] / 60:.1f} min" if "train_s" in arm else "–"
            lines.append(f"| {name} | {what_it_trains(arm)} | {lr_cell(arm)} | {pct(test['pass@1'])} ({test['correct']:.0f}/{test['problems']}) "
                         f"| {interval(test['pass@1_ci95'])} | {points(paired['gain_over_base'].get(name))} "
                         f"| {ratio(paired['recovery'].get(name))} | {train} |")
        lines.append("")
        for name, estimate in paired["grpo_over_sft"].items():
            verdict = "above" if estimate["ci95"][0] is not None and estimate["ci95"][0] > 0 else "not clear of"
            lines.append(f"- {name} over its SFT start: {points(estimate)} points, {verdict} zero at 95 % (paired bootstrap).")
        for name, estimate in paired["recovery"].items():
            if estimate.get("note"):
                lines.append(f"- {name} recovery: {estimate['note']}.")
        lines.append("")
    return lines


def write_accuracy_report(summary: dict, out: Path) -> None:
    study = summary["study"]
    head = [
        "# rank1 study: accuracy", "",
        "Every arm is scored on the same held-out problems (greedy pass@1); intervals of one arm are Wilson 95 %, "
        "differences and recovery = (acc_arm − acc_base) / (acc_full − acc_base) use a paired bootstrap over problems. "
        f"Learning rates with several candidates were picked on {study['validation_rows']} {study['validation_data']} problems, "
        "never on the test set.", "",
        f"Study compute: {summary['total_s'] / 60:.1f} min (every arm's training and eval); flags given to every arm: "
        f"`{' '.join(summary['flags']) or '(none)'}`.", "",
    ]
    lines = head + accuracy_tables(summary) + ["![accuracy per arm](accuracy.png)", ""]
    (out / "report.md").write_text("\n".join(lines))
    plot_accuracy(summary, out / "accuracy.png")


def plot_accuracy(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(summary["paired"])
    fig, axes = plt.subplots(1, len(sets), figsize=(1.6 * len(summary["arms"]) * len(sets) + 1, 4), squeeze=False)
    for ax, data in zip(axes[0], sets):
        names = list(summary["arms"])
        tests = [summary["arms"][n]["tests"][data] for n in names]
        acc = [100 * t["pass@1"] for t in tests]
        low = [a - 100 * t["pass@1_ci95"][0] for a, t in zip(acc, tests)]
        high = [100 * t["pass@1_ci95"][1] - a for a, t in zip(acc, tests)]
        bars = ax.bar(names, acc, yerr=[low, high], capsize=4, color=["#999", "#2a6", "#16a", "#a62", "#a26", "#666"][: len(names)])
        for bar, name in zip(bars, names):
            rec = summary["paired"][data]["recovery"].get(name)
            if rec and rec["value"] is not None:
                ax.annotate(f"{100 * rec['value']:.0f} % rec.", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                            ha="center", va="bottom", fontsize=7, xytext=(0, 12), textcoords="offset points")
        ax.set_ylabel("pass@1 (%)")
        ax.set_title(f"{data}: {tests[0]['problems']} problems, 95 % intervals")
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
