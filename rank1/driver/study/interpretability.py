"""`rank1 study`'s interpretability stages: the paper's second claim, measured on the study's own adapters.

    collect   the adapter activations s = A·x (and the MLP baseline neurons) of the rank-1 SFT adapter, of the
              GRPO adapter trained from it, and of a randomly initialised adapter (the control), on the
              training task's documents (the adapters' own data)
    sae       a BatchTopK SAE on each trained adapter's activations (the paper's k, expansion and AuxK), with
              the adapter effect recovered on the own data and, with study.other_text, on other text
    analyze   top examples, histograms and densities of every feature (adapter ±, neurons, SAE latents)
    concepts  the LLM-free score: each feature's best concept F1 on held-out documents, per family
    explain   LLM explanations, detection, fuzzing and self-rating (only with --sae.explain.llm and an endpoint)
    compare   SFT vs GRPO: shared and unique SAE features (threshold from random dictionaries), adapter change
              per module and layer
    ablate    leave-one-layer-out KL of each trained adapter on held-out text
    report    a dashboard per adapter, then OUT/report.html + report.md + results.json's "interpretability"

Each stage is a `rank1 sae ...` child process (rank1.driver.study.arms.run_child: SIGTERM reaches it, a
killed study takes it along) and is done once its marker exists, so a rerun continues where it stopped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from rank1.core.config import EMBEDDED_DATA, Config, ConfigError
from rank1.core.data import HELDOUT_DATA
from rank1.driver.metrics import log
from rank1.driver.study.arms import run_child


@dataclass
class Stage:
    name: str
    argv: list[str]  # `rank1` arguments (the study's forwarded flags are added in front of the stage's own)
    output: Path  # what the stage writes; the stage is done when its marker exists


def trained_adapter(out: Path, arm: str) -> Path:
    """The adapter the accuracy stage kept for an arm (its picked learning rate)."""
    result = out / arm / "result.json"
    if not result.is_file():
        raise ConfigError(f"study interpretability: needs the {arm} arm's adapter ({result} is missing); keep {arm} in study.arms "
                          "and its accuracy stage in study.stages, or run `rank1 study accuracy` first")
    return out / arm / json.loads(result.read_text())["picked_run"] / "adapter"


def stages(cfg: Config, out: Path) -> list[Stage]:
    s, work = cfg.study, out / "interpretability"
    adapters = {"sft": trained_adapter(out, "rank1-sft")}
    if "rank1-grpo" in s.arms:
        adapters["grpo"] = trained_adapter(out, "rank1-grpo")
    random = work / "random-adapter"
    plan = [Stage("random-adapter", ["sae", "random-adapter", "--sae.random_adapter.out", str(random)], random)]
    for name, adapter in [*adapters.items(), ("random", random)]:
        plan.append(Stage(f"collect-{name}", ["sae", "collect", "--sae.collect.adapter", str(adapter), "--sae.collect.tokens",
                                              str(s.collect_tokens), "--sae.collect.out", str(work / f"acts-{name}")], work / f"acts-{name}"))
    other = ["--sae.train.eval_data", f"[{s.other_text}]"] if s.other_text else []
    # Held-out text for the ablation: the embedded task's held-out problems, else study.other_text, else the data itself.
    held = HELDOUT_DATA if cfg.data.path == EMBEDDED_DATA else s.other_text
    heldout = ["--data.path", held] if held else []
    explain = bool(cfg.sae.explain.llm and (cfg.sae.explain.base_url or cfg.sae.explain.local))
    for name in adapters:
        acts, sae, analysis = work / f"acts-{name}", work / f"sae-{name}", work / f"analysis-{name}.json"
        plan += [
            Stage(f"sae-{name}", ["sae", "train", "--sae.train.activations", str(acts), "--sae.train.out", str(sae), *other], sae),
            Stage(f"analyze-{name}", ["sae", "analyze", "--sae.analyze.activations", str(acts), "--sae.analyze.sae", str(sae),
                                      "--sae.analyze.out", str(analysis)], analysis),
            Stage(f"concepts-{name}", ["sae", "concepts", "--sae.concepts.activations", str(acts), "--sae.concepts.sae", str(sae),
                                       "--sae.concepts.control", str(work / "acts-random"), "--sae.concepts.out",
                                       str(work / f"concepts-{name}.json")], work / f"concepts-{name}.json"),
            Stage(f"ablate-{name}", ["sae", "ablate", "--sae.ablate.adapter", str(adapters[name]), *heldout, "--sae.ablate.out",
                                     str(work / f"ablate-{name}.json")], work / f"ablate-{name}.json"),
        ]
        explained = []
        if explain:
            explained = ["--sae.report.explanations", str(work / f"explain-{name}.json")]
            plan.append(Stage(f"explain-{name}", ["sae", "explain", "--sae.explain.analysis", str(analysis), "--sae.explain.out",
                                                  str(work / f"explain-{name}.json")], work / f"explain-{name}.json"))
        plan.append(Stage(f"dashboard-{name}", ["sae", "report", "--sae.report.analysis", str(analysis), *explained,
                                                "--sae.report.out", str(work / f"dashboard-{name}")], work / f"dashboard-{name}"))
    if "grpo" in adapters:
        plan.append(Stage("compare", ["sae", "compare", "--sae.compare.sae_a", str(work / "sae-sft"), "--sae.compare.sae_b",
                                      str(work / "sae-grpo"), "--sae.compare.analysis_a", str(work / "analysis-sft.json"),
                                      "--sae.compare.analysis_b", str(work / "analysis-grpo.json"), "--sae.compare.out",
                                      str(work / "compare.json")], work / "compare.json"))
    return plan


def run_stage(stage: Stage, forwarded: list[str], work: Path) -> None:
    marker = work / ".done" / stage.name
    if marker.is_file():
        log(f"study: {stage.name} is done ({stage.output}); kept")
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    log(f"study: {stage.name}")
    seconds = run_child([*stage.argv[:2], *forwarded, *stage.argv[2:], "--logging.progress", "false"], work / f"{stage.name}.log")
    marker.write_text(json.dumps({"output": str(stage.output), "seconds": round(seconds, 1)}) + "\n")


def run_interpretability(cfg: Config, forwarded: list[str]) -> dict:
    from rank1.driver.study.report_interpretability import gather, stage_time, write_interpretability_report

    out = Path(cfg.study.out)
    work = out / "interpretability"
    plan = stages(cfg, out)  # its errors (a missing arm) before any work
    work.mkdir(parents=True, exist_ok=True)
    for stage in plan:
        run_stage(stage, forwarded, work)
    results = gather(out, [s.name for s in plan])
    write_interpretability_report(out, results)
    log(f"study: {stage_time(results['seconds'])}")
    log(f"study: report in {out / 'report.html'}")
    return results
