"""Hostile answers score 0 within the timeout, execute nothing, and leave the grader working.

Every test here holds alone and in any order: each one waits for a ready grading child before it times
anything, and each code-execution payload writes to a sentinel file of its own test's tmp_path.
"""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from math_verify import ExprExtractionConfig
from math_verify.parser import lazy_expr_regex

from rank1.core.config import RewardsConfig
from rank1.rewards.guard import GuardedGrader

GOLD = r"\frac{355}{113}"  # appears in none of the answers below
TIMEOUT_S = 2.0
SLACK_S = 4.0  # kill + pipe + a loaded shared machine; a stall would take far longer
TIMED_OUT = f"grading took longer than rewards.timeout_s={TIMEOUT_S}s; killed"
HERE = Path(__file__).resolve().parent


def nested_fraction(depth: int) -> str:
    return r"\frac{1}{" * depth + "2" + "}" * depth


# name -> (completion, the status it must get). Every one must score 0.
#
# "timeout": none of these finished within 40 s on the 2-core development machine (timeout_s=40), 20x
# the 2 s limit here, and none came near the 2 GB address-space limit (rewards.memory_mb) that would
# turn them into a MemoryError instead (peak RSS <= 0.5 GB after 15 s; the power towers stay at 0.1 GB:
# they are CPU-bound). So the wall-clock kill comes first on any machine this runs on.
# "ok": math-verify reads these to something that is not 355/113 (or to nothing) in <= 0.2 s, 10x
# inside the limit, and their status does not depend on the machine either.
HOSTILE = {
    "power tower": (r"\boxed{9^{9^{9^{9^{9}}}}}", "timeout"),
    "power tower, plain text": ("The answer is 9^9^9^9^9", "timeout"),
    "tower of tens": (r"\boxed{10^{10^{10^{10^{10}}}}}", "timeout"),
    # Unevaluated 1/(1/(...)): math-verify's simplification is exponential in the depth (1.4 s at 15,
    # 61 s at 20 on the development machine).
    "fractions nested 25 deep": (f"\\boxed{{{nested_fraction(25)}}}", "timeout"),
    "1 MB of letters": ("a" * 1_000_000, "ok"),
    "1 MB sum": (r"\boxed{" + "1+" * 500_000 + "1}", "timeout"),
    "unterminated box": (r"so the answer is \boxed{\frac{1}{", "ok"),
    "control characters": ("\x00\x01\x02\x1b[31m\x07 \\boxed{\x00\x08} \x7f", "ok"),
    "lone surrogates": ("\ud800 answer \udfff \\boxed{\ud83d}", "ok"),
    "unbalanced parentheses": (r"\boxed{((((((((((((1+2)}" + "(" * 5000, "ok"),
    "huge sum": (r"\boxed{\sum_{i=1}^{10^{100}} i^{i}}", "timeout"),
    "huge integral": (r"\boxed{\int_{0}^{10^{100}} x^{x^{x}} \, dx}", "timeout"),
    "factorial of a googol": (r"\boxed{(10^{100})!}", "timeout"),
    "factorial tower": (r"\boxed{((100000!)!)!}", "timeout"),
    "ten thousand braces": (r"\boxed{" + "{" * 10_000 + "}" * 10_000 + "}", "timeout"),
    "a hundred thousand boxes": (r"\boxed{x}" * 100_000, "ok"),
    "dollar flood": ("$" * 200_000, "ok"),
    "deep parentheses, plain text": ("answer: " + "(" * 2000 + "1" + ")" * 2000, "ok"),
    "TeX input command": (r"\boxed{\input{/etc/passwd}}", "ok"),  # latex2sympy is a parser, not TeX: nothing is read
    "empty": ("", "ok"),
}


@pytest.fixture(scope="module")
def hostile_grader():
    with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=TIMEOUT_S)) as g:
        yield g


def grade_timed(grader: GuardedGrader, gold: str, completion: str):
    grader.wait_ready()  # time this answer only, not a restart after an earlier one
    restarts = grader.restarts
    started = time.monotonic()
    result = grader.grade(gold, completion)
    return result, time.monotonic() - started, grader.restarts - restarts


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_answer_scores_0_with_its_status_within_timeout(hostile_grader, name):
    completion, status = HOSTILE[name]
    result, elapsed, restarts = grade_timed(hostile_grader, GOLD, completion)
    assert (result.reward, result.status) == (0.0, status), result
    assert elapsed < TIMEOUT_S + SLACK_S, f"{name}: took {elapsed:.1f}s"
    if status == "timeout":
        assert result.message == TIMED_OUT
        assert elapsed >= TIMEOUT_S  # killed at the deadline, not before
        assert restarts == 1 and result.components == {"math": 0.0}
    else:
        assert result.message == "" and result.function is None
        assert restarts == 0 and result.components == {"math": 0.0}


