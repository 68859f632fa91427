"""The `steps` reward: partial credit for the gold's intermediate results, reached by equations that hold."""

import time

import pytest

from rank1.core.config import RewardsConfig
from rank1.core.data import arithmetic_rows
from rank1.rewards.guard import GuardedGrader
from rank1.rewards.steps import evaluate, steps_reward

GOLD = "26 * 5 = 130\n130 - 13 = 117\n#### 117"
GSM8K_GOLD = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nAltogether 48+24 = <<48+24=72>>72 clips.\n#### 72"


@pytest.mark.parametrize("completion, reward", [
    ("26 * 5 = 130\n130 - 13 = 117\n#### 117", 1.0),
    ("26 * 5 = 130\n130 - 13 = 119\n#### 119", 0.5),  # first step right, second wrong
    ("26 * 5 = 150\n150 - 13 = 117\n#### 117", 0.0),  # a lucky final answer after a false equation
    ("26 * 5 = 150\n150 - 13 = 137\n#### 137", 0.0),  # a true equation that is not a step of the gold
    ("#### 117", 0.0),  # the answer without the work
    ("130 = 130\n117 = 117", 0.0),  # restating a number computes nothing
    ("+130 = 130\n130 * 1 = 130\n0 + 117 = 117", 0.0),  # nor does a left side that holds its own result
    ("So 26 * 5 = 130. Then 130 - 13 = 117.", 1.0),  # sentences
    ("1. 26 * 5 = 130\n2. 130 - 13 = 117", 1.0),  # a numbered list
    ("26 * 5 = 130 - 13 = 117", 1.0),  # a chain
    ("26*5=130, 26 * 5 = 130, 5 * 26 = 130", 0.5),  # a step counts once however often it is written
    ("(26 * 5) - 13 = 117", 0.5),  # one equation reaching the final result
    ("26 × 5 = 130 and 130 − 13 = 117", 0.5),  # × is read; a Unicode minus is not an operator
    ("", 0.0),
])
def test_steps_are_the_share_of_gold_results_reached_by_true_equations(completion, reward):
    assert steps_reward(completion, GOLD).reward == reward


def test_gsm8k_calculator_notes_are_the_gold_steps():
    assert steps_reward("48 / 2 = 24 clips, then 48 + 24 = 72", GSM8K_GOLD).reward == 1.0
    assert steps_reward("48 / 2 = 24 clips, then 48 + 24 = 70", GSM8K_GOLD).reward == 0.5
    assert steps_reward("1,000 + 234 = 1,234", "<<1000+234=1234>>\n#### 1,234").reward == 1.0


def test_listing_many_equations_earns_nothing():
    # Only the first 2 equations per gold step are read: enumerating sums that pass through 130 and 117 fails.
    assert steps_reward(" ".join(f"{n - 1} + 1 = {n}" for n in range(200)), GOLD).reward == 0.0
    assert steps_reward("1 + 1 = 2, 2 + 2 = 4, 3 + 3 = 6, 4 + 4 = 8, 26 * 5 = 130", GOLD).reward == 0.0
    assert steps_reward("1 + 1 = 2, 26 * 5 = 130", GOLD).reward == 0.5


def test_long_degenerate_text_is_scored_in_linear_time():
    # A left side is read from a bounded window before its '=': 100k characters of '=' and digits, or of
    # operators, would take seconds to minutes with a regex run over the whole text (and time the sample out).
    for text in ["= 1 " * 25_000, "1+" * 50_000 + "1 = 2", ("1+ " * 40 + "= 3 ") * 800, "0" * 100_000]:
        began = time.perf_counter()
        assert steps_reward(text, GOLD).reward == 0.0
        assert time.perf_counter() - began < 2.0, text[:20]


def test_a_gold_without_steps_gives_no_signal():
    assert steps_reward(r"\boxed{3}", r"\frac{1}{2}").reward == 0.0
    assert steps_reward("1 + 2 = 3", "#### 3").reward == 0.0


def test_every_embedded_gold_scores_itself_1():
    rows = arithmetic_rows(200)
    assert all(steps_reward(r["answer"], r["answer"]).reward == 1.0 for r in rows)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "2 ** 3", "7 % 4", "9" * 40 + " * 2", "(" * 500 + "1" + ")" * 500,
    "+".join(["1"] * 50_000), "1 / 0", "a + 1", "True + 1", "1" + " / 999999999" * 5,  # a 45-digit denominator
])
def test_hostile_left_hand_sides_are_not_arithmetic(text):
    assert evaluate(text) is None


def test_steps_runs_in_the_guarded_grader_and_sums_with_math():
    with GuardedGrader(RewardsConfig(functions=["math", "steps"], timeout_s=5.0)) as g:
        r = g.grade(GOLD, "26 * 5 = 130\n130 - 13 = 119\n#### 119")
        assert r.components == {"math": 0.0, "steps": 0.5} and r.reward == 0.5 and r.status == "ok"
        r = g.grade(GOLD, "26 * 5 = 130\n130 - 13 = 117\n#### 117")
        assert r.reward == 2.0
