"""Hostile answers score 0 within the timeout, execute nothing, and leave the grader working."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rank1.core.config import RewardsConfig
from rank1.rewards.guard import GuardedGrader

GOLD = r"\frac{355}{113}"  # appears in none of the answers below
TIMEOUT_S = 2.0
SLACK_S = 4.0  # kill + pipe + a loaded shared machine; a stall would take far longer
HERE = Path(__file__).resolve().parent
PWNED = "/tmp/rank1_rewards_pwned"  # must never be created


def nested_fraction(depth: int) -> str:
    return r"\frac{1}{" * depth + "2" + "}" * depth


HOSTILE = {
    "power tower": r"\boxed{9^{9^{9^{9^{9}}}}}",
    "power tower, plain text": "The answer is 9^9^9^9^9",
    "tower of tens": r"\boxed{10^{10^{10^{10^{10}}}}}",
    "fractions nested 300 deep": f"\\boxed{{{nested_fraction(300)}}}",
    "1 MB of letters": "a" * 1_000_000,
    "1 MB sum": r"\boxed{" + "1+" * 500_000 + "1}",
    "python injection": f"__import__('os').system('touch {PWNED}')",
    "eval in a box": f"\\boxed{{eval(\"__import__('os').system('touch {PWNED}')\")}}",
    "exec in math": f"$exec('import os; os.system(\"touch {PWNED}\")')$",
    "unterminated box": r"so the answer is \boxed{\frac{1}{",
    "control characters": "\x00\x01\x02\x1b[31m\x07 \\boxed{\x00\x08} \x7f",
    "lone surrogates": "\ud800 answer \udfff \\boxed{\ud83d}",
    "unbalanced parentheses": r"\boxed{((((((((((((1+2)}" + "(" * 5000,
    "huge sum": r"\boxed{\sum_{i=1}^{10^{100}} i^{i}}",
    "huge integral": r"\boxed{\int_{0}^{10^{100}} x^{x^{x}} \, dx}",
    "factorial of a googol": r"\boxed{(10^{100})!}",
    "factorial tower": r"\boxed{((100000!)!)!}",
    "ten thousand braces": r"\boxed{" + "{" * 10_000 + "}" * 10_000 + "}",
    "a hundred thousand boxes": r"\boxed{x}" * 100_000,
    "dollar flood": "$" * 200_000,
    "deep parentheses, plain text": "answer: " + "(" * 2000 + "1" + ")" * 2000,
    "empty": "",
}


@pytest.fixture(scope="module")
def hostile_grader():
    with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=TIMEOUT_S)) as g:
        yield g


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_answer_scores_0_within_timeout(hostile_grader, name):
    hostile_grader.wait_ready()  # time this answer only, not the restart after the previous one
    started = time.monotonic()
    result = hostile_grader.grade(GOLD, HOSTILE[name])
    elapsed = time.monotonic() - started
    assert result.reward == 0.0, result
    assert result.status in ("ok", "timeout", "error")
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: took {elapsed:.1f}s"


def test_nothing_was_executed_and_the_grader_still_works(hostile_grader):
    assert not os.path.exists(PWNED)
    assert hostile_grader.grade(GOLD, r"so $x = \boxed{\frac{355}{113}}$").reward == 1.0


def test_power_tower_is_cut_off_by_the_timeout(hostile_grader):
    hostile_grader.wait_ready()
    restarts = hostile_grader.restarts
    result = hostile_grader.grade(GOLD, HOSTILE["power tower"])
    assert (result.reward, result.status) == (0.0, "timeout")
    assert "rewards.timeout_s=2.0" in result.message
    assert hostile_grader.restarts == restarts + 1


@pytest.mark.parametrize("gold, completion", [(None, "x"), (GOLD, None), (GOLD, 42), (["1"], "1")])
def test_missing_or_non_string_fields_score_0_with_an_error(hostile_grader, gold, completion):
    result = hostile_grader.grade(gold, completion)
    assert (result.reward, result.status) == (0.0, "error")
    assert "must be strings" in result.message


def test_memory_limit_turns_a_huge_allocation_into_a_0():
    with GuardedGrader(RewardsConfig(functions=["user_rewards:allocates_a_gigabyte"], memory_mb=400)) as g:
        result = g.grade("1", "x")
    assert (result.reward, result.status) == (0.0, "error")
    assert "raised MemoryError" in result.message


def test_cpu_limit_kills_a_runaway_child_even_without_its_parent():
    """The backstop for a parent that died: the child alone enforces RLIMIT_CPU (cpu_s) and exits."""
    spec = {"functions": ["user_rewards:spins"], "gold_format": "auto", "memory_mb": 1024, "cpu_s": 1.0}
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(HERE.parents[1]), str(HERE)]))
    child = subprocess.Popen([sys.executable, "-m", "rank1.rewards.child", json.dumps(spec)],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
    try:
        assert json.loads(child.stdout.readline()) == {"ready": True}
        child.stdin.write(b'{"gold": "1", "completion": "x"}\n')
        child.stdin.flush()
        assert child.wait(timeout=30) == -signal.SIGXCPU
    finally:
        child.kill()
        child.wait()


def test_a_crashing_grading_process_is_reported_and_replaced():
    with GuardedGrader(RewardsConfig(functions=["user_rewards:segfaults"])) as g:
        result = g.grade("1", "x")
        assert (result.reward, result.status) == (0.0, "error")
        assert f"died (signal {signal.SIGSEGV.value})" in result.message
        assert g.restarts == 1
    with GuardedGrader(RewardsConfig(functions=["math"])) as g:
        g.wait_ready()
        os.kill(g.child_pid, signal.SIGKILL)  # killed while idle: the next answer restarts it
        time.sleep(0.5)
        assert g.grade("1", r"\boxed{1}").reward == 1.0
