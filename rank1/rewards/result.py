"""What grading one (gold, completion) pair returns, in the parent, the Ray pool and the CLI.

Kept free of heavy imports (no sympy) so that the CLI can check its flags and input quickly."""

from __future__ import annotations

from dataclasses import dataclass, field

STATUSES = ("ok", "timeout", "error")
GOLD_FORMATS = ("auto", "gsm8k", "latex")  # auto: golds with '#### n' are GSM8K, others LaTeX


@dataclass
class RewardResult:
    reward: float  # sum of the configured functions' rewards (0.0 or 1.0 with the default ['math'])
    extracted: str = ""  # the answer the model gave, as math-verify extracted it ('' if none)
    status: str = "ok"  # ok | timeout (killed after timeout_s) | error (see message)
    message: str = ""  # why, when status is not ok; names the reward function at fault
    components: dict[str, float] = field(default_factory=dict)  # reward per function name
    function: str | None = None  # the reward function that failed or timed out, if any