@pytest.mark.slow
def test_deeply_nested_fractions_are_read_without_crashing_the_grader():
    """300 and 1000 levels overflow latex2sympy's recursion; math-verify recovers and the answer scores 0.

    Not in HOSTILE: a fresh child's ANTLR parser spends about 7 ms per level on the first deep parse
    (1.5-2.3 s for 300 levels, 4-8 s for 1000 on the development machine), so under the 2 s timeout the
    status would depend on the machine's load. With room to finish, it is exactly 'ok'."""
    with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=60.0)) as g:
        for depth in (300, 1000):
            result, elapsed, restarts = grade_timed(g, GOLD, f"\\boxed{{{nested_fraction(depth)}}}")
            assert (result.reward, result.status, result.message, restarts) == (0.0, "ok", "", 0), (depth, result)
            assert result.extracted.startswith(r"\frac{1}{\frac{1}{")
            assert elapsed < 60.0
        assert g.grade(GOLD, r"so $x = \boxed{\frac{355}{113}}$").reward == 1.0


def test_power_tower_is_cut_off_by_the_timeout_and_the_grader_still_works(hostile_grader):
    result, _, restarts = grade_timed(hostile_grader, GOLD, HOSTILE["power tower"][0])
    assert (result.reward, result.status, result.message) == (0.0, "timeout", TIMED_OUT)
    assert "rewards.timeout_s=2.0" in result.message
    assert restarts == 1
    # The replacement child grades the next answer normally.
    result, _, restarts = grade_timed(hostile_grader, GOLD, r"so $x = \boxed{\frac{355}{113}}$")
    assert (result.reward, result.status, restarts) == (1.0, "ok", 0)


# ---------------------------------------------------------------- model text is never executed
#
# Python payloads: each creates the file at PATH when evaluated. The test proves that first by eval-ing
# the payload itself (against another path of its own tmp_path), then grades it and checks that its
# sentinel does not exist. The sentinel is created inside the test, so no other test can create it or
# remove it, and the check does not depend on which tests ran before.
CODE = {
    "os.system": "__import__('os').system('touch PATH')",
    "lambda": "(lambda: open('PATH', 'w').close())()",
    "exec": "exec(\"open('PATH', 'w').close()\")",
    "eval": "eval(\"__import__('os').system('touch PATH')\")",
    # No names needed from a builtin: walk from () to os._wrap_close and take os.system from its globals.
    "class walk": "[c for c in ().__class__.__base__.__subclasses__() if c.__name__ == '_wrap_close'][0]"
                  ".__init__.__globals__['system']('touch PATH')",
    # Starts like arithmetic, so math-verify's expression regex does match its beginning.
    "arithmetic first": "1 + __import__('os').system('touch PATH')",
    # A payload for sympy's own eval, in case anything handed the text to parse_expr.
    "sympy parse_expr": "__import__('sympy').parse_expr(\"__import__('os').system('touch PATH')\")",
}
# Where an answer can sit: each reaches a different path of math_reward and math-verify (the last box;
# the text after '#### '; LaTeX in $...$; math-verify's "final answer is" and "answer:" expression
# regexes; and everything, when nothing else matches).
CONTEXTS = {
    "bare": "CODE",
    "boxed": "so \\boxed{CODE}",
    "after hashes": "The work.\n#### CODE",
    "inline math": "so $CODE$",
    "final answer is": "The final answer is CODE",
    "answer colon": "answer: 2 * 3 = CODE",
}


@pytest.mark.parametrize("context", list(CONTEXTS))
@pytest.mark.parametrize("payload", list(CODE))
def test_code_in_an_answer_is_never_executed(hostile_grader, tmp_path, payload, context):
    demo, sentinel = tmp_path / "demo", tmp_path / "sentinel"
    code = CODE[payload]
    eval(code.replace("PATH", str(demo)))  # live: run here, in this process, it writes
    assert demo.exists(), f"payload {payload!r} does not create its file, so its sentinel proves nothing"

    completion = CONTEXTS[context].replace("CODE", code.replace("PATH", str(sentinel)))
    result, elapsed, restarts = grade_timed(hostile_grader, GOLD, completion)
    assert not sentinel.exists(), f"grading executed {payload!r} {context}"
    assert (result.reward, result.status, result.message, restarts) == (0.0, "ok", "", 0), result
    assert elapsed < TIMEOUT_S


