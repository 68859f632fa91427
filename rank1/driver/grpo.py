"""The GRPO loop: sample prompts -> engines generate -> reward pool scores -> advantages -> learners
update -> adapter sync. It runs on the same driver, learners and loop tail as SFT (rank1.driver.run,
rank1.driver.loop); only the batch source (rank1.driver.rollouts) and the objective differ.

With rollout.async_generation the next batch is generated (and graded) while the learners update on
this one, so it comes from the adapter one version back; the truncated importance weights between the
engine's logprobs and the learner's correct for that, as they do for vLLM's numerics.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from rank1.core.data import load_prompt_data
from rank1.driver.loop import RunState, StepLoop
from rank1.driver.metrics import log
from rank1.driver.rollouts import RolloutBatch, Rollouts
from rank1.trainer.optim import merge_stats

STD_EPS = 1e-4  # TRL's: keeps a group with a tiny spread from exploding


# ---------------------------------------------------------------- advantages and learner inputs


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Rewards of consecutive groups of `group_size` completions -> advantages, TRL's way."""
    grouped = rewards.view(-1, group_size)
    centered = (grouped - grouped.mean(dim=1, keepdim=True)).view(-1)
    if scale == "group":
        return centered / (grouped.std(dim=1).repeat_interleave(group_size) + STD_EPS)
    if scale == "batch":
        return centered / (rewards.std() + STD_EPS)
    return centered


def rollout_rows(batch: RolloutBatch, cfg) -> tuple[list[dict], int]:
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


def learned_rows(rows: list[dict], objective, g) -> tuple[list[dict], float]:
    """The rows the learners must run, and the normalizer of the whole batch's loss.

    Without KL a row's loss is its advantage times ratio terms (times its importance weight), so a row
    whose advantage is exactly 0 has zero gradient under every aggregation: with
    grpo.skip_zero_advantage_rows it is not run, and the normalizer, taken over every row, still counts
    it, so the update is the all-rows one. With kl_coef > 0 every row is run (its KL term has a gradient).
    """
    norm = objective.normalizer(rows)
    if g.kl_coef != 0.0 or not g.skip_zero_advantage_rows:
        return rows, norm
    return [r for r in rows if r["advantage"] != 0.0], norm


