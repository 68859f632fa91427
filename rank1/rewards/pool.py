"""Score (gold, completion) pairs on `num_workers` Ray actors, each with its own guarded grading child.

    pool = RewardPool(RewardsConfig(functions=["math"], num_workers=2, timeout_s=5))
    results = pool.score([(r"\\frac12", r"... \\boxed{0.5}"), ("18", "... #### 17")])  # RewardResult, in order
    pool.close()

Work is cut into small chunks and handed to whichever actor has room, so a slow answer on one actor
does not hold up the others. A dead actor is restarted by Ray (`max_restarts`) and the chunks it had in
flight are resubmitted, so no sample is lost; only if a chunk keeps failing does `score` raise.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import deque
from typing import Callable, Sequence

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, WorkerCrashedError

from rank1.config import RewardsConfig
from rank1.rewards.guard import GuardedGrader, check_config
from rank1.rewards.registry import BUILTINS, RewardFunctionError
from rank1.rewards.result import RewardResult

logger = logging.getLogger(__name__)

CHUNKS_IN_FLIGHT_PER_ACTOR = 2  # one being graded, one queued so the actor never waits on the driver
MAX_CHUNK = 16


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
        if cfg.num_workers < 1:
            raise ValueError(f"rewards.num_workers: must be >= 1, got {cfg.num_workers}")
        if cfg.max_restarts < 0:
            raise ValueError(f"rewards.max_restarts: must be >= 0, got {cfg.max_restarts}")
        self.cfg = cfg
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:  # a caller (trainer, tests) that already started Ray keeps its own settings
            if os.environ.get("RAY_ADDRESS"):
                ray.init()  # join the cluster the user pointed at
            else:  # a small local Ray: the actors hold no CPUs, the object store only carries strings
                ray.init(address="local", num_cpus=max(2, cfg.num_workers), object_store_memory=200 * 1024**2, include_dashboard=False)
        # num_cpus=0: an actor only waits on its child process; reserving a CPU per actor would leave
        # a small node with none for learners and rollout engines, and the pool would never schedule.
        actor_cls = ray.remote(num_cpus=0, max_restarts=cfg.max_restarts, max_task_retries=0)(RewardActor)
        self.actors = [actor_cls.remote(cfg) for _ in range(cfg.num_workers)]
        ray.get([a.pid.remote() for a in self.actors])  # surface start-up errors (e.g. imports) now

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
        size = max(1, min(MAX_CHUNK, math.ceil(len(pairs) / (4 * len(self.actors)))))
        chunks = [(start, pairs[start : start + size]) for start in range(0, len(pairs), size)]
        results: list[RewardResult | None] = [None] * len(pairs)
        todo, failures = deque(range(len(chunks))), [0] * len(chunks)
        in_flight: dict[ray.ObjectRef, tuple[int, int]] = {}  # ref -> (chunk index, actor index)
        load = [0] * len(self.actors)
        while todo or in_flight:
            for a in sorted(range(len(self.actors)), key=lambda a: load[a]):
                while todo and load[a] < CHUNKS_IN_FLIGHT_PER_ACTOR:
                    c = todo.popleft()
                    in_flight[self.actors[a].score.remote(chunks[c][1])] = (c, a)
                    load[a] += 1
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            c, a = in_flight.pop(ref)
            load[a] -= 1
            try:
                chunk_results = ray.get(ref)
            except (RayActorError, WorkerCrashedError) as e:
                failures[c] += 1
                if failures[c] > self.cfg.max_restarts + 1:
                    raise RewardPoolError(f"reward chunk of {len(chunks[c][1])} pairs failed {failures[c]} times; last: {e}") from e
                logger.warning("reward actor %d died; resubmitting its chunk of %d pairs", a, len(chunks[c][1]))
                todo.appendleft(c)
                continue
            start = chunks[c][0]
            results[start : start + len(chunk_results)] = chunk_results
            if progress:
                progress(len(chunk_results))
        _raise_on_user_function_errors(results)
        return results  # type: ignore[return-value]

    def pids(self, timeout_s: float = 120.0) -> list[int]:
        """Process ids of the actors, waiting for any that Ray is restarting."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([a.pid.remote() for a in self.actors])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def close(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
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
