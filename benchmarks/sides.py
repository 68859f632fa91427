"""Run each side of a comparison benchmark in its own child process (own memory peak, own imports)."""

from __future__ import annotations

import json
import subprocess
import sys


def report(result) -> None:
    """Called in the child: hand the side's result (JSON-able) to the parent."""
    print("RESULT " + json.dumps(result))


def run_sides(script: str, sides: tuple[str, ...]) -> dict:
    """Run `script <this process's args> --side S` for each side; return {side: its reported result}."""
    results = {}
    for side in sides:
        proc = subprocess.run([sys.executable, script, *sys.argv[1:], "--side", side], capture_output=True, text=True)
        line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
        if proc.returncode or not line:
            sys.exit(f"{side} failed:\n{proc.stderr[-4000:]}")
        results[side] = json.loads(line[0][len("RESULT "):])
    return results