def test_tex_shell_escape_is_not_run(hostile_grader, tmp_path):
    """\\write18 runs a shell command in TeX with shell escape on; latex2sympy only parses the text."""
    demo, sentinel = tmp_path / "demo", tmp_path / "sentinel"
    subprocess.run(["sh", "-c", f"touch {demo}"], check=True)  # the command itself is live
    assert demo.exists()
    for completion in (f"$\\immediate\\write18{{touch {sentinel}}}$", f"\\boxed{{\\write18{{touch {sentinel}}}}}"):
        result, _, _ = grade_timed(hostile_grader, GOLD, completion)
        assert (result.reward, result.status, result.message) == (0.0, "ok", ""), result
        assert not sentinel.exists()


# ---------------------------------------------------------------- the regex gate in front of parse_expr
#
# rank1/rewards/grading.py relies on this: math-verify hands plain text to sympy's parse_expr (an eval)
# only as the `expr` group of its expression regexes (math-verify 0.9.0, math_verify/parser.py:188-194 in
# lazy_expr_regex; the call is extract_expr -> parse_expr_cached, parser.py:443 and 407), which admits
# digits, '.', whitespace and + - * / ^ ( ) × ÷ only. With no letters, underscores, quotes,
# brackets or braces, no name, call of a name, attribute or string can reach eval. This checks the
# installed math-verify's own regexes, so an upgrade that widened them would fail here.
GATE = re.compile(r"[\d.\s+\-*×/^()÷]+")
# Fuzz: mostly arithmetic, so that the expression regexes do match, mixed with what eval would need.
MATH_TOKENS = ["1", "23", "4.5", ".7", "1,234", " ", "\n", "+", "-", "*", "**", "/", "^", "(", ")", "×", "÷", " = ",
               "١", "５"]  # Unicode digits: `\d` matches them too
CODE_TOKENS = ["answer: ", "The final answer is ", "I hope", "=", "\t", "%", "__import__", "('os')", "os", ".",
               "system", "'", '"', "[", "]", "{", "}", "lambda", ":", ",", "_", "x", "e", "E", "j", "exec", "eval",
               "!", "~", "@", "<", ">", "&", "|", "#", ";", "\\", "$"]


def expr_captures(text: str) -> list[str]:
    """Every `expr` group math-verify's expression regexes capture in text (some have no such group)."""
    return [m["expr"] for pattern, _ in lazy_expr_regex(ExprExtractionConfig())
            for m in pattern.finditer(text) if m.groupdict().get("expr") is not None]


def test_math_verify_hands_parse_expr_only_digits_and_operators():
    assert expr_captures("so\n3*4") == ["3*4"]  # the gate is not vacuous: arithmetic gets through
    payloads = [CONTEXTS[c].replace("CODE", CODE[p].replace("PATH", "/tmp/x1")) for c in CONTEXTS for p in CODE]
    rng = random.Random(0)
    fuzz = ["".join(rng.choice(MATH_TOKENS) if rng.random() < 0.7 else rng.choice(CODE_TOKENS)
                    for _ in range(rng.randint(1, 30))) for _ in range(20_000)]
    captured = [e for text in payloads + fuzz for e in expr_captures(text)]
    assert len(captured) > 1000  # many strings did reach the expression group...
    outside = [e for e in captured if not GATE.fullmatch(e)]
    assert outside == []  # ...and none of them held anything but digits, spaces and operators


# ---------------------------------------------------------------- malformed requests, resource limits


@pytest.mark.parametrize("gold, completion", [(None, "x"), (GOLD, None), (GOLD, 42), (["1"], "1")])
def test_missing_or_non_string_fields_score_0_with_an_error(hostile_grader, gold, completion):
    result = hostile_grader.grade(gold, completion)
    assert (result.reward, result.status) == (0.0, "error")
    assert "must be strings" in result.message


def test_memory_limit_turns_a_huge_allocation_into_a_0():
    # bytearray(1 GiB) under a 400 MB address-space limit fails at once on any machine: exactly 'error'.
    with GuardedGrader(RewardsConfig(functions=["user_rewards:allocates_a_gigabyte"], memory_mb=400)) as g:
        result = g.grade("1", "x")
    assert (result.reward, result.status, result.function) == (0.0, "error", "user_rewards:allocates_a_gigabyte")
    assert "'user_rewards:allocates_a_gigabyte' raised MemoryError" in result.message


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
