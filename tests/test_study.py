"""`rank1 study accuracy`: the recovery arithmetic, the arms it accepts, and a tiny study end to end that is
pre-empted mid-way and resumed without redoing a finished arm."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from rank1_testing import REPO, run_rank1
from rank1.core.config import ConfigError, StudyConfig
from rank1.driver.study.arms import parse_arms
from rank1.driver.study.recovery import gain, recovery


def test_recovery_on_known_numbers():
    base = [1, 1] + [0] * 8  # 20 %
    rank1 = [1] * 5 + [0] * 5  # 50 %
    full = [1] * 7 + [0] * 3  # 70 %
    r = recovery(base, rank1, full)
    assert r.value == pytest.approx(0.6)  # (0.5 - 0.2) / (0.7 - 0.2)
    assert r.low <= 0.6 <= r.high and r.low < r.high
    g = gain(base, rank1)
    assert g.value == pytest.approx(0.3) and g.low <= 0.3 <= g.high
    same = gain(rank1, rank1)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0)  # identical answers: no spread at all


@pytest.mark.parametrize("full", [[1, 1] + [0] * 8, [1] + [0] * 9])
def test_recovery_is_undefined_when_the_full_fine_tune_gains_nothing(full):
    r = recovery([1, 1] + [0] * 8, [1] * 5 + [0] * 5, full)
    assert r.value is None and r.low is None and "gained nothing" in r.note


def test_recovery_needs_the_same_problems():
    with pytest.raises(ValueError, match="same non-empty problems"):
        recovery([1, 0], [1, 0, 1], [1, 1])


def test_arms_parse_and_bad_arms_are_named():
    arms = parse_arms(StudyConfig(arms=["base", "rank1-sft", "rank1-grpo", "rank64-sft", "full-sft"]))
    assert [(a.kind, a.rank, a.full, a.after) for a in arms] == [
        ("base", None, False, None), ("sft", 1, False, None), ("grpo", 1, False, "rank1-sft"), ("sft", 64, False, None), ("sft", None, True, None)]
    with pytest.raises(ConfigError, match="rank1-grpo starts from the rank1-sft adapter"):
        parse_arms(StudyConfig(arms=["rank1-grpo"]))
    with pytest.raises(ConfigError, match="'rank-one' is not an arm"):
        parse_arms(StudyConfig(arms=["rank-one"]))
    with pytest.raises(ConfigError, match="names an arm twice"):
        parse_arms(StudyConfig(arms=["base", "base"]))


def test_a_bad_arm_on_the_command_line_is_one_clear_error(tmp_path):
    result = run_rank1("study", "accuracy", "--study.arms", "[base, rank2-grpo]", "--study.out", str(tmp_path / "s"))
    assert result.returncode == 2 and "rank2-grpo starts from the rank2-sft adapter" in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


TINY = ["--study.test_rows", "8", "--study.validation_rows", "4", "--study.grpo_steps", "1", "--study.full_lrs", "[1e-4]",
        "--max-steps", "2", "--data.arithmetic_rows", "32", "--data.max_length", "96", "--trainer.global_batch_size", "2",
        "--trainer.micro_batch_size", "2", "--rollout.backend", "transformers", "--logging.progress", "false",
        "--trainer.checkpoint_every", "1", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2",
        "--grpo.max_completion_length", "8", "--eval.max_new_tokens", "16"]
# The interpretability stages at a tiny size (sae.* flags reach every child; train and eval ignore them).
TINY_SAE = ["--study.collect_tokens", "1500", "--sae.collect.shard_tokens", "1000", "--sae.train.train_tokens", "20000",
            "--sae.train.batch_size", "128", "--sae.train.k", "4", "--sae.train.expansion", "2", "--sae.train.eval_docs", "4",
            "--sae.train.log_every", "20", "--sae.analyze.top_k", "5", "--sae.analyze.random_examples", "20", "--sae.ablate.docs", "4"]


@pytest.mark.slow
def test_a_tiny_study_runs_end_to_end_and_resumes_after_sigterm(tmp_path):
    out = tmp_path / "study"
    argv = [sys.executable, "-m", "rank1.cli", "study", "accuracy", "--study.out", str(out), *TINY, *TINY_SAE]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 1200
    while not (out / "rank8-sft" / "lr-0.001" / "train.log").exists():  # three arms done, the fourth training
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read()[-3000:] if proc.poll() is not None else "timeout"
        time.sleep(0.2)
    finished = {arm: (out / arm / "result.json").stat().st_mtime_ns for arm in ("base", "rank1-sft", "rank1-grpo")}
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    assert "rerun the same command to continue" in stderr and not (out / "results.json").exists()

    # Resumed as the whole study: the accuracy arms continue, then the interpretability stages run.
    whole = [a for a in argv if a != "accuracy"]
    resumed = subprocess.run(whole, cwd=REPO, env=env, capture_output=True, text=True, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for arm, mtime in finished.items():
        assert (out / arm / "result.json").stat().st_mtime_ns == mtime  # not redone
        assert f"study: {arm} is done" in resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == ["base", "rank1-sft", "rank1-grpo", "rank8-sft", "full-sft"]
    for arm in results["arms"].values():
        assert arm["tests"]["arithmetic"]["problems"] == 8 and len(arm["tests"]["arithmetic"]["correct_per_problem"]) == 8
    rank8 = results["arms"]["rank8-sft"]
    assert [c["lr"] for c in rank8["candidates"]] == [1e-3, 3e-3] and all("validation_accuracy" in c for c in rank8["candidates"])
    assert results["arms"]["full-sft"]["trained_parameters"] == 134_515_008
    assert results["arms"]["rank8-sft"]["trained_parameters"] == 8 * results["arms"]["rank1-sft"]["trained_parameters"]
    paired = results["paired"]["arithmetic"]
    assert set(paired["recovery"]) == {"rank1-sft", "rank1-grpo", "rank8-sft"} and "rank1-grpo" in paired["grpo_over_sft"]
    report = (out / "report.md").read_text()
    assert "| rank1-grpo |" in report and (out / "accuracy.png").stat().st_size > 0
    # The resumed arm really continued its checkpointed run: its metrics have every step once.
    steps = [json.loads(line)["step"] for line in (out / "rank8-sft" / "lr-0.001" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps)) and steps[-1] == 2
    # The interpretability half: SAEs on the SFT and GRPO adapters, concept scores with the random control,
    # the SFT-vs-GRPO comparison, the ablation, and one report that opens in a browser without errors.
    interp = results["interpretability"]
    assert set(interp["adapters"]) == {"sft", "grpo"} and "compare" in interp
    for name, a in interp["adapters"].items():
        assert a["sae"]["fvu"] is not None and a["sae"]["fvu"] < a["sae"]["curve"][0]["fvu"]  # it learned
        assert {"adapter", "neuron", "latent", "random_adapter"} <= set(a["concepts"])
        assert len(a["ablation"]["layers"]) == 30 and a["ablation"]["kl_base"] > 0
    c = interp["compare"]
    assert c["n_shared"] + c["n_unique_a"] >= 1 and 0 < c["threshold"] < 1
    report = (out / "report.md").read_text()
    assert "## Interpretability" in report and "Concept F1 per family, sft adapter" in report and "| rank1-grpo |" in report
    assert "Interpretability compute: " in report and " stages (slowest: " in report  # the stages' total, from their markers
    from rank1_testing import IMAGES_LOADED, PAGE_TEXT, HeadlessChromium

    with HeadlessChromium(tmp_path / "profile") as chromium:
        errors, (text, images_ok) = chromium.open(out / "report.html", [PAGE_TEXT, IMAGES_LOADED])
    assert errors == [] and images_ok is True
    assert "SFT vs GRPO: SAE features" in text and "recovery" in text and "random adapter (control)" in text
