"""The grading child process: reads one JSON request a line on stdin, writes one JSON result a line.

Started by `rank1.rewards.guard.GuardedGrader` as `python -m rank1.rewards.child SPEC_JSON`. It runs
model text through math-verify and user reward functions under resource limits, so that whatever an
answer does (a power tower, a 10^100-term sum, a 1 MB string) costs at most this process:

- RLIMIT_AS caps its memory (allocations beyond it raise MemoryError);
- RLIMIT_CPU is re-armed before every request to `cpu_s` seconds beyond the CPU time used so far, so a
  runaway answer is killed by SIGXCPU even if the parent is gone and cannot kill it;
- the parent kills it after `timeout_s` wall-clock seconds (the main guard; see guard.py);
- it exits when stdin closes, i.e. when the parent goes away.

Request: {"gold": str, "completion": str}. Reply: a RewardResult as a dict. The first line written is
{"ready": true} once imports are done, or {"ready": false, "error": ...} if a reward function cannot be
loaded. Replies go to a private copy of stdout; fd 1 is pointed at stderr so that prints from user
functions or libraries cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
from dataclasses import asdict
from typing import Callable

from rank1.rewards.grading import math_reward
from rank1.rewards.registry import RewardFunctionError, call, resolve
from rank1.rewards.result import RewardResult


def _limit(kind: int, soft: int) -> None:
    _, hard = resource.getrlimit(kind)
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(kind, (soft, hard))


def _cpu_seconds_used() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    protocol = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)
    sys.stdout = sys.stderr

    def reply(obj: dict) -> None:
        protocol.write(json.dumps(obj) + "\n")  # ensure_ascii: lone surrogates survive as \udxxx
        protocol.flush()

    _limit(resource.RLIMIT_CORE, 0)  # a SIGXCPU kill must not leave core files behind
    _limit(resource.RLIMIT_AS, int(spec["memory_mb"]) * 1024 * 1024)

    try:
        functions = {name: resolve(name) for name in spec["functions"]}
    except RewardFunctionError as e:
        reply({"ready": False, "error": str(e)})
        return 1
    # Warm up before saying ready: the first parse compiles math-verify's large regexes, which on a
    # busy machine can take longer than a whole answer's timeout.
    math_reward(r"so $x = \boxed{\frac{1}{2}}$", "0.5")
    reply({"ready": True})

    for line in sys.stdin:
        request = json.loads(line)
        _limit(resource.RLIMIT_CPU, math.ceil(_cpu_seconds_used() + spec["cpu_s"]))
        result = grade(functions, request["gold"], request["completion"], spec["gold_format"])
        reply(asdict(result))
    return 0


def grade(functions: dict[str, Callable], gold: str, completion: str, gold_format: str) -> RewardResult:
    """Run every reward function on one pair; a failing function scores 0 and is named in the result."""
    result = RewardResult(reward=0.0)
    for name, fn in functions.items():
        try:
            grade_ = call(name, fn, completion, gold, gold_format)
        except Exception as e:  # MemoryError included: RLIMIT_AS makes a huge allocation fail here
            result.status, result.function, result.message = "error", name, _error_message(name, e)
            result.components[name] = 0.0
            continue
        result.components[name] = grade_.reward
        result.extracted = result.extracted or grade_.extracted
    result.reward = float(sum(result.components.values()))
    return result


def _error_message(name: str, e: Exception) -> str:
    if isinstance(e, RewardFunctionError):
        return str(e)  # already names the user's function
    if isinstance(e, MemoryError):
        return f"reward function {name!r} ran out of memory (rewards.memory_mb)"
    # GoldError (the data's fault), or a built-in failing on odd input: score 0, say why, keep serving.
    return f"reward function {name!r}: {type(e).__name__}: {str(e)[:200]}"


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
