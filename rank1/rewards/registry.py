"""Reward functions by name: the built-ins `math`, `format` and `steps`, or a user's `package.module:function`.

A user function is called as `fn(completion: str, gold: str)` and must return a number (bool, int or
float, finite). If it raises or returns anything else, that sample gets reward 0 with status 'error'
and a message naming the function; `RewardPool.score` then raises `RewardFunctionError`, because a
broken reward function would otherwise train a policy on silent zeros.
"""

from __future__ import annotations

import importlib
import math
import numbers
from typing import Callable

from rank1.rewards.grading import Grade, format_reward, math_reward
from rank1.rewards.steps import steps_reward

BUILTINS: dict[str, Callable[..., Grade]] = {"math": math_reward, "format": format_reward, "steps": steps_reward}


class RewardFunctionError(ValueError):
    """A configured reward function cannot be imported or misbehaved; the message names it."""


def resolve(name: str) -> Callable:
    """The callable for a built-in name or a 'package.module:function' path."""
    if name in BUILTINS:
        return BUILTINS[name]
    module_name, colon, attr = name.partition(":")
    if not colon or not module_name or not attr:
        raise RewardFunctionError(
            f"reward function {name!r}: expected a built-in ({', '.join(BUILTINS)}) or 'package.module:function'"
        )
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raises at import
        raise RewardFunctionError(f"reward function {name!r}: cannot import {module_name!r} ({type(e).__name__}: {e})") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardFunctionError(f"reward function {name!r}: {module_name!r} has no function {attr!r}")
    return fn


def call(name: str, fn: Callable, completion: str, gold: str, gold_format: str) -> Grade:
    """Run one reward function; a user function's misbehaviour becomes RewardFunctionError naming it."""
    if name in BUILTINS:
        return fn(completion, gold, gold_format)
    try:
        value = fn(completion, gold)
    except Exception as e:
        raise RewardFunctionError(f"reward function {name!r} raised {type(e).__name__}: {e}") from None
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise RewardFunctionError(
            f"reward function {name!r} returned {type(value).__name__} {str(value)[:80]!r}, expected a finite number"
        )
    return Grade(float(value))
