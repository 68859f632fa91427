"""The driver's GRPO loop: sample prompts -> engines generate -> reward pool scores -> advantages ->
learners update -> adapter sync. It runs on the same driver and learners as SFT (rank1.driver); only
the batch source (`Rollouts`) and the loss (rank1.trainer.grpo) differ.

With rollout.async_generation the next batch is generated (and graded) while the learners update on
this one, so it comes from the adapter one version back; the truncated importance weights between the
engine's logprobs and the learner's correct for that, as they do for vLLM's numerics.
"""

from __future__ import annotations

import statistics
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from rank1.actors import init_ray
from rank1.config import Config
from rank1.data import PromptData, global_batch
from rank1.model import lora_config
from rank1.rewards.pool import RewardPool
from rank1.rollout.actors import EngineGroup
from rank1.rollout.engine import SamplingSpec, probe_token_ids
from rank1.trainer.grpo import collate_rollouts, group_advantages, normalizer
from rank1.trainer.learner import merge_stats

# How far an engine's probe logprobs may be from the learner's after a sync: fp32 engines agree to
# ~1e-5; bf16 weights move logprobs by up to ~0.2 on SmolLM2, which still tells versions apart.
PROBE_ATOL = {"float32": 1e-3, "bfloat16": 0.3}


@dataclass
class RolloutBatch:
    step: int
    prompt_ids: list[list[int]]  # one per completion (repeated G times)
    completions: list  # rank1.rollout.engine.Completion, G consecutive per prompt
    rewards: torch.Tensor  # (P * G,)
    accuracy: float  # share of completions the 'math' grader accepted (reward > 0 without it)
    reward_errors: int  # timeouts and errors (reward 0)
    generate_s: float
    reward_s: float


class Rollouts:
    """GRPO's batch source: the prompts, a group of rollout engines and the reward pool."""

    def __init__(self, cfg: Config, model_path: str, data: PromptData, tokenizer):
        init_ray(cfg.cluster)
        self.cfg, self.data = cfg, data
        self.probe_ids = probe_token_ids(tokenizer)
        self.peft_config = lora_config(cfg.adapter).to_dict()
        self.engines = EngineGroup.from_config(cfg.rollout, model_path, seed=cfg.seed)
        try:
            self.rewards = RewardPool(cfg.rewards)
        except BaseException:
            self.engines.shutdown()
            raise
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")

    def sample(self, step: int) -> RolloutBatch:
        g = self.cfg.grpo
        rows = [self.data.rows[i] for i in global_batch(len(self.data.rows), self.cfg.seed, step, g.prompts_per_step)]
        began = time.perf_counter()
        sampling = SamplingSpec.from_config(self.cfg.rollout, n=g.num_generations, max_new_tokens=g.max_completion_length,
                                            seed=self.cfg.seed * 100_003 + step)
        completions = self.engines.generate([r.prompt_ids for r in rows], sampling)
        generated = time.perf_counter()
        results = self.rewards.score([(rows[c.prompt_index].gold, c.text) for c in completions])
        graded = time.perf_counter()
        math_ok = [r.components.get("math", r.reward) > 0 for r in results]
        return RolloutBatch(
            step=step,
            prompt_ids=[rows[c.prompt_index].prompt_ids for c in completions],
            completions=completions,
            rewards=torch.tensor([r.reward for r in results], dtype=torch.float32),
            accuracy=sum(math_ok) / len(math_ok),
            reward_errors=sum(r.status != "ok" for r in results),
            generate_s=generated - began,
            reward_s=graded - generated,
        )

    def submit(self, step: int) -> Future:
        """sample(step) in the background: engines and graders work while the learners update."""
        return self._executor.submit(self.sample, step)

    def sync(self, learners, version: int) -> float:
        """Send the learners' adapter (tensors only) to every engine; each proves it serves it."""
        began = time.perf_counter()
        tensors = learners.call("adapter_tensors")[0]
        expected = learners.call("sequence_logprobs", self.probe_ids)[0]
        self.engines.push_adapter(tensors, self.peft_config, version, expected_probe=expected,
                                  atol=PROBE_ATOL.get(self.cfg.rollout.dtype, 1e-3))
        return time.perf_counter() - began

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self.engines.shutdown()
        self.rewards.close()


# ---------------------------------------------------------------- a rollout batch -> learner inputs


def rollout_rows(batch: RolloutBatch, cfg: Config) -> tuple[list[dict], int]:
    """Completions with their advantages, minus filtered groups; and the number of groups filtered."""
    g = cfg.grpo
    advantages = group_advantages(batch.rewards, g.num_generations, g.scale_rewards)
    spread = batch.rewards.view(-1, g.num_generations).std(dim=1)
    rows, filtered = [], 0
    for group in range(len(spread)):
        if g.filter_equal_groups and spread[group] == 0:
            filtered += 1
            continue
        for i in range(group * g.num_generations, (group + 1) * g.num_generations):
            c = batch.completions[i]
            rows.append({"prompt_ids": batch.prompt_ids[i], "completion_ids": c.token_ids,
                         "engine_logprobs": c.logprobs, "advantage": float(advantages[i])})
    return rows, filtered


