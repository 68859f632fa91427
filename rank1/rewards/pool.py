"""Score (gold, completion) pairs on `num_workers` Ray actors, each with its own guarded grading child.

    pool = RewardPool(RewardsConfig(functions=["math"], num_workers=2, timeout_s=5))
    results = pool.score([(r"\\frac12", r"... \\boxed{0.5}"), ("18", "... #### 17")])  # RewardResult, in order
    pool.close()

Work is cut into small chunks and handed to whichever actor has room, so a slow answer on one actor
does not hold up the others. A dead actor is restarted by Ray (`max_restarts`) and the chunks it had in
flight are resubmitted, so no sample is lost; only if a chunk keeps failing does `score` raise.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Sequence

from rank1.core.config import ClusterConfig, RewardsConfig
from rank1.core.workers import WorkerDied, WorkerGroup, init_ray
from rank1.rewards.guard import GuardedGrader, check_config
from rank1.rewards.registry import BUILTINS, RewardFunctionError
from rank1.rewards.result import RewardResult

CHUNKS_IN_FLIGHT_PER_ACTOR = 2  # one being graded, one queued so the actor never waits on the driver
MAX_CHUNK = 16
HANG_SLACK_S = 60.0  # on top of every answer's own timeout: a chunk later than that means a blocked actor


class RewardPoolError(RuntimeError):
    """A chunk of pairs could not be graded even after retries on restarted actors."""


class RewardActor:
    """One Ray actor = one GuardedGrader (and so one grading child process)."""

    def __init__(self, cfg: RewardsConfig):
        self.grader = GuardedGrader(cfg)
        self.grader.wait_ready()  # a (re)started actor is ready to grade when Ray reports it alive

    def pid(self) -> int:
        return os.getpid()

    def score(self, pairs: list[tuple[str, str]]) -> list[RewardResult]:
        return self.grader.grade_many(pairs)


class RewardPool:
    def __init__(self, cfg: RewardsConfig):
        check_config(cfg)  # the actors check it too, but a typo should fail here, before Ray starts
        import ray

        self.cfg = cfg
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # a caller (trainer, tests) that already started Ray keeps its own settings
            init_ray(ClusterConfig(local_num_cpus=max(2, cfg.num_workers), local_object_store_mb=200))
        # num_cpus=0: an actor only waits on its child process; reserving a CPU per actor would leave
        # a small node with none for learners and rollout engines, and the pool would never schedule.
        self.group = WorkerGroup(RewardActor, cfg.num_workers, lambda i, ips: (cfg,), num_cpus=0, placement=None,
                                 max_restarts=cfg.max_restarts, name="reward worker")
        self.group.call("pid")  # surface start-up errors (e.g. imports) now

    @property
    def actors(self) -> list:
        return self.group.workers

    def score(self, pairs: Sequence[tuple[str, str]],
              progress: Callable[[int], None] | None = None) -> list[RewardResult]:
        """Grade every (gold, completion) pair; results come back in input order.

        `progress(n)` is called as each chunk of n pairs finishes. Raises RewardFunctionError if a
        user-supplied reward function raised or returned a non-number (see registry.py).
        """
        pairs = list(pairs)
        for i, pair in enumerate(pairs):
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise ValueError(f"pairs[{i}]: expected a (gold, completion) pair, got {type(pair).__name__}")
        size = max(1, min(MAX_CHUNK, math.ceil(len(pairs) / (4 * self.group.size))))
        chunks = [(pairs[start : start + size],) for start in range(0, len(pairs), size)]
        # Every answer has its own timeout inside the actor; a chunk (and the one queued behind it) far
        # past the sum of those is an actor that stopped answering: it is killed, restarted and retried.
        deadline = self.cfg.hang_timeout_s or CHUNKS_IN_FLIGHT_PER_ACTOR * size * (self.cfg.timeout_s + 1.0) + HANG_SLACK_S
        try:
            graded = self.group.map("score", chunks, per_worker=CHUNKS_IN_FLIGHT_PER_ACTOR, retries=self.cfg.max_restarts + 1,
                                    timeout_s=deadline, on_result=(lambda t, r: progress(len(r))) if progress else None)
        except WorkerDied as e:
            raise RewardPoolError(f"reward chunk could not be graded: {e}") from e
        results = [r for chunk in graded for r in chunk]
        _raise_on_user_function_errors(results)
        return results

    def pids(self, timeout_s: float = 120.0) -> list[int]:
        """Process ids of the actors, waiting for any that Ray is restarting."""
        return self.group.pids(timeout_s)

    def close(self) -> None:
        import ray

        self.group.shutdown()
        if self._owns_ray:
            ray.shutdown()

    def __enter__(self) -> "RewardPool":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _raise_on_user_function_errors(results: list[RewardResult]) -> None:
    for r in results:
        if r.status == "error" and r.function is not None and r.function not in BUILTINS:
            raise RewardFunctionError(r.message)
