"""The built-in reward functions and the registry, graded through the guarded child (real math-verify)."""

import pytest

from rank1.core.config import RewardsConfig
from rank1.rewards.grading import answer_region, format_reward, gold_to_math, math_reward
from rank1.rewards.guard import GuardedGrader
from rank1.rewards.registry import RewardFunctionError, resolve


def test_latex_gold_is_wrapped_so_tuples_are_not_read_as_their_first_number():
    gold = r"\left( 3, \frac{\pi}{2} \right)"
    assert gold_to_math(gold) == f"${gold}$"
    assert math_reward(r"The point is \boxed{(3, \frac{\pi}{2})}.", gold).reward == 1.0
    # Only the first coordinate is wrong: with a bare (unwrapped) gold this would wrongly score 1.
    assert math_reward(r"\boxed{3}", gold).reward == 0.0


def test_gsm8k_gold_is_the_number_after_hashes_with_thousands_separators_removed():
    gold = "She pays 2 * 600 = <<2*600=1200>>1,200 dollars.\n#### 1,200"
    assert gold_to_math(gold) == "$1200$"
    assert gold_to_math("1,200", "gsm8k") == "$1200$"
    assert math_reward("so she pays\n#### 1,200", gold).reward == 1.0
    assert math_reward("so she pays\n#### 1200", gold).reward == 1.0
    assert math_reward(r"she pays \boxed{1200} dollars", gold).reward == 1.0
    assert math_reward("so she pays\n#### 1201", gold).reward == 0.0
    with pytest.raises(ValueError, match="gold format"):
        gold_to_math("1", "yaml")


def test_a_numeric_gold_needs_a_number_not_the_questions_expression():
    # A GRPO policy on the arithmetic task learned to restate "12 + 7 * 3", which math-verify keeps
    # unevaluated and judges equal to 33. For a GSM8K gold the answer must be a number.
    assert math_reward("To calculate 12 + 7 * 3 with a calculator, we", "#### 33").reward == 0.0
    assert math_reward(r"\boxed{12+21}", "#### 33").reward == 0.0
    for answer in ("so 12 + 21 = 33", r"\boxed{33}", "$33$", "answer: 33.0", r"$\frac{66}{2}$"):
        assert math_reward(answer, "#### 33").reward == 1.0, answer
    assert math_reward(r"\boxed{-33}", "#### -33").reward == 1.0
    assert math_reward("1/2", r"\frac12").reward == 1.0  # LaTeX golds keep math-verify's equivalence


def test_answer_is_taken_from_last_box_then_hashes_then_last_math():
    assert answer_region("x = 3\n#### 5\n") == "5"
    text = r"first \boxed{2} then \boxed{4}"
    assert math_reward(text, "4").extracted == "4"
    assert math_reward(text, "4").reward == 1.0
    assert math_reward(text, "2").reward == 0.0
    assert math_reward(r"We get $x = \frac{1}{2}$ so the answer is $0.5$", r"\frac12").reward == 1.0
    assert math_reward("no numbers here", "4").reward == 0.0


def test_format_reward_wants_exactly_one_final_answer():
    assert format_reward(r"so \boxed{\frac{1}{2}}").reward == 1.0
    assert format_reward("work\n#### 12").reward == 1.0
    assert format_reward("the answer is 12").reward == 0.0
    assert format_reward(r"\boxed{1} or \boxed{2}").reward == 0.0
    assert format_reward("#### 1\n#### 2").reward == 0.0
    assert format_reward(r"\boxed{12").reward == 0.0  # unterminated
    assert format_reward(r"\boxed{}").reward == 0.0  # empty


def test_guarded_grader_returns_reward_extracted_and_status(grader):
    r = grader.grade(r"\frac{14}{3}", r"Thus $x = \boxed{\dfrac{14}{3}}$.")
    assert (r.reward, r.status, r.extracted) == (1.0, "ok", r"\frac{14}{3}")  # normalized by math-verify
    r = grader.grade("18", "The answer:\n#### 17")
    assert (r.reward, r.status, r.extracted) == (0.0, "ok", "17")
    r = grader.grade("  ", r"\boxed{1}")  # a gold that is no math at all is a data error, not a 0 for the model
    assert (r.reward, r.status) == (0.0, "error") and "gold answer '  ' could not be parsed" in r.message


def test_several_functions_sum_and_are_reported_per_function():
    with GuardedGrader(RewardsConfig(functions=["math", "format", "user_rewards:short_answer"])) as g:
        r = g.grade("4", r"\boxed{4}")
        assert r.components == {"math": 1.0, "format": 1.0, "user_rewards:short_answer": 0.5}
        assert r.reward == 2.5 and r.status == "ok"


@pytest.mark.parametrize("name, message", [
    ("user_rewards:raises", r"'user_rewards:raises' raised ValueError: boom"),
    ("user_rewards:returns_text", r"'user_rewards:returns_text' returned str 'yes', expected a finite number"),
])
def test_misbehaving_user_function_scores_0_with_an_error_naming_it(name, message):
    with GuardedGrader(RewardsConfig(functions=["math", name])) as g:
        r = g.grade("4", r"\boxed{4}")
    assert r.status == "error" and r.function == name and message in r.message
    assert r.components == {"math": 1.0, name: 0.0}