def split_rollouts(rows: list[dict], world_size: int, micro_batches: int, pad_id: int) -> list[list[dict]]:
    """Rows -> per-rank lists of exactly `micro_batches` collated micro-batches.

    Every rank must run the same number of forward passes (under ZeRO-3 each is a collective), even
    when group filtering left fewer rows: an empty slot gets a zero-weight copy of a row.
    """
    slots: list[list[dict]] = [[] for _ in range(world_size * micro_batches)]
    for i, row in enumerate(rows):
        slots[i % len(slots)].append(row)
    for slot in slots:
        if not slot:
            slot.append(dict(rows[0], advantage=0.0, weight=0.0))
    collated = [collate_rollouts(slot, pad_id) for slot in slots]
    return [collated[r * micro_batches : (r + 1) * micro_batches] for r in range(world_size)]


# ---------------------------------------------------------------- the loop


def run_grpo_steps(cfg: Config, out: Path, learners, rollouts: Rollouts, pad_id: int, start: int, total_steps: int,
                   save_checkpoint, sink) -> None:
    g, t = cfg.grpo, cfg.trainer
    micro_batches = g.prompts_per_step * g.num_generations // (t.micro_batch_size * learners.size)
    rollouts.sync(learners, version=start)  # engines serve exactly what the learners hold (init, resume)
    bar = tqdm(total=total_steps, initial=start, desc="grpo", unit="step", disable=not cfg.logging.progress)
    pending = rollouts.submit(start) if cfg.rollout.async_generation else None
    for step in range(start, total_steps):
        began = time.perf_counter()
        batch = pending.result() if pending else rollouts.sample(step)
        waited = time.perf_counter() - began
        if pending and step + 1 < total_steps:
            pending = rollouts.submit(step + 1)  # generated by this step's adapter while the learners update
        rows, filtered = rollout_rows(batch, cfg)
        learn_began = time.perf_counter()
        stats, skipped = {}, not rows or (all(r["advantage"] == 0 for r in rows) and g.kl_coef == 0)
        if not skipped:
            stats = update(cfg, learners, rows, micro_batches, pad_id)
        learn_s = time.perf_counter() - learn_began
        sync_s = rollouts.sync(learners, version=step + 1)  # in async mode, waits for the batch in flight
        record = step_record(step, batch, stats, filtered, skipped,
                             times={"generate": batch.generate_s, "reward": batch.reward_s, "wait": waited, "learn": learn_s, "sync": sync_s},
                             seconds=time.perf_counter() - began)
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == total_steps:
            sink.write(record)
        bar.set_postfix(reward=f"{record['reward_mean']:.3f}", acc=f"{record['accuracy']:.2f}", len=f"{record['response_length']:.0f}")
        bar.update(1)
        if skipped:
            tqdm.write(f"[rank1] step {step + 1}: every advantage is 0 (all rewards equal in every group); update skipped",
                       file=sys.stderr)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, learners, t.keep_checkpoints)
    bar.close()


def update(cfg: Config, learners, rows: list[dict], micro_batches: int, pad_id: int) -> dict:
    """grpo.updates_per_batch optimizer steps on one rollout batch; returns the last step's statistics."""
    g = cfg.grpo
    shards = split_rollouts(rows, learners.size, micro_batches, pad_id)
    if g.updates_per_batch > 1:  # the ratio's denominator must stay the sampling policy's across updates
        for shard, old in zip(shards, learners.call("rollout_logprobs", per_rank=[(s, True) for s in shards])):
            for mb, lp in zip(shard, old):
                mb["old_logprobs"] = lp
    if g.kl_coef != 0.0:
        for shard, ref in zip(shards, learners.call("rollout_logprobs", per_rank=[(s, False) for s in shards])):
            for mb, lp in zip(shard, ref):
                mb["ref_logprobs"] = lp
    norm = normalizer(g.aggregation, [len(r["completion_ids"]) for r in rows], cfg.grpo.max_completion_length)
    for _ in range(g.updates_per_batch):
        results = learners.call("train_step", per_rank=[(shard, norm) for shard in shards])
    stats: dict = {}
    for r in results:
        merge_stats(stats, {k: v for k, v in r.items() if k not in ("lr", "grad_norm")})
    stats.update(lr=results[0]["lr"], grad_norm=results[0]["grad_norm"], loss=stats.pop("loss_sum") / norm)
    return stats


def step_record(step: int, batch: RolloutBatch, stats: dict, filtered: int, skipped: bool,
                times: dict, seconds: float) -> dict:
    lengths = [len(c.token_ids) for c in batch.completions]
    tokens = max(1.0, stats.get("completion_tokens", 0.0))
    record = {
        "step": step + 1,
        "reward_mean": float(batch.rewards.mean()),
        "reward_std": float(batch.rewards.std()),
        "accuracy": batch.accuracy,
        "reward_errors": batch.reward_errors,
        "response_length": statistics.fmean(lengths),
        "truncated": sum(c.finish_reason == "length" for c in batch.completions) / len(lengths),
        "groups_filtered": filtered,
        "skipped": skipped,
        "loss": stats.get("loss", 0.0),
        "lr": stats.get("lr"),
        "grad_norm": stats.get("grad_norm"),
        "clip_fraction": stats.get("clipped_sum", 0.0) / tokens,
        "kl": stats.get("kl_sum", 0.0) / tokens,
        "entropy": stats.get("entropy_sum", 0.0) / tokens,
        "generate_tokens_per_s": sum(lengths) / max(batch.generate_s, 1e-9),
        "train_tokens_per_s": stats.get("tokens", 0) / max(times["learn"], 1e-9),
        "seconds": seconds,
        **{f"time_{k}": v for k, v in times.items()},
    }
    if "is_sum" in stats:
        record.update(is_mean=stats["is_sum"] / tokens, is_min=stats["is_min"], is_max=stats["is_max"])
    return record


