"""`rank1 eval`: real engines (transformers backend) + the real reward pool on shared GSM8K rows."""

from __future__ import annotations

import itertools
import json

import pytest

from rank1_testing import SHARED_DATA, run_rank1
from rank1.driver.evaluate import load_problems, pass_at_k


def test_pass_at_k_matches_brute_force():
    for n, c, k in [(4, 0, 2), (4, 1, 2), (4, 2, 2), (5, 3, 3), (6, 6, 1), (10, 1, 1)]:
        samples = [1] * c + [0] * (n - c)
        subsets = list(itertools.combinations(range(n), k))
        brute = sum(any(samples[i] for i in s) for s in subsets) / len(subsets)
        assert pass_at_k(n, c, k) == pytest.approx(brute)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_named_benchmarks_load_from_the_data_dir(monkeypatch):
    monkeypatch.setenv("RANK1_DATA_DIR", str(SHARED_DATA))
    sizes = {"math500": 500, "gsm8k": 1319, "aime24": 30, "amc23": 40}
    for name, size in sizes.items():
        problems, _ = load_problems(name, None)
        assert len(problems) == size and all(p["question"] and p["gold"] for p in problems)
    amc, _ = load_problems("amc23", 1)
    assert amc[0]["gold"] == "27"  # 27.0 in the file


def test_bad_eval_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    result = run_rank1("eval", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "bad.jsonl:2: missing or non-scalar 'answer'" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1?", "answer": "2"}\n')
    result = run_rank1("eval", "--data", str(good), "--adapter", str(tmp_path))
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not present")
def test_eval_end_to_end_grades_what_it_generated(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_DATA_DIR", str(SHARED_DATA))
    out = tmp_path / "eval"
    result = run_rank1("eval", "--data", "gsm8k", "--limit", "2", "--k", "2", "--rollout.backend", "transformers",
                       "--rollout.max_new_tokens", "24", "--cluster.local_num_cpus", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 2 and summary["problems"] == 2
    assert summary["pass@1"] == sum(r["pass@1"] for r in records) / 2
    assert "pass@2" in result.stdout and "pass@1" in result.stdout
    from rank1.core.config import RewardsConfig
    from rank1.rewards.guard import GuardedGrader

    with GuardedGrader(RewardsConfig(functions=["math"], gold_format="gsm8k")) as grader:
        for r in records:
            assert len(r["greedy"]) == 1 and len(r["sampled"]) == 2
            for s in r["greedy"] + r["sampled"]:
                assert s["completion"] and s["status"] == "ok"
                assert grader.grade(r["gold"], s["completion"]).reward == s["reward"]
            # Grading the gold's own final answer as a completion scores 1: golds are read correctly.
            assert grader.grade(r["gold"], r["gold"].split("####")[-1].join(["\\boxed{", "}"])).reward == 1.0
