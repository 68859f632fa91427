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


@pytest.mark.slow
def test_bad_eval_input(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"problem": "1+1?", "answer": "2"}\n{"problem": "2+2?"}\n')
    result = run_rank1("eval", "--data", str(bad), "--out", str(tmp_path / "o"))
    assert result.returncode == 2 and "bad.jsonl:2: missing or non-scalar 'answer'" in result.stderr
    good = tmp_path / "good.jsonl"
    good.write_text('{"problem": "1+1?", "answer": "2"}\n')
    result = run_rank1("eval", "--data", str(good), "--adapter", str(tmp_path))
    assert result.returncode == 2 and "no adapter_config.json" in result.stderr


@pytest.mark.slow
def test_eval_end_to_end_grades_what_it_generated(tmp_path):
    # pass@k (k > 1) grades a greedy and k sampled completions per problem in one call; every record must
    # get its own completions' grades back. The extracted answers differ from completion to completion, so
    # a grade given to the wrong completion shows even when every reward is 0.
    out = tmp_path / "eval"
    result = run_rank1("eval", "--data", "arithmetic", "--eval.heldout_rows", "4", "--k", "2", "--rollout.backend", "transformers",
                       "--eval.max_new_tokens", "24", "--cluster.local_num_cpus", "2", "--out", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (out / "problems.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    assert len(records) == 4 and summary["problems"] == 4
    assert summary["pass@1"] == sum(r["pass@1"] for r in records) / 4
    assert "pass@2" in result.stdout and "pass@1" in result.stdout
    from rank1.core.config import RewardsConfig
    from rank1.rewards.guard import GuardedGrader

    graded = []
    with GuardedGrader(RewardsConfig(functions=["math"], gold_format="gsm8k")) as grader:
        for r in records:
            assert len(r["greedy"]) == 1 and len(r["sampled"]) == 2
            for s in r["greedy"] + r["sampled"]:
                assert s["completion"]
                own = grader.grade(r["gold"], s["completion"])
                assert (s["reward"], s["extracted"], s["status"]) == (own.reward, own.extracted, own.status), (r["question"], s)
                graded.append(own.extracted)
            # Grading the gold's own final answer as a completion scores 1: golds are read correctly.
            assert grader.grade(r["gold"], r["gold"].split("####")[-1].join(["\\boxed{", "}"])).reward == 1.0
    assert len(set(graded)) > 3, graded  # the check above could tell one completion's grade from another's
    assert summary["sampled_pass@1"] == sum(sum(x["reward"] > 0 for x in r["sampled"]) / 2 for r in records) / 4

    # --eval.compare_to: the paired gain over another evaluation of the same problems. A baseline that had
    # problem 1 the other way round (greedy and both samples) differs from this run by exactly that problem.
    baseline = tmp_path / "baseline"
    baseline.mkdir()
    flipped = [dict(r) for r in records]
    flipped[0]["pass@1"] = 1.0 - records[0]["pass@1"]
    flipped[0]["sampled"] = [dict(x, reward=1.0 - float(x["reward"] > 0)) for x in records[0]["sampled"]]
    (baseline / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flipped))
    again = run_rank1("eval", "--data", "arithmetic", "--eval.heldout_rows", "4", "--k", "2", "--rollout.backend", "transformers",
                      "--eval.max_new_tokens", "24", "--cluster.local_num_cpus", "2", "--out", str(tmp_path / "again"),
                      "--eval.compare_to", str(baseline))
    assert again.returncode == 0, again.stderr[-3000:]
    compared = json.loads((tmp_path / "again" / "summary.json").read_text())["compared_to"]
    sign = 1 if records[0]["pass@1"] else -1
    assert compared["pass@1"]["value"] == pytest.approx(sign / 4)  # the same model and seed: only problem 1 differs
    share = sum(x["reward"] > 0 for x in records[0]["sampled"]) / 2
    assert compared["sampled_pass@1"]["value"] == pytest.approx((share - (1 - share)) / 4)
    assert "sampled_pass@1:" in again.stdout and "paired 95 % interval" in again.stdout
    # A baseline of other problems, or sampled otherwise, is refused before anything starts: the Ray address
    # given leads nowhere, so a run that got as far as starting engines would fail with another error.
    def refused(*flags):
        return run_rank1("eval", "--data", "arithmetic", "--eval.heldout_rows", "4", "--out", str(tmp_path / "refused"),
                         "--cluster.address", "127.0.0.1:9", "--eval.compare_to", str(baseline), *flags)

    (baseline / "summary.json").write_text(json.dumps({"samples": 2, "temperature": 0.5}))
    result = refused("--k", "2")
    assert result.returncode == 2 and "sampled with temperature 0.5, this evaluation with 1.0" in result.stderr, result.stderr[-2000:]
    flipped[2]["question"] = "What is 1 + 1?"
    (baseline / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flipped))
    result = refused()
    assert result.returncode == 2 and "eval.compare_to: problem 3 differs" in result.stderr, result.stderr[-2000:]
    assert not (tmp_path / "refused").exists()


