"""`rank1 grade IN.jsonl --out OUT.jsonl`: grade rows {gold, completion} with the training reward pool.

Each row is written back with `reward` (0 or 1), `extracted` (the answer found) and `status`
(ok | timeout | error; rows that are not ok also get `message`). The whole input is checked before
any grading, and the output appears only when complete (written to a temporary file, then renamed).

Exit codes: 0 all rows graded, 2 bad flags or input (the message names the file and line), 1 grading failed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from rank1.config import RewardsConfig
from rank1.rewards.result import GOLD_FORMATS


class InputError(ValueError):
    """A row of the input file cannot be graded; the message names file and line."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rank1 grade", description="Grade {gold, completion} JSONL rows with math-verify.")
    p.add_argument("input", type=Path, help="JSONL file, one object a line with 'gold' and 'completion'")
    p.add_argument("--out", type=Path, required=True, help="where to write the graded rows (JSONL)")
    p.add_argument("--workers", type=int, default=1, help="reward actors (Ray), default 1")
    p.add_argument("--timeout", type=float, default=RewardsConfig.timeout_s, help="seconds per answer before it scores 0")
    p.add_argument("--gold-format", choices=GOLD_FORMATS, default="auto",
                   help="auto: '#### n' golds are GSM8K, everything else LaTeX")
    return p


def read_rows(path: Path) -> list[dict]:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{where}: expected a JSON object, got {type(row).__name__}")
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


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)  # bad flags: argparse prints usage and exits 2
    for flag, ok in (("--workers", args.workers >= 1), ("--timeout", args.timeout > 0)):
        if not ok:
            print(f"rank1 grade: error: {flag} must be positive", file=sys.stderr)
            return 2
    try:
        rows = read_rows(args.input)
    except InputError as e:
        print(f"rank1 grade: error: {e}", file=sys.stderr)
        return 2

    from tqdm import tqdm

    from rank1.rewards.pool import RewardPool  # imports Ray: only once the input is known to be good

    cfg = RewardsConfig(functions=["math"], num_workers=args.workers, timeout_s=args.timeout, gold_format=args.gold_format)
    pairs = [(str(row["gold"]), row["completion"]) for row in rows]
    try:
        with RewardPool(cfg) as pool, tqdm(total=len(pairs), desc="grading", unit="row", file=sys.stderr) as bar:
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
    write_atomically(args.out, rows)

    counts = {s: sum(r.status == s for r in results) for s in ("ok", "timeout", "error")}
    correct = sum(r.reward for r in results)
    print(f"graded {len(rows)} rows: {correct:.0f} correct ({100 * correct / len(rows):.1f}%), "
          f"{counts['timeout']} timeout, {counts['error']} error in {elapsed:.1f}s -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
