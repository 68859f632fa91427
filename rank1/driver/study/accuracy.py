"""`rank1 study accuracy`: held-out accuracy per arm and the share of the full fine-tune's gain rank 1 recovers.

    rank1 study accuracy [--study.out DIR] [--study.arms ...] [any train flag, applied to every arm]

Arms (study.arms): the base; rank-1 SFT; rank-1 GRPO from that SFT adapter; rank-r SFT; the full
fine-tune (every weight, rank1.trainer.full_learner). Every trained arm is `rank1 train` with the study's
train flags plus its own; where an arm lists several learning rates, each is trained and the one with
the best accuracy on the validation problems (arithmetic-val: held out from training and from the test
set) is kept. Every arm is then scored by `rank1 eval` on the same test problems (greedy pass@1), so the
differences between arms are paired (rank1.driver.study.recovery). Writes OUT/results.json,
OUT/report.md, OUT/accuracy.png; a rerun continues where the last one stopped and redoes nothing finished.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from rank1.core.config import Config, ConfigError
from rank1.core.flags import to_dict
from rank1.driver.metrics import log
from rank1.driver.study.arms import Arm, eval_run, parse_arms, train_run
from rank1.driver.study.recovery import gain, recovery


def trained_parameters(arm: Arm, cfg: Config) -> int:
    from rank1.core.config import AdapterConfig
    from rank1.core.model import count_adapters_from_config, parameter_count_from_config, resolve_model_path

    if arm.kind == "base":
        return 0
    path = resolve_model_path(cfg.model)
    if arm.full:
        return parameter_count_from_config(path)
    return count_adapters_from_config(path, AdapterConfig(r=arm.rank, target_modules=cfg.adapter.target_modules)).parameters


def check_study(cfg: Config, forwarded: list[str], out: Path) -> None:
    """A study folder belongs to one set of flags: a rerun with other ones would mix arms of two studies."""
    saved, mine = out / "study.json", {"flags": forwarded, "study": {k: v for k, v in to_dict(cfg.study).items() if k != "stages"}}
    if saved.is_file():
        theirs = json.loads(saved.read_text())
        if theirs != mine:
            changed = [k for k in ("flags", *mine["study"]) if (theirs.get(k) if k == "flags" else theirs["study"].get(k)) !=
                       (mine[k] if k == "flags" else mine["study"][k])]
            raise ConfigError(f"study.out {out} holds a study run with other settings ({', '.join(changed)} differ); "
                              "rerun it with the same flags to continue it, or choose another study.out")
    out.mkdir(parents=True, exist_ok=True)
    saved.write_text(json.dumps(mine, indent=1) + "\n")


def run_arm(arm: Arm, cfg: Config, forwarded: list[str], out: Path, done_arms: dict) -> dict:
    study, folder = cfg.study, out / arm.name
    done = folder / "result.json"
    if done.is_file():
        log(f"study: {arm.name} is done ({done}); kept")
        return json.loads(done.read_text())
    folder.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = {"arm": arm.name, "kind": arm.kind, "rank": arm.rank, "full": arm.full, "trained_parameters": trained_parameters(arm, cfg)}
    artifact = None
    if arm.kind != "base":
        init = None
        if arm.after:
            before = done_arms[arm.after]
            init = str(out / arm.after / before["picked_run"] / "adapter")
        candidates = []
        for lr in arm.lrs:
            run_dir = folder / f"lr-{lr:g}"
            summary = train_run(run_dir, [*forwarded, *arm.train_flags(lr, init, study, cfg.grpo)])
            entry = {"lr": lr, "run": run_dir.name, "train_s": summary["wall_s"], "steps": summary["steps"],
                     **{k: v for k, v in summary.items() if k.startswith("final_")}}
            if len(arm.lrs) > 1:
                val = eval_run(run_dir / "eval-validation", forwarded, study.validation_data, study.validation_rows,
                               run_dir / arm.artifact, arm.full)
                entry.update(validation_accuracy=val["pass@1"], validation_problems=val["problems"])
            candidates.append(entry)
        picked = max(candidates, key=lambda c: c.get("validation_accuracy", 0.0))  # the first of equals
        result.update(candidates=candidates, picked_lr=picked["lr"], picked_run=picked["run"], train_s=picked["train_s"],
                      sweep_train_s=round(sum(c["train_s"] for c in candidates), 1))
        artifact = folder / picked["run"] / arm.artifact
    result["tests"] = {}
    for data in study.eval_sets:
        scored = eval_run(folder / f"eval-{Path(data).stem}", forwarded, data, study.test_rows, artifact, arm.full)
        result["tests"][data] = {k: scored[k] for k in ("pass@1", "pass@1_ci95", "problems", "correct", "eval_s", "correct_per_problem")}
    result["wall_s"] = round(time.perf_counter() - began, 1)
    done.write_text(json.dumps(result, indent=1) + "\n")
    return result


def summarize(arms: dict[str, dict], cfg: Config) -> dict:
    """Per eval set: gain over the base of every arm, recovery of every adapter arm against the full fine-tune,
    and each GRPO arm's gain over the SFT arm it started from (all paired on the same problems)."""
    out = {}
    for data in cfg.study.eval_sets:
        per = {name: a["tests"][data]["correct_per_problem"] for name, a in arms.items()}
        entry: dict = {"gain_over_base": {}, "recovery": {}, "grpo_over_sft": {}}
        if "base" in per:
            for name, correct in per.items():
                if name != "base":
                    entry["gain_over_base"][name] = gain(per["base"], correct).as_dict()
            full = per.get("full-sft", cfg.study.reference_for(data))  # a published full fine-tune where the study trains none
            if full is not None:
                for name, correct in per.items():
                    if name not in ("base", "full-sft"):
                        entry["recovery"][name] = recovery(per["base"], correct, full).as_dict()
                if "full-sft" not in per:
                    entry["recovery_reference"] = full
        for name, a in arms.items():
            if a["kind"] == "grpo":
                after = name.replace("-grpo", "-sft")
                if after in per:
                    entry["grpo_over_sft"][name] = gain(per[after], per[name]).as_dict()
        out[data] = entry
    return out


def run_accuracy(cfg: Config, forwarded: list[str]) -> dict:
    from rank1.driver.study.report_accuracy import write_accuracy_report

    out = Path(cfg.study.out)
    arms = parse_arms(cfg.study)
    if any(len(a.lrs) > 1 for a in arms) and not cfg.study.validation_data:
        raise ConfigError("study: an arm tries several learning rates but study.validation_data is empty")
    check_study(cfg, forwarded, out)
    began = time.perf_counter()
    results: dict[str, dict] = {}
    for arm in arms:
        results[arm.name] = run_arm(arm, cfg, forwarded, out, results)
    summary = {"arms": results, "paired": summarize(results, cfg), "flags": forwarded, "study": to_dict(cfg.study),
               "this_run_s": round(time.perf_counter() - began, 1),
               "total_s": round(sum(a["wall_s"] for a in results.values()), 1)}
    (out / "results.json").write_text(json.dumps(summary, indent=1) + "\n")
    write_accuracy_report(summary, out)
    log(f"study: accuracy report in {out / 'report.md'}")
    return summary