def test_paired_gains_on_known_records(tmp_path):
    from rank1.core.data import DataError
    from rank1.driver.eval_compare import paired_gains, read_records

    def record(q, greedy, samples):
        return {"question": q, "pass@1": greedy, "sampled": [{"reward": float(x)} for x in samples]}

    base = [record(f"q{i}", i < 10, [i < 5, i < 15]) for i in range(40)]  # greedy 10/40; samples 20/80
    better = [record(f"q{i}", i < 20, [i < 20, i < 20]) for i in range(40)]  # greedy 20/40; samples 40/80
    folder = tmp_path / "base"
    folder.mkdir()
    (folder / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in base))
    gains = paired_gains(read_records(folder), better)
    assert gains["pass@1"]["value"] == pytest.approx(0.25) and gains["pass@1"]["baseline"] == 0.25
    assert gains["sampled_pass@1"]["value"] == pytest.approx(0.25) and gains["sampled_pass@1"]["this"] == 0.5
    low, high = gains["pass@1"]["ci95"]
    assert 0 < low < 0.25 < high < 0.5  # 10 problems better, none worse: the paired interval excludes 0
    no_samples = [dict(r, sampled=[]) for r in better]
    assert set(paired_gains(read_records(folder), no_samples)) == {"pass@1"}
    (folder / "problems.jsonl").write_text(json.dumps(base[0]) + "\n" + '{"question": "q1"}\n')
    with pytest.raises(DataError, match="problems.jsonl line 2: not a rank1 eval problem record"):
        read_records(folder)
    with pytest.raises(DataError, match="does not exist"):
        read_records(tmp_path / "nowhere")
    from rank1.driver.eval_compare import check_same_sampling

    (folder / "summary.json").write_text('{"samples": 8, "temperature": 1.0}')
    check_same_sampling(folder, 8, 1.0)
    check_same_sampling(folder, 1, 0.7)  # this side does not sample: only greedy pass@1 is compared
    with pytest.raises(DataError, match="sampled with samples 8, this evaluation with 4"):
        check_same_sampling(folder, 4, 1.0)
    (folder / "summary.json").write_text("{not json")
    with pytest.raises(DataError, match="summary.json is not a rank1 eval summary"):
        check_same_sampling(folder, 8, 1.0)


def test_eval_prompts_follow_how_the_adapter_was_trained(tokenizer, tmp_path):
    from rank1.core.flags import load_config
    from rank1.driver.evaluate import build_eval_set

    def prompt_text(evalset, i=0):
        return tokenizer.decode(evalset.prompts[i])

    problems = tmp_path / "p.jsonl"
    problems.write_text(json.dumps({"problem": "What is 6 * 7?", "answer": "42"}) + "\n")
    cfg = load_config(["--eval.data", str(problems), "--rollout.max_model_len", "4096"])
    # An s1K-style SFT run was trained on the bare question: its eval prompt is the bare question.
    s1k_run = load_config(["--data.format", "s1k"])
    bare = build_eval_set(cfg, tokenizer, s1k_run)
    assert prompt_text(bare).rstrip().endswith("What is 6 * 7?<|im_end|>\n<|im_start|>assistant") and "step by step" not in prompt_text(bare)
    # A GRPO run appended its instruction in training: eval appends the same.
    grpo_run = load_config(["--objective", "grpo", "--grpo.instruction", "Answer in \\boxed{}."])
    assert "What is 6 * 7? Answer in \\boxed{}." in prompt_text(build_eval_set(cfg, tokenizer, grpo_run))
    # A base model on a reasoning set: the step-by-step instruction, and reasoning-length generation bounded by the context.
    base = build_eval_set(cfg, tokenizer)
    assert "Please reason step by step" in prompt_text(base)
    assert base.max_new_tokens == 4096 - len(base.prompts[0])
    assert build_eval_set(load_config(["--eval.data", str(problems), "--rollout.max_model_len", "65536"]), tokenizer).max_new_tokens == 32768
    assert build_eval_set(load_config(["--eval.data", str(problems), "--eval.prompt", "bare"]), tokenizer).prompts == bare.prompts


def test_arithmetic_eval_set_is_held_out():
    from rank1.core.data import arithmetic_rows, heldout_arithmetic_rows

    heldout = heldout_arithmetic_rows(500, training_rows=2000)
    assert len(heldout) == 500 and len({r["question"] for r in heldout}) == 500
    training = {r["question"] for r in arithmetic_rows(10_000)}
    assert not training & {r["question"] for r in heldout}
    assert heldout == heldout_arithmetic_rows(500)  # fixed: every run and `rank1 eval` see the same problems
    assert heldout_arithmetic_rows(200) == heldout[:200]


def test_eval_context_is_the_models_own_and_validation_is_disjoint_from_test(model_path):
    """`rank1 eval` sizes its engines by the model's context (SmolLM2: 8,192), not a training rollout's 2,048;
    the arithmetic-val problems used to pick learning rates share no question with the arithmetic test set."""
    from rank1.core.flags import load_config
    from rank1.driver.evaluate import load_problems, model_context

    assert model_context(model_path, load_config([])) == 8192
    test, _ = load_problems("arithmetic", 1000)
    validation, _ = load_problems("arithmetic-val", 500)
    assert len(validation) == 500 and not {p["question"] for p in test} & {p["question"] for p in validation}
