"""`rank1 eval --eval.compare_to DIR`: the paired gain of this evaluation over another one on the same problems.

Two adapters scored on the same problems differ problem by problem, so their difference has a much
narrower interval than either accuracy's own: the gain is bootstrapped over problems (the study's
`gain`). Greedy pass@1 always; with samples (eval.k > 1) on both sides also the sampled pass@1, each
problem's share of correct samples (the mean of pass@1 over samples at eval.temperature, as DeepSeek-R1
reports pass@1), which is where a GRPO policy that trains at that temperature shows what it learned.
"""

from __future__ import annotations

import json
from pathlib import Path

from rank1.core.data import DataError
from rank1.driver.study.recovery import gain


def sampled_correct(record: dict) -> float | None:
    """A problem's share of correct samples, None without samples."""
    samples = record.get("sampled") or []
    return sum(s["reward"] > 0 for s in samples) / len(samples) if samples else None


def outcome(record: dict) -> dict:
    """What a comparison reads of one problem record of `rank1 eval`."""
    return {"question": record["question"], "pass@1": float(record["pass@1"]), "sampled": sampled_correct(record)}


def read_records(folder: Path) -> list[dict]:
    path = Path(folder) / "problems.jsonl"
    if not path.is_file():
        raise DataError(f"eval.compare_to: {path} does not exist (the folder of a finished `rank1 eval`, its eval.out)")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(outcome(json.loads(line)))
        except (ValueError, KeyError, TypeError) as error:
            raise DataError(f"{path} line {number}: not a rank1 eval problem record ({error})") from None
    return records


def check_same_problems(baseline: Path, theirs: list[dict], questions: list[str]) -> None:
    """Before anything is generated: the baseline scored exactly these problems, in this order."""
    if len(theirs) != len(questions):
        raise DataError(f"eval.compare_to: {baseline} scored {len(theirs)} problems, this evaluation scores {len(questions)}: "
                        "compare evaluations of the same set and eval.limit")
    for i, (a, question) in enumerate(zip(theirs, questions)):
        if a["question"] != question:
            raise DataError(f"eval.compare_to: problem {i + 1} differs ({baseline}: {a['question'][:60]!r}; here: "
                            f"{question[:60]!r}): compare evaluations of the same set")


def check_same_sampling(baseline: Path, samples: int, temperature: float) -> None:
    """The sampled pass@1 of two evaluations compares only at one temperature and number of samples."""
    path = Path(baseline) / "summary.json"
    try:
        theirs = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError as error:
        raise DataError(f"eval.compare_to: {path} is not a rank1 eval summary ({error})") from None
    if samples <= 1 or "samples" not in theirs:
        return  # one side did not sample: only greedy pass@1 is compared
    for key, ours in (("samples", samples), ("temperature", temperature)):
        if theirs.get(key, ours) != ours:
            raise DataError(f"eval.compare_to: {path} sampled with {key} {theirs[key]}, this evaluation with {ours}: "
                            "compare evaluations with the same eval.k / eval.n and eval.temperature")


def read_baseline(folder: Path, questions: list[str], samples: int, temperature: float) -> list[dict]:
    """The baseline's outcomes, refused unless it scored these problems with this sampling (before generating)."""
    theirs = read_records(folder)
    check_same_problems(folder, theirs, questions)
    check_same_sampling(folder, samples, temperature)
    return theirs


def paired_gains(theirs: list[dict], records: list[dict]) -> dict:
    """{metric: {value, ci95, baseline, this}} for pass@1 and, where both sides sampled, sampled_pass@1."""
    ours = [outcome(r) for r in records]
    result = {}
    for metric, key in (("pass@1", "pass@1"), ("sampled_pass@1", "sampled")):
        if any(r[key] is None for r in theirs + ours):
            continue
        base, this = [r[key] for r in theirs], [r[key] for r in ours]
        estimate = gain(base, this)
        result[metric] = {**estimate.as_dict(), "baseline": sum(base) / len(base), "this": sum(this) / len(this)}
    return result


def paired_interval(ci95: list[float]) -> str:
    """'paired 95 % interval -3.0 to +5.0' (points) for a gain's interval in shares."""
    low, high = ci95
    return f"paired 95 % interval {100 * low:+.1f} to {100 * high:+.1f}"


def describe(compared: dict) -> list[str]:
    """Lines for `summary["compared_to"]`: {folder, metric: gain}."""
    lines = []
    for metric, g in compared.items():
        if metric == "folder":
            continue
        lines.append(f"{metric}: {100 * g['this']:.1f} % vs {100 * g['baseline']:.1f} % in {compared['folder']}: "
                     f"{100 * g['value']:+.1f} points ({paired_interval(g['ci95'])})")
    return lines
