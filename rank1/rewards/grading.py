"""The built-in reward functions: `math` (math-verify equivalence) and `format` (one final answer).

These functions are plain and unguarded: a pathological answer can make sympy run for minutes or
allocate gigabytes. They are meant to run inside the grading child process (`rank1.rewards.child`),
which the parent kills after `timeout_s` (`rank1.rewards.guard`). Because of that, math-verify's own
signal.alarm timeouts are switched off here (`parsing_timeout=None`, `timeout_seconds=None`): they only
work on a process's main thread and raise or silently do nothing inside Ray actors and threads.

Model text is never executed. math-verify parses LaTeX with latex2sympy (an ANTLR grammar, no eval);
its plain-expression path calls sympy's `parse_expr` (which does eval) only on text matched by a regex
of digits, spaces and the operators + - * / ^ ( ) × ÷, so no names or calls can reach it.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from functools import lru_cache

from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

from rank1.rewards.result import GOLD_FORMATS

# Timeouts are the parent's job (see module docstring); silence the "timeout is disabled" warning.
logging.getLogger("math_verify").setLevel(logging.ERROR)

MAX_EXTRACTED_CHARS = 500  # the extracted answer is for logs and JSONL output, not for grading

# Golds are clean LaTeX; completions put the answer in \boxed{} first, then anything that looks like math.
GOLD_EXTRACTION = (LatexExtractionConfig(), ExprExtractionConfig())
ANSWER_EXTRACTION = (LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig())

THOUSANDS_COMMA = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")  # 1,234,567 -> 1234567; (1,2) untouched
FINAL_HASHES = re.compile(r"^[ \t]*####[ \t]*(\S[^\n]*)$", re.MULTILINE)  # a GSM8K-style '#### 18' line
UNESCAPED_DOLLAR = re.compile(r"(?<!\\)\$")
# math-verify's plain-expression regex admits × and ÷, but sympy's parse_expr cannot read them: the
# expression was dropped and the last number taken instead ("#### 5 × 4" scored 1 against a gold of 4).
UNICODE_OPERATORS = str.maketrans({"×": "*", "÷": "/"})


@dataclass
class Grade:
    reward: float
    extracted: str = ""


def gold_to_math(gold: str, gold_format: str = "auto") -> str:
    """The text to hand math-verify for a gold answer.

    GSM8K golds are the number after the last '#### ' (commas between thousands removed). LaTeX
    golds such as `\\left( 3, \\frac{\\pi}{2} \\right)` are wrapped in `$...$`: bare, math-verify
    would read only the first number (3) and score every equivalent answer 0.
    """
    if gold_format not in GOLD_FORMATS:
        raise ValueError(f"gold format {gold_format!r} is not one of {', '.join(GOLD_FORMATS)}")
    if is_numeric_gold(gold, gold_format):
        number = gold.rsplit("####", 1)[-1].strip()
        return f"${THOUSANDS_COMMA.sub('', number)}$"
    gold = gold.strip()
    if UNESCAPED_DOLLAR.search(gold) or "\\boxed" in gold or "\\(" in gold or "\\[" in gold:
        return gold  # already delimited math
    return f"${gold}$"


def answer_region(completion: str) -> str:
    """The part of a completion to extract the answer from: the last complete \\boxed{...}, else the text
    after the last '#### ' line, else all of it (math-verify then takes the last math it can parse).

    Only the last box is kept: given several, math-verify would read them together as a set."""
    boxed, _ = _boxed_spans(completion)
    if boxed:
        return f"\\boxed{{{boxed[-1]}}}"
    lines = FINAL_HASHES.findall(completion)
    if lines:
        return THOUSANDS_COMMA.sub("", lines[-1])
    return completion


@lru_cache(maxsize=1024)  # GRPO grades every gold once per sample of its group
def _parse_gold(gold: str, gold_format: str) -> list:
    return parse(gold_to_math(gold, gold_format), GOLD_EXTRACTION, parsing_timeout=None)


def _extracted_text(parsed: list) -> str:
    # parse() returns [sympy value, matched string]; prefer the string the model actually wrote.
    text = next((p for p in parsed if isinstance(p, str)), None)
    if text is None:
        text = str(parsed[0]) if parsed else ""
    return text if len(text) <= MAX_EXTRACTED_CHARS else text[:MAX_EXTRACTED_CHARS] + "…"


class GoldError(ValueError):
    """The gold answer itself cannot be parsed: a data problem, reported as status 'error'."""


def is_numeric_gold(gold: str, gold_format: str) -> bool:
    return gold_format == "gsm8k" or (gold_format == "auto" and "####" in gold)


def math_reward(completion: str, gold: str, gold_format: str = "auto") -> Grade:
    """1.0 when the completion's final answer is mathematically equivalent to the gold, else 0.0.

    A numeric (GSM8K) gold needs a number: math-verify keeps plain-text arithmetic unevaluated and
    judges `12 + 7 * 3` equal to 33, so restating the question's expression would score as solving
    it (a GRPO policy found exactly that on the embedded arithmetic task).
    """
    gold_parsed = _parse_gold(gold, gold_format)
    if not gold_parsed:
        raise GoldError(f"gold answer {gold[:80]!r} could not be parsed as math")
    answer = parse(answer_region(completion).translate(UNICODE_OPERATORS), ANSWER_EXTRACTION, parsing_timeout=None)
    if not answer:
        return Grade(0.0, "")
    if is_numeric_gold(gold, gold_format) and not getattr(answer[0], "is_Number", False):
        return Grade(0.0, _extracted_text(answer))
    correct = verify(gold_parsed, answer, timeout_seconds=None)
    return Grade(1.0 if correct else 0.0, _extracted_text(answer))


def _boxed_spans(text: str) -> tuple[list[str], int]:
    """Contents of every complete \\boxed{...} (balanced braces), and how many are left unterminated."""
    complete, unterminated, start = [], 0, 0
    while (i := text.find("\\boxed{", start)) != -1:
        depth, j = 1, i + len("\\boxed{")
        while j < len(text) and depth:
            depth += {"{": 1, "}": -1}.get(text[j], 0)
            j += 1
        if depth:
            unterminated += 1
            break
        complete.append(text[i + len("\\boxed{") : j - 1])
        start = j
    return complete, unterminated


def format_reward(completion: str, gold: str = "", gold_format: str = "auto") -> Grade:
    """1.0 when the completion states exactly one final answer, as one \\boxed{...} or one '#### n'."""
    boxed, unterminated = _boxed_spans(completion)
    hashes = FINAL_HASHES.findall(completion)
    answers = [b for b in boxed if b.strip()] + hashes
    ok = len(answers) == 1 and unterminated == 0 and len(boxed) + len(hashes) == 1
    return Grade(1.0 if ok else 0.0, answers[0].strip()[:MAX_EXTRACTED_CHARS] if answers else "")
