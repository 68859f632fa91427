"""The built-in `steps` reward: partial credit for the reference solution's intermediate results.

A final-answer reward says nothing about a two-step solution whose first step is right and second is
wrong, and pays a lucky answer after a wrong first step. On the embedded arithmetic task that is the
commonest failure of the SFT adapter (first step right, second wrong: 629 of 1,800 completions on
arithmetic-val, against 327 fully right). `steps` is the share of the gold's intermediate results
that the completion reaches by an equation that holds: `26 * 5 = 130` earns its share of
"26 * 5 = 130 / 130 - 13 = 117"; `26 * 5 = 150` does not, nor does `150 - 13 = 117`.

The gold's steps are its `a op b = c` lines (the embedded data) or GSM8K's `<<a*b=c>>` calculator
notes. A gold without steps (LaTeX answers) scores 0 for every completion, so it adds no signal and
no noise. Padding cannot earn credit: only results the gold reaches count, each once.

Model text is never executed: left-hand sides are parsed with `ast` and evaluated over a whitelist of
number literals and + - * / (no powers, no names), with exact fractions and a cap on digits.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

from rank1.rewards.grading import THOUSANDS_COMMA, Grade

MAX_DIGITS = 30  # a literal or a result longer than this is not arithmetic a solution step needs
# An equation: a run of numbers, operators and brackets on one line, '=', then a number.
EQUATION = re.compile(r"(?P<lhs>[0-9.()+\-*/×÷ \t]*[0-9)][ \t]*)=[ \t]*(?P<rhs>-?\d+(?:\.\d+)?)(?![\d.])")
OPERATORS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b}


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
            return None if right == 0 else left / right
        op = OPERATORS.get(type(node.op))
        result = None if op is None else op(left, right)
        too_long = result is not None and len(str(abs(result.numerator))) > MAX_DIGITS
        return None if too_long else result
    return None


def evaluate(expression: str) -> Fraction | None:
    """The value of `12 * (3 + 4)`-style text, or None when it is not plain arithmetic with an operator."""
    text = expression.translate(str.maketrans({"×": "*", "÷": "/"})).strip()
    if not any(op in text.lstrip("-") for op in "+-*/") or re.search(r"\d{%d,}" % (MAX_DIGITS + 1), text):
        return None  # a bare number restates, it does not compute
    try:  # deep nesting or a very long chain: the parser or _value runs out of stack
        return _value(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def reached_results(text: str) -> set[Fraction]:
    """The right-hand sides of the equations in `text` that hold."""
    text = THOUSANDS_COMMA.sub("", text.replace("<<", "\n").replace(">>", "\n"))
    reached = set()
    for match in EQUATION.finditer(text):
        rhs = Fraction(match["rhs"])
        if evaluate(match["lhs"]) == rhs:
            reached.add(rhs)
    return reached


def steps_reward(completion: str, gold: str, gold_format: str = "auto") -> Grade:
    """The share of the gold's step results that the completion reaches by a correct equation."""
    wanted = reached_results(gold)
    if not wanted:
        return Grade(0.0, "")
    got = wanted & reached_results(completion)
    return Grade(len(got) / len(wanted), f"{len(got)}/{len(wanted)} steps")
