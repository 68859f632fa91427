"""RewardPool on a real local Ray: same rewards as in-process, survives dead actors and hostile answers."""

import json
import threading
import time

import pytest
import ray

from rank1.core.config import RewardsConfig
from rank1.rewards.pool import RewardPool
from rank1.rewards.registry import RewardFunctionError


def _mixed_pairs(data_dir, n=60):
    """MATH500 and GSM8K golds with right, equivalent, wrong and unanswered completions."""
    math500 = [json.loads(l) for l in (data_dir / "math500" / "test.jsonl").read_text().splitlines()[:n]]
    gsm8k = [json.loads(l) for l in (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()[:n]]
    pairs = []
    for i, row in enumerate(math500):
        gold = row["answer"]
        completion = [f"so \\boxed{{{gold}}}", f"so \\boxed{{{gold}+1}}", "I give up", f"$${gold}$$"][i % 4]
        pairs.append((gold, completion))
    for i, row in enumerate(gsm8k):
        number = row["answer"].rsplit("####", 1)[1].strip()
        completion = [f"#### {number}", f"#### {int(number.replace(',', '')) + 2}", f"it is {number} dollars"][i % 3]
        pairs.append((row["answer"], completion))
    return pairs


@pytest.fixture(scope="module")
def pool(ray_session):
    with RewardPool(RewardsConfig(functions=["math"], num_workers=2, timeout_s=2.0)) as p:
        yield p


def test_rewards_in_ray_actors_equal_rewards_in_process(pool, grader, data_dir):
    pairs = _mixed_pairs(data_dir)
    in_ray = pool.score(pairs)
    in_process = [grader.grade(gold, completion) for gold, completion in pairs]
    assert [r.reward for r in in_ray] == [r.reward for r in in_process]
    assert [r.extracted for r in in_ray] == [r.extracted for r in in_process]
    assert all(r.status == "ok" for r in in_ray)
    ones = sum(r.reward for r in in_ray)
    assert 0.3 * len(pairs) < ones < 0.8 * len(pairs), ones  # a real mix, not all zeros or all ones


def test_pool_survives_hostile_answers_in_the_batch(pool):
    tower = r"\boxed{9^{9^{9^{9^{9}}}}}"
    pairs = [("2", r"\boxed{2}"), ("2", tower), ("3", "#### 3"), ("2", tower), ("5", r"\boxed{5}")]
    started = time.monotonic()
    results = pool.score(pairs)
    assert time.monotonic() - started < 30
    assert [(r.reward, r.status) for r in results] == [
        (1.0, "ok"), (0.0, "timeout"), (1.0, "ok"), (0.0, "timeout"), (1.0, "ok")]
    assert pool.score([("7", r"\boxed{7}")])[0].reward == 1.0


def test_pool_uses_a_caller_started_ray_and_leaves_it_running(ray_session):
    with RewardPool(RewardsConfig(functions=["math"], num_workers=1)) as p:
        assert p.score([("1", r"\boxed{1}")])[0].reward == 1.0
    assert ray.is_initialized()


@pytest.mark.slow
def test_actor_killed_by_os_kill_mid_batch_loses_no_sample(ray_session, tmp_path):
    marker = tmp_path / "killed"
    cfg = RewardsConfig(num_workers=2, timeout_s=10.0, functions=["user_rewards:kill_actor_once"])
    with RewardPool(cfg) as p:
        pids_before = p.pids()
        pairs = [("1", f"row {i}") for i in range(20)] + [("1", f"KILL:{marker}")] + [("1", f"row {i}") for i in range(20)]
        results = p.score(pairs)
        assert marker.exists()  # the actor really was killed mid-batch
        assert len(results) == len(pairs) and all((r.reward, r.status) == (1.0, "ok") for r in results)
        assert len(set(p.pids()) - set(pids_before)) == 1  # Ray restarted exactly one actor


@pytest.mark.slow
def test_actor_killed_by_ray_kill_mid_batch_loses_no_sample(ray_session):
    cfg = RewardsConfig(num_workers=2, timeout_s=10.0, functions=["user_rewards:naps"])  # 0.1 s a pair
    with RewardPool(cfg) as p:
        pids_before = p.pids()
        killer = threading.Timer(1.5, lambda: ray.kill(p.actors[0], no_restart=False))
        killer.start()
        results = p.score([("1", f"row {i}") for i in range(60)])
        killer.join()
        assert len(results) == 60 and all((r.reward, r.status) == (1.0, "ok") for r in results)
        assert p.pids()[0] != pids_before[0]


def test_broken_user_function_raises_naming_it(ray_session):
    with RewardPool(RewardsConfig(functions=["math", "user_rewards:raises"])) as p:
        with pytest.raises(RewardFunctionError, match=r"'user_rewards:raises' raised ValueError: boom"):
            p.score([("1", r"\boxed{1}")])


def test_bad_pool_config_is_rejected_before_any_actor_starts():
    with pytest.raises(RewardFunctionError, match="no_such_module_xyz"):
        RewardPool(RewardsConfig(functions=["no_such_module_xyz:f"]))
    with pytest.raises(ValueError, match="rewards.num_workers"):
        RewardPool(RewardsConfig(num_workers=0))


def test_malformed_pairs_are_rejected_or_scored_0(pool):
    with pytest.raises(ValueError, match=r"pairs\[1\]: expected a \(gold, completion\) pair"):
        pool.score([("1", "1"), ("1",)])
    assert pool.score([]) == []
    result = pool.score([("1", None)])[0]
    assert (result.reward, result.status) == (0.0, "error")


@pytest.mark.slow
def test_blocked_actor_is_detected_restarted_and_its_work_retried(ray_session):
    # SIGSTOP: the actor process is alive but answers nothing (as a deadlock or a stuck syscall would).
    import os
    import signal

    cfg = RewardsConfig(num_workers=2, timeout_s=10.0, functions=["user_rewards:naps"], hang_timeout_s=6.0)  # 0.1 s a pair
    with RewardPool(cfg) as p:
        before = p.pids()
        stopper = threading.Timer(1.0, lambda: os.kill(before[1], signal.SIGSTOP))
        stopper.start()
        started = time.monotonic()
        results = p.score([("1", f"row {i}") for i in range(60)])
        stopper.join()
        assert len(results) == 60 and all((r.reward, r.status) == (1.0, "ok") for r in results)
        assert time.monotonic() - started < 60  # one deadline, not a hang
        after = p.pids()
        assert after[0] == before[0] and after[1] != before[1]  # the blocked one was replaced
        assert p.group.restarts >= 1
