"""GRPO end to end through the real CLI (engines, reward pool, learners, adapter sync), its bad inputs,
and the learners' GRPO step: 2 ZeRO-3 learners equal 1, and the KL reference is the base model."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1_testing import REPO, wait_for_step

# Tiny GRPO steps: 4 prompts x 2 completions of at most 2 tokens, 1 learner (in the driver), stage 0.
TINY = ["--data.arithmetic_rows", "16", "--data.max_length", "96", "--trainer.micro_batch_size", "4",
        "--trainer.global_batch_size", "4", "--trainer.zero_stage", "0", "--logging.progress", "false", "--eval.in_training", "false",
        "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2", "--grpo.max_completion_length", "2",
        "--trainer.checkpoint_every", "0", "--cluster.local_num_cpus", "2"]
USER_REWARDS = str(REPO / "tests" / "rewards")


def run_train(*args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """`rank1 train` in a child process; the user reward functions are importable, as a user's would be."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([USER_REWARDS, str(REPO)]),
           "WANDB_MODE": "offline"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run([sys.executable, "-m", "rank1.cli", "train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


@pytest.mark.slow
def test_objective_flag_switches_sft_to_grpo_from_the_sft_adapter(tmp_path):
    sft, grpo = tmp_path / "sft", tmp_path / "grpo"
    result = run_train(*TINY, "--max-steps", "2", "--output-dir", str(sft))
    assert result.returncode == 0, result.stderr[-3000:]
    assert {"loss", "tokens_per_s"} <= metrics(sft)[0].keys() and (sft / "loss.png").stat().st_size > 0

    # The same flags plus the objective and the SFT adapter. A 2-token completion never holds a final
    # answer, so the format reward is 0 for all: every advantage is 0 and each step is skipped, reported.
    result = run_train(*TINY, "--objective", "grpo", "--adapter.init", str(sft / "adapter"), "--rollout.backend", "transformers",
                       "--rewards.functions", "format", "--max-steps", "2", "--output-dir", str(grpo),
                       "--logging.report_to", "tensorboard,wandb")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "update skipped" in result.stderr
    rows = metrics(grpo)
    assert [r["step"] for r in rows] == [1, 2] and all(r["skipped"] and r["reward_mean"] == 0.0 for r in rows)
    assert all(math.isfinite(v) for r in rows for v in r.values() if isinstance(v, float))
    # GRPO started from the SFT adapter (the engines proved they served it) and, skipping, kept it.
    a, b = adapter(sft), adapter(grpo)
    assert a.keys() == b.keys() and any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0)
    assert "objective: grpo" in (grpo / "config.yaml").read_text()
    assert (grpo / "reward.png").stat().st_size > 0
    assert list((grpo / "tensorboard").glob("events.out.tfevents.*"))
    assert list((grpo / "wandb").glob("offline-run-*"))  # WANDB_MODE=offline: nothing leaves the machine


@pytest.mark.slow
def test_seeded_async_grpo_run_raises_a_learnable_reward(tmp_path):
    # The reward looks only at the first word, so a rank-1 adapter can learn it in a few steps; vLLM
    # engines, async generation (one version behind, importance-weighted) and a sync every step.
    out = tmp_path / "run"
    result = run_train(*TINY, "--objective", "grpo", "--rollout.backend", "vllm", "--rollout.async", "true",
                       "--rewards.functions", "user_rewards:opens_with_to", "--grpo.prompts_per_step", "4",
                       "--grpo.num_generations", "4", "--trainer.micro_batch_size", "8", "--lr", "5e-3",
                       "--trainer.warmup_ratio", "0", "--trainer.lr_schedule", "constant", "--max-steps", "10",
                       "--seed", "3", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = metrics(out)
    rewards = [r["reward_mean"] for r in rows]
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    assert all(0.0 < r["is_mean"] <= 3.0 and r["time_generate"] > 0 for r in rows if not r["skipped"])


@pytest.mark.slow
def test_a_reward_function_that_raises_ends_the_run_naming_it(tmp_path):
    result = run_train(*TINY, "--objective", "grpo", "--rollout.backend", "transformers", "--rewards.functions",
                       "math,user_rewards:raises", "--max-steps", "2", "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 2
    assert "reward function 'user_rewards:raises' raised ValueError: boom" in result.stderr
    assert "Traceback" not in result.stderr


def test_prompts_over_the_engine_context_are_named_or_dropped(tmp_path, tokenizer):
    from rank1.core.config import DataConfig
    from rank1.core.data import DataError, load_prompt_data

    data = tmp_path / "q.jsonl"
    data.write_text(json.dumps({"question": "What is 2 + 2?", "answer": "#### 4"}) + "\n"
                    + json.dumps({"question": "long " * 300, "answer": "#### 1"}) + "\n")
    with pytest.raises(DataError, match=r"q.jsonl:2: the prompt has \d+ tokens, over the limit of 100"):
        load_prompt_data(DataConfig(path=str(data)), tokenizer, max_prompt_tokens=100)
    kept = load_prompt_data(DataConfig(path=str(data), overlong="drop"), tokenizer, 100, instruction="Be brief.")
    assert kept.dropped == 1 and len(kept.rows) == 1 and kept.rows[0].gold == "#### 4"
    assert "What is 2 + 2? Be brief." in tokenizer.decode(kept.rows[0].prompt_ids)


@pytest.mark.slow
def test_grpo_step_on_two_zero3_learners_equals_one_learner_and_kl_reference_is_the_base(model_path, tokenizer):
    import ray

    from rank1.core.workers import init_ray
    from rank1.core.flags import load_config
    from rank1.driver.run import make_learners
    from rank1.core.model import load_base
    from rank1.driver.grpo import split_rollouts
    from rank1.driver.run import make_objective
    from rank1.trainer.grpo import rollout_logprobs

    g = torch.Generator().manual_seed(0)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                             return_dict=False) for q in ("What is 3 + 4?", "Name a prime number.")]
    rows = []
    for i in range(4):  # 2 prompts x G = 2, completions of different lengths
        n = 3 + 2 * i
        rows.append({"prompt_ids": list(prompts[i // 2]), "completion_ids": torch.randint(100, 5000, (n,), generator=g).tolist(),
                     "engine_logprobs": (-torch.rand(n, generator=g) * 4).tolist(), "advantage": [1.0, -1.0, 0.7, -0.7][i]})
    common = ["--objective", "grpo", "--grpo.prompts_per_step", "2", "--grpo.num_generations", "2", "--trainer.micro_batch_size", "2",
              "--grpo.kl_coef", "0.1", "--grpo.updates_per_batch", "2", "--lr", "1e-2", "--max-steps", "1", "--output-dir", "unused",
              "--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "256"]
    ray.shutdown()
    results = {}
    try:
        # One learner (stage 0), then two sharding the base (ZeRO-3); all Ray actors, so that no
        # DeepSpeed process group outlives the test in this process.
        for name, extra in {"one": ["--trainer.num_learners", "1", "--trainer.zero_stage", "0"],
                            "two-zero3": ["--trainer.num_learners", "2", "--trainer.zero_stage", "3"]}.items():
            cfg = load_config(common + extra)
            init_ray(cfg.cluster)
            cfg.cluster.address = ray.get_runtime_context().gcs_address  # attached: learners are actors
            objective = make_objective(cfg)
            norm = objective.normalizer(rows)
            learners = make_learners(cfg, model_path, 2, objective)
            try:
                shards = split_rollouts(rows, learners.size, 2 // learners.size, objective.collate, tokenizer.pad_token_id)
                # a micro-batch is one group: its prompt runs once, and its keys and values serve both rows
                assert all(len(mb["prompt_rows"]) == 1 and len(mb["advantages"]) == 2 for shard in shards for mb in shard)
                for shard, old, ref in zip(shards, learners.call("rollout_logprobs", per_rank=[(s, True) for s in shards]),
                                           learners.call("rollout_logprobs", per_rank=[(s, False) for s in shards])):
                    for mb, o, r in zip(shard, old, ref):
                        mb["old_logprobs"], mb["ref_logprobs"] = o, r
                steps = [learners.call("train_step", per_rank=[(s, norm) for s in shards]) for _ in range(2)]
                after = learners.call("rollout_logprobs", per_rank=[(s, False) for s in shards])
                results[name] = {"adapter": learners.call("adapter_tensors")[0], "shards": shards, "ref_after": after,
                                 "loss": sum(r["loss_sum"] for r in steps[0]) / norm, "grad_norm": steps[0][0]["grad_norm"]}
            finally:
                learners.shutdown()
    finally:
        ray.shutdown()
    # The loss and the gradient norm (Adam's step hides a gradient's scale; these do not), then the adapter.
    assert results["one"]["loss"] == pytest.approx(results["two-zero3"]["loss"], rel=1e-5, abs=1e-7)
    assert results["one"]["grad_norm"] == pytest.approx(results["two-zero3"]["grad_norm"], rel=1e-4)
    one, two = results["one"]["adapter"], results["two-zero3"]["adapter"]
    assert any(t.abs().max() > 1e-4 for k, t in one.items() if "lora_B" in k)  # the step moved the adapter
    # Adam's first steps are nearly sign(gradient): an element whose gradient is ~0 may move either way
    # on float noise, so compare the adapters as a whole: they differ by far less than the step moved them.
    assert one.keys() == two.keys()
    diff = torch.sqrt(sum(((one[k] - two[k]) ** 2).sum() for k in one))
    moved = torch.sqrt(sum((one[k] ** 2).sum() for k in one if "lora_B" in k))  # B starts at 0
    assert diff < 1e-2 * moved, (float(diff), float(moved))

    # The KL reference (adapter disabled inside the learner) is the plain base model, after training too.
    base = load_base(model_path, load_config([]).model, torch.float32).eval()
    for shard, ref in zip(results["one"]["shards"], results["one"]["ref_after"]):
        for mb, lp in zip(shard, ref):
            torch.testing.assert_close(lp, rollout_logprobs(base, mb), atol=1e-5, rtol=0)


@pytest.mark.slow
def test_grpo_preempted_and_resumed_is_bit_identical_and_async_resume_continues(tmp_path):
    # Synchronous rollouts: sampling is seeded per step and the engines get the restored adapter, so a
    # SIGTERM'd and resumed run ends with exactly the uninterrupted run's adapter.
    args = [*TINY, "--objective", "grpo", "--rollout.backend", "transformers", "--rewards.functions", "user_rewards:opens_with_to",
            "--grpo.prompts_per_step", "2", "--grpo.num_generations", "4", "--trainer.micro_batch_size", "4", "--lr", "5e-3",
            "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "4", "--eval.in_training", "false", "--max-steps", "4"]
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    assert run_train(*args, "--output-dir", str(straight)).returncode == 0
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([USER_REWARDS, str(REPO)])}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args, "--output-dir", str(stopped)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(stopped, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    resumed = run_train(*args, "--output-dir", str(stopped), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(stopped)] == [1, 2, 3, 4]
    assert any(not r["skipped"] for r in metrics(straight))  # the reward gave signal: updates happened
    a, b = adapter(straight), adapter(stopped)
    assert all(torch.equal(a[k], b[k]) for k in a)

    # Async generation: the batch in flight at the stop is regenerated (from the restored adapter) and the run
    # continues to the end with every step once.
    async_run = tmp_path / "async"
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args, "--rollout.async", "true", "--output-dir", str(async_run)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(async_run, 2, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    resumed = run_train(*args, "--rollout.async", "true", "--output-dir", str(async_run), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in metrics(async_run)] == [1, 2, 3, 4]
    assert all(torch.isfinite(t).all() for t in adapter(async_run).values())