@pytest.mark.parametrize("name, returned", [
    ("user_rewards:returns_nan", "float 'nan'"),
    ("user_rewards:returns_inf", "float 'inf'"),
    ("user_rewards:returns_none", "NoneType 'None'"),
    ("user_rewards:returns_text", "str 'yes'"),
    ("user_rewards:returns_numpy_nan", "float32 'nan'"),
    ("user_rewards:returns_torch_nan", "Tensor 'tensor(nan)'"),
], ids=["nan", "+inf", "None", "str", "numpy nan", "torch nan"])
def test_user_function_returning_no_finite_number_scores_0_with_an_error_naming_it(name, returned):
    # timeout_s: the torch case imports torch on its first call, which takes seconds on a loaded machine.
    with GuardedGrader(RewardsConfig(functions=[name], timeout_s=60.0)) as g:
        r = g.grade("4", r"\boxed{4}")
    assert (r.reward, r.status, r.function, r.components) == (0.0, "error", name, {name: 0.0}), r
    assert r.message == f"reward function {name!r} returned {returned}, expected a finite number"


# Plain text reaches sympy's parse_expr only through math-verify's expression regex (digits, spaces and
# + - * / ^ ( ) × ÷; see test_reward_hostile.py). What gets through is read as arithmetic, unevaluated:
# equal to a LaTeX gold of its value, but not a number, so 0 against a GSM8K gold (see math_reward).
@pytest.mark.parametrize("gold, completion, reward, extracted", [
    pytest.param("#### 12", "so\n#### 3*4", 0.0, "3*4", id="product vs gsm8k gold"),
    pytest.param("12", "so\n#### 3*4", 1.0, "3*4", id="product vs latex gold"),
    pytest.param("12", "The final answer is 3*4", 1.0, "3*4", id="final answer is"),
    pytest.param("1024", "so\n#### 2^10", 1.0, "2^10", id="power"),  # ^ is read as a power
    pytest.param("20", "so\n#### (2+3)*4", 1.0, "(2+3)*4", id="parentheses"),
    pytest.param(r"\frac72", "so\n#### 7/2", 1.0, "7/2", id="quotient"),
    pytest.param("#### 12", "so\n#### 12", 1.0, "12", id="number vs gsm8k gold"),
    # × and ÷ are in math-verify's regex, but parse_expr cannot read them; rank1 rewrites them to * and /.
    # Before that, the expression was dropped and its last number taken: "5 × 4" scored 1 against 4.
    pytest.param("12", "so\n#### 3 × 4", 1.0, "3 * 4", id="times sign"),
    pytest.param("3", "so\n#### 12 ÷ 4", 1.0, "12 / 4", id="division sign"),
    pytest.param("#### 4", "so\n#### 5 × 4", 0.0, "5 * 4", id="times sign, not its last number, gsm8k"),
    pytest.param("4", "The final answer is 5 × 4", 0.0, "5 * 4", id="times sign, not its last number, latex"),
])
def test_plain_arithmetic_through_the_regex_gate_is_read_as_arithmetic(grader, gold, completion, reward, extracted):
    r = grader.grade(gold, completion)
    assert (r.reward, r.status, r.extracted) == (reward, "ok", extracted), r


def test_user_function_printing_to_stdout_does_not_break_the_protocol():
    with GuardedGrader(RewardsConfig(functions=["user_rewards:prints_and_scores"])) as g:
        assert [g.grade("1", "x").reward for _ in range(3)] == [1.0, 1.0, 1.0]


def test_hanging_user_function_times_out():
    with GuardedGrader(RewardsConfig(functions=["user_rewards:sleeps"], timeout_s=1.0)) as g:
        r = g.grade("1", "x")
    assert (r.reward, r.status) == (0.0, "timeout")


@pytest.mark.parametrize("name, match", [
    ("no_such_module_xyz:f", "cannot import 'no_such_module_xyz'"),
    ("user_rewards:missing", "has no function 'missing'"),
    ("mathx", "expected a built-in"),
])
def test_unknown_reward_function_is_rejected_up_front(name, match):
    with pytest.raises(RewardFunctionError, match=match):
        resolve(name)
    with pytest.raises(RewardFunctionError, match=match):
        GuardedGrader(RewardsConfig(functions=[name]))


def test_bad_rewards_config_names_the_field():
    with pytest.raises(ValueError, match="rewards.gold_format"):
        GuardedGrader(RewardsConfig(gold_format="yaml"))
    with pytest.raises(ValueError, match="rewards.timeout_s"):
        GuardedGrader(RewardsConfig(timeout_s=0))


def test_grading_and_its_timeout_work_off_the_main_thread():
    """math-verify's own timeout (signal.alarm) fails off the main thread; the guarded grader does not."""
    import threading

    from math_verify import parse

    def in_thread(fn):
        out = {}
        t = threading.Thread(target=lambda: out.update(value=_catch(fn)))
        t.start()
        t.join(60)
        return out["value"]

    def _catch(fn):
        try:
            return fn()
        except Exception as e:
            return e

    signal_based = in_thread(lambda: parse(r"$\frac{1}{2}$", parsing_timeout=5))
    assert isinstance(signal_based, ValueError) and "signal" in str(signal_based)

    with GuardedGrader(RewardsConfig(functions=["math"], timeout_s=1.5)) as g:
        assert in_thread(lambda: g.grade(r"\frac12", r"\boxed{0.5}")).reward == 1.0
        late = in_thread(lambda: g.grade("1", r"\boxed{9^{9^{9^{9^{9}}}}}"))
        assert (late.reward, late.status) == (0.0, "timeout")
