"""How much of the full fine-tune's gain rank 1 recovers, with intervals that respect the pairing.

Every arm answers the same problems, so differences between arms are paired: a problem-level bootstrap
(resample problems, recompute every arm's accuracy on the same resample) gives the intervals of a gain
and of the recovery ratio

    recovery = (acc_rank1 - acc_base) / (acc_full - acc_base)

which the paper reports as 73-90 %. When the full fine-tune gains nothing (acc_full <= acc_base) the
ratio has no meaning: it is reported as None with the reason, never as a division by ~0.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass
class Estimate:
    value: float | None
    low: float | None
    high: float | None
    note: str = ""

    def as_dict(self) -> dict:
        return {"value": self.value, "ci95": [self.low, self.high], "note": self.note}


def accuracy(correct: list[float]) -> float:
    return sum(correct) / len(correct) if correct else 0.0


def _percentiles(values: list[float]) -> tuple[float | None, float | None]:
    if not values:
        return None, None
    values = sorted(values)
    return values[int(0.025 * (len(values) - 1))], values[int(0.975 * (len(values) - 1))]


def _resamples(n: int, draws: int, seed: int):
    rng = random.Random(seed)
    for _ in range(draws):
        yield [rng.randrange(n) for _ in range(n)]


def check_paired(*arms: list[float]) -> int:
    sizes = {len(a) for a in arms}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError(f"paired arms need the same non-empty problems, got sizes {sorted(sizes)}")
    return sizes.pop()


def gain(base: list[float], arm: list[float], draws: int = 2000, seed: int = 0) -> Estimate:
    """acc(arm) - acc(base) on the same problems, with a paired-bootstrap 95 % interval."""
    n = check_paired(base, arm)
    diffs = [sum(arm[i] - base[i] for i in idx) / n for idx in _resamples(n, draws, seed)]
    return Estimate(accuracy(arm) - accuracy(base), *_percentiles(diffs))


def recovery(base: list[float], rank1: list[float], full: list[float] | float, draws: int = 2000, seed: int = 0) -> Estimate:
    """(acc_rank1 - acc_base) / (acc_full - acc_base) and its paired-bootstrap 95 % interval. `full` is the full
    fine-tune's answers on the same problems, or a published accuracy (a number: it is not resampled)."""
    if not isinstance(full, list):
        n = check_paired(base, rank1)
        full = [float(full)] * n  # a constant per problem: the reference's accuracy in every resample
    n = check_paired(base, rank1, full)
    full_gain = accuracy(full) - accuracy(base)
    if full_gain <= 0:
        return Estimate(None, None, None, f"the full fine-tune gained nothing over the base ({100 * full_gain:+.1f} points): "
                                          "recovery is undefined")
    ratios, undefined = [], 0
    for idx in _resamples(n, draws, seed):
        b = sum(base[i] for i in idx)
        denominator = sum(full[i] for i in idx) - b
        if denominator <= 0:
            undefined += 1
            continue
        ratios.append((sum(rank1[i] for i in idx) - b) / denominator)
    low, high = _percentiles(ratios)
    note = f"{undefined} of {draws} resamples had no full fine-tune gain and were left out" if undefined else ""
    return Estimate((accuracy(rank1) - accuracy(base)) / full_gain, low, high, note)