def split_rollouts(rows: list[dict], world_size: int, micro_batches: int, collate, pad_id: int) -> list[list[dict]]:
    """Rows -> per-rank lists of exactly `micro_batches` collated micro-batches.

    Every rank must run the same number of forward passes (under ZeRO-3 each is a collective), even
    when group filtering left fewer rows: an empty slot gets a zero-weight copy of a row. Slots take
    consecutive rows (sizes differing by at most one), so a group's completions stay together and its
    prompt runs once per slot it spans (rank1.trainer.grpo.completion_logits).
    """
    n = world_size * micro_batches
    bounds = [len(rows) * k // n for k in range(n + 1)]
    slots = [rows[bounds[k] : bounds[k + 1]] for k in range(n)]
    for slot in slots:
        if not slot:
            slot.append(dict(rows[0], advantage=0.0, weight=0.0))
    collated = [collate(slot, pad_id) for slot in slots]
    if not any(len(b.get("prompt_rows", ())) < len(b["advantages"]) for b in collated):
        # No slot shares a prompt: one plain forward each, on every rank alike (under ZeRO-3 the ranks'
        # numbers of forwards must match, so this is decided here, for all of them).
        for b in collated:
            b.pop("prompt_rows", None)
    return [collated[r * micro_batches : (r + 1) * micro_batches] for r in range(world_size)]


# ---------------------------------------------------------------- the job


class GRPOJob:
    curve = ("reward_mean", "mean reward", "reward.png")

    def __init__(self, cfg, model_path: str, tokenizer, objective):
        self.cfg, self.objective, self.model_path, self.tokenizer = cfg, objective, model_path, tokenizer
        self.pad_id = tokenizer.pad_token_id
        max_prompt = min(cfg.data.max_length, cfg.rollout.max_model_len - cfg.grpo.max_completion_length)
        self.data = load_prompt_data(cfg.data, tokenizer, max_prompt, cfg.grpo.instruction)
        t, g = cfg.trainer, cfg.grpo
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(self.data.rows) / g.prompts_per_step))
        self.optimizer_steps = self.total_steps * g.updates_per_batch
        self.rollouts: Rollouts | None = None

    def describe(self) -> str:
        return self.data.describe()

    def open(self) -> None:
        self.rollouts = Rollouts(self.cfg, self.model_path, self.data, self.tokenizer)

    def close(self) -> None:
        if self.rollouts is not None:
            self.rollouts.close()

    def loop(self, run: RunState) -> None:
        cfg, g, learners, rollouts = self.cfg, self.cfg.grpo, run.learners, self.rollouts
        micro_batches = g.prompts_per_step * g.num_generations // (cfg.trainer.micro_batch_size * learners.size)
        rollouts.sync(learners, version=run.start)  # engines serve exactly what the learners hold (init, resume)
        pending = rollouts.submit(run.start) if cfg.rollout.async_generation else None
        loop = StepLoop(run, "grpo")
        for step in loop.steps():
            batch = pending.result() if pending else rollouts.sample(step)
            waited = time.perf_counter() - loop.began
            if pending and step + 1 < run.total:
                pending = rollouts.submit(step + 1)  # generated by this step's adapter while the learners update
            rows, filtered = rollout_rows(batch, cfg)
            learn_began = time.perf_counter()
            stats, skipped = {}, not rows or (all(r["advantage"] == 0 for r in rows) and g.kl_coef == 0)
            if not skipped:
                stats = self.update(learners, rows, micro_batches)
            learn_s = time.perf_counter() - learn_began
            sync_s = rollouts.sync(learners, version=step + 1)  # in async mode, waits for the batch in flight
            times = {"generate": batch.generate_s, "reward": batch.reward_s, "wait": waited, "learn": learn_s, "sync": sync_s}
            record = step_record(step, batch, stats, filtered, skipped, times, time.perf_counter() - loop.began)
            if skipped:
                log(f"step {step + 1}: every advantage is 0 (all rewards equal in every group); update skipped")
            loop.end_step(step, record, reward=record["reward_mean"], acc=record["accuracy"], len=round(record["response_length"]))

    def update(self, learners, rows: list[dict], micro_batches: int) -> dict:
        """grpo.updates_per_batch optimizer steps on one rollout batch; returns the last step's statistics."""
        g = self.cfg.grpo
        rows, norm = learned_rows(rows, self.objective, g)
        shards = split_rollouts(rows, learners.size, micro_batches, self.objective.collate, self.pad_id)
        if g.updates_per_batch > 1:  # the ratio's denominator must stay the sampling policy's across updates
            for shard, old in zip(shards, learners.call("rollout_logprobs", per_rank=[(s, True) for s in shards])):
                for mb, lp in zip(shard, old):
                    mb["old_logprobs"] = lp
        if g.kl_coef != 0.0:  # the reference: the same learner with its adapter disabled
            for shard, ref in zip(shards, learners.call("rollout_logprobs", per_rank=[(s, False) for s in shards])):
                for mb, lp in zip(shard, ref):
                    mb["ref_logprobs"] = lp
        for _ in range(g.updates_per_batch):
            results = learners.call("train_step", per_rank=[(shard, norm) for shard in shards])
        stats: dict = {}
        for r in results:
            merge_stats(stats, {k: v for k, v in r.items() if k not in ("lr", "grad_norm")})
        stats.update(lr=results[0]["lr"], grad_norm=results[0]["grad_norm"], loss=stats.pop("loss_sum") / norm, rows_learned=len(rows))
        return stats


def step_record(step: int, batch: RolloutBatch, stats: dict, filtered: int, skipped: bool, times: dict, seconds: float) -> dict:
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
        "rows_learned": stats.get("rows_learned", 0),
        "skipped": skipped,
        "nonfinite": bool(stats.get("nonfinite", False)),
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
