"""`python -m rank1.rewards.cli` (wired as `rank1 grade`) run as a real subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_grade(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "rank1.rewards.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.slow
def test_grade_writes_reward_extracted_status_and_a_summary(tmp_path):
    rows = [
        {"id": 1, "gold": r"\left( 3, \frac{\pi}{2} \right)", "completion": r"so \boxed{(3, \frac{\pi}{2})}"},
        {"id": 2, "gold": "Half of 2,400 is 1,200.\n#### 1,200", "completion": "So:\n#### 1200"},
        {"id": 3, "gold": "18", "completion": "I think it is 17."},
        {"id": 4, "gold": "1", "completion": r"\boxed{9^{9^{9^{9^{9}}}}}"},
        {"id": 5, "gold": 12, "completion": r"\boxed{12}"},
    ]
    src = write_jsonl(tmp_path / "in.jsonl", [json.dumps(r) for r in rows])
    out = tmp_path / "out.jsonl"
    proc = run_grade(str(src), "--out", str(out), "--workers", "2", "--timeout", "2")
    assert proc.returncode == 0, proc.stderr
    graded = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["id"] for g in graded] == [1, 2, 3, 4, 5]  # input order, input fields kept
    assert [g["reward"] for g in graded] == [1, 1, 0, 0, 1]
    assert [g["status"] for g in graded] == ["ok", "ok", "ok", "timeout", "ok"]
    assert [g["extracted"] for g in graded][:3] == [r"(3, \frac{\pi}{2})", "1200", "17"]
    assert "graded 5 rows: 3 correct (60.0%), 1 timeout, 0 error" in proc.stdout
    assert "grading" in proc.stderr  # the tqdm bar


@pytest.mark.parametrize("line3, message", [
    ('{"gold": "1", "completion": "x"', "in.jsonl:3: not valid JSON"),
    ('{"completion": "x"}', "in.jsonl:3: missing field 'gold'"),
    ('{"gold": "1"}', "in.jsonl:3: missing field 'completion'"),
    ('{"gold": "1", "completion": 42}', "in.jsonl:3: 'completion' must be a string, got int"),
    ('{"gold": null, "completion": "x"}', "in.jsonl:3: 'gold' must be a string or number, got NoneType"),
    ('["gold", "completion"]', "in.jsonl:3: expected a JSON object, got list"),
])
def test_bad_row_names_file_and_line_and_writes_nothing(tmp_path, line3, message):
    good = json.dumps({"gold": "1", "completion": r"\boxed{1}"})
    src = write_jsonl(tmp_path / "in.jsonl", [good, good, line3, good])
    out = tmp_path / "out.jsonl"
    proc = run_grade(str(src), "--out", str(out))
    assert proc.returncode == 2
    assert message in proc.stderr
    assert list(tmp_path.iterdir()) == [src]  # no output, no temp file


def test_existing_output_is_untouched_by_a_failed_run(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"gold": "1", "completion": "\xff\xfe"}\n')
    out = tmp_path / "out.jsonl"
    out.write_text("previous results\n")
    proc = run_grade(str(src), "--out", str(out))
    assert proc.returncode == 2 and "in.jsonl:1: not UTF-8" in proc.stderr
    assert out.read_text() == "previous results\n"


@pytest.mark.parametrize("args, message", [
    (["missing.jsonl", "--out", "o.jsonl"], "missing.jsonl: cannot read"),
    (["in.jsonl", "--out", "o.jsonl", "--gold-format", "yaml"], "flag --gold-format: rewards.gold_format: 'yaml' is not one of auto, gsm8k, latex"),
    (["in.jsonl", "--out", "o.jsonl", "--workers", "0"], "rewards.num_workers: must be > 0, got 0"),
    (["in.jsonl"], "rank1 grade: --out (grade.out) is required"),
    (["in.jsonl", "--out", "o.jsonl", "--timeout", "-1"], "rewards.timeout_s: must be > 0"),
])
def test_bad_flags_and_missing_files_are_named(tmp_path, args, message):
    write_jsonl(tmp_path / "in.jsonl", [json.dumps({"gold": "1", "completion": "1"})])
    args = [str(tmp_path / a) if a.endswith(".jsonl") else a for a in args]
    proc = run_grade(*args)
    assert proc.returncode == 2
    assert message in proc.stderr


def test_empty_input_is_an_error(tmp_path):
    src = write_jsonl(tmp_path / "in.jsonl", [""])
    proc = run_grade(str(src), "--out", str(tmp_path / "out.jsonl"))
    assert proc.returncode == 2 and "no rows to grade" in proc.stderr
