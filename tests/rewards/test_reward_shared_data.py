"""Every MATH500 and GSM8K-test gold graded against itself scores 1, and a perturbed one scores 0.

All rows, through the guarded grader (the child process the reward actors use); about 15 s in total.
"""

import json
import re


def _rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _perturbed(answer: str) -> str:
    # gold+1 for integers; otherwise a different expression (x+1 differs from x for every MATH500 answer).
    return str(int(answer) + 1) if re.fullmatch(r"-?\d+", answer.strip()) else f"{answer}+1"


def test_math500_answers_grade_1_against_themselves_and_0_perturbed(grader, data_dir):
    rows = _rows(data_dir / "math500" / "test.jsonl")
    assert len(rows) == 500
    wrong_accepted, right_rejected = [], []
    for row in rows:
        gold = row["answer"]
        right = grader.grade(gold, f"Therefore the answer is $\\boxed{{{gold}}}$.")
        if (right.reward, right.status) != (1.0, "ok"):
            right_rejected.append((gold, right))
        wrong = grader.grade(gold, f"Therefore the answer is $\\boxed{{{_perturbed(gold)}}}$.")
        if wrong.reward != 0.0:
            wrong_accepted.append((gold, wrong))
    assert right_rejected == []
    assert wrong_accepted == []


def test_gsm8k_test_golds_grade_1_against_themselves_and_0_plus_one(grader, data_dir):
    rows = _rows(data_dir / "gsm8k" / "test.jsonl")
    assert len(rows) == 1319
    failures = []
    for row in rows:
        number = row["answer"].rsplit("####", 1)[1].strip()
        right = grader.grade(row["answer"], f"Let me compute.\n#### {number}")
        wrong = grader.grade(row["answer"], f"Let me compute.\n#### {int(number.replace(',', '')) + 1}")
        if (right.reward, right.status, wrong.reward) != (1.0, "ok", 0.0):
            failures.append((number, right, wrong))
    assert failures == []
