"""`rank1 grade IN.jsonl --out OUT.jsonl [--workers N] [--timeout S]`: grade rows {gold, completion} with the reward pool.

Each row is written back with `reward` (0 or 1), `extracted` (the answer found) and `status`
(ok | timeout | error; rows that are not ok also get `message`). The whole input is checked before
any grading, and the output appears only when complete (written to a temporary file, then renamed).

Exit codes: 0 all rows graded, 2 bad flags or input (the message names the file and line), 1 grading failed.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rank1.core.commands import GRADE, command_main


class InputError(ValueError):
    """A row of the input file cannot be graded; the message names file and line."""


def read_rows(path: Path) -> list[dict]:
    from rank1.core.data import read_jsonl

    rows = []
    for number, row in read_jsonl(path, InputError):
        where = f"{path}:{number}"
        if "gold" not in row:
            raise InputError(f"{where}: missing field 'gold'")
        if "completion" not in row:
            raise InputError(f"{where}: missing field 'completion'")
        gold = row["gold"]
        if isinstance(gold, bool) or not isinstance(gold, (str, int, float)):
            raise InputError(f"{where}: 'gold' must be a string or number, got {type(gold).__name__}")
        if not isinstance(row["completion"], str):
            raise InputError(f"{where}: 'completion' must be a string, got {type(row['completion']).__name__}")
        rows.append(row)
    if not rows:
        raise InputError(f"{path}: no rows to grade")
    return rows


def write_atomically(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")  # ensure_ascii keeps lone surrogates writable
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def grade(cfg) -> int:
    rows = read_rows(Path(cfg.grade.input))

    from tqdm import tqdm

    from rank1.rewards.pool import RewardPool  # imports Ray: only once the input is known to be good

    cfg.rewards.functions = ["math"]  # `rank1 grade` scores correctness alone, whatever training rewarded
    pairs = [(str(row["gold"]), row["completion"]) for row in rows]
    try:
        with RewardPool(cfg.rewards) as pool, tqdm(total=len(pairs), desc="grading", unit="row", file=sys.stderr) as bar:
            started = time.monotonic()  # grading time, without Ray's start-up
            results = pool.score(pairs, progress=bar.update)
    except Exception as e:
        print(f"rank1 grade: error: grading failed: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    elapsed = time.monotonic() - started

    for row, result in zip(rows, results):
        row.update(reward=result.reward, extracted=result.extracted, status=result.status)
        if result.message:
            row["message"] = result.message
    out = Path(cfg.grade.out)
    write_atomically(out, rows)

    counts = {s: sum(r.status == s for r in results) for s in ("ok", "timeout", "error")}
    correct = sum(r.reward for r in results)
    print(f"graded {len(rows)} rows: {correct:.0f} correct ({100 * correct / len(rows):.1f}%), "
          f"{counts['timeout']} timeout, {counts['error']} error in {elapsed:.1f}s -> {out}")
    return 0


def main(argv: list[str]) -> int:
    return command_main(GRADE, argv, grade, errors=(InputError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
