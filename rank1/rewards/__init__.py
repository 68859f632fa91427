"""Rewards role: math-verify grading with timeouts that work off the main thread.

    grading.py   built-in reward functions `math` and `format` (plain, unguarded)
    registry.py  reward functions by name or 'package.module:function'
    child.py     the grading child process (resource limits, JSON lines protocol)
    guard.py     GuardedGrader: one persistent child, killed and restarted on timeout
    pool.py      RewardPool: GuardedGraders in Ray actors, restarted when they die
    cli.py       `rank1 grade IN.jsonl --out OUT.jsonl`

Nothing is imported here, so `rank1 grade` can check its input before loading sympy or Ray.
"""
