"""The built-in `steps` reward: partial credit for the reference solution's intermediate results.

A final-answer reward says nothing about a two-step solution whose first step is right and second is
wrong, and pays a lucky answer after a wrong first step. On the embedded arithmetic task that is the
commonest failure of the SFT adapter (counted by hand in its `rank1 eval --k 8` problems.jsonl on
arithmetic-val: first step right and second wrong in 629 of 1,800 completions, both right in 303).
`steps` is the share of the gold's intermediate results that the completion reaches by an equation
that holds: `26 * 5 = 130` earns its share of
"26 * 5 = 130 / 130 - 13 = 117"; `26 * 5 = 150` does not, nor does `150 - 13 = 117`.

The gold's steps are its `a op b = c` lines (the embedded data) or GSM8K's `<<a*b=c>>` calculator
notes. A gold without steps (LaTeX answers) scores 0 for every completion, so it adds no signal and
no noise. Padding earns nothing: only results the gold reaches count, each once; only the first two
equations per gold step are read; and an equation that restates its result (`130 * 1 = 130`) is no step.

Model text is never executed: left-hand sides are parsed with `ast` and evaluated over a whitelist of
number literals and + - * / (no powers, no names), with exact fractions and a cap on digits; each
left side is read from a bounded window before its '=', so the scan stays linear in the text.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

from rank1.rewards.grading import THOUSANDS_COMMA, Grade

MAX_DIGITS = 30  # a literal, or a result's numerator or denominator, longer than this is no solution step
MAX_LEFT_SIDE = 120  # characters before an '=' read as its left side: keeps the scan linear in the text
EQUALS = re.compile(r"=[ \t]*(-?\d+(?:\.\d+)?)(?!\d|\.\d)")  # '= 130', also at a sentence's end ('= 130.')
LEFT_SIDE = re.compile(r"[0-9.()+\-*/×÷ \t]*$")  # numbers, operators and brackets up to the '='
LITERAL = re.compile(r"\d+(?:\.\d+)?")
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}
EQUATIONS_PER_STEP = 2  # only the first 2 x (the gold's steps) equations count: listing many earns nothing


def _too_long(value: Fraction) -> bool:
    return len(str(abs(value.numerator))) > MAX_DIGITS or len(str(value.denominator)) > MAX_DIGITS


def _value(node: ast.AST) -> Fraction | None:
    """The exact value of a whitelisted arithmetic tree, or None for anything else."""
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        inner = _value(node.operand)
        return None if inner is None else (-inner if isinstance(node.op, ast.USub) else inner)
    if isinstance(node, ast.BinOp):
        left, right = _value(node.left), _value(node.right)
        if left is None or right is None:
            return None
        if isinstance(node.op, ast.Div):
            result = None if right == 0 else left / right
        else:
            op = OPERATORS.get(type(node.op))
            result = None if op is None else op(left, right)
        return None if result is None or _too_long(result) else result
    return None


def evaluate(expression: str) -> Fraction | None:
    """The value of `12 * (3 + 4)`-style text, or None when it is not plain arithmetic with a binary operator."""
    text = expression.translate(str.maketrans({"×": "*", "÷": "/"})).strip()
    if not re.search(r"[\d)]\s*[-+*/]", text) or re.search(r"\d{%d,}" % (MAX_DIGITS + 1), text):
        return None  # a bare or signed number restates, it does not compute
    try:  # deep nesting or a very long chain: the parser or _value runs out of stack
        return _value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def left_side(text: str) -> tuple[Fraction, str] | None:
    """The arithmetic that ends `text` (the characters before an '='), and its value: the longest run of
    numbers and operators, else one of its 3 shorter tails (so '1. 26 * 5', a list item, reads as 26 * 5)."""
    tokens = LEFT_SIDE.search(text)[0].split()
    for i in range(min(len(tokens), 4)):
        expression = " ".join(tokens[i:])
        value = evaluate(expression)
        if value is not None:
            return value, expression
    return None


def reached_results(text: str, limit: int | None = None) -> set[Fraction]:
    """The right-hand sides of the first `limit` equations of `text` that hold. An equation whose left side
    holds its own result as a number (`130 * 1 = 130`, `130 + 0 = 130`) restates rather than computes."""
    text = THOUSANDS_COMMA.sub("", text.replace("<<", "\n").replace(">>", "\n"))
    reached, seen = set(), 0
    for match in EQUALS.finditer(text):
        found = left_side(text[max(0, match.start() - MAX_LEFT_SIDE) : match.start()])
        if found is None:
            continue
        seen += 1
        (value, expression), rhs = found, Fraction(match[1])
        restated = any(Fraction(n) == abs(rhs) for n in LITERAL.findall(expression))
        if value == rhs and not restated:
            reached.add(rhs)
        if limit is not None and seen >= limit:
            break
    return reached


def steps_reward(completion: str, gold: str, gold_format: str = "auto") -> Grade:
    """The share of the gold's step results that the completion reaches by a correct equation."""
    wanted = reached_results(gold)
    if not wanted:
        return Grade(0.0, "")
    got = wanted & reached_results(completion, limit=EQUATIONS_PER_STEP * len(wanted))
    return Grade(len(got) / len(wanted), f"{len(got)}/{len(wanted)} steps")
