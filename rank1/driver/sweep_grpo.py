"""A GRPO sweep: every run's rollouts from one engine group that serves all runs' adapters at once.

Each engine holds one LoRA slot per run (vLLM's max_loras; PEFT adapters on the transformers backend;
merged mode serves one adapter, so a sweep serves through LoRA). Per step, every run samples its own
prompts (its seed's data order), all of them go to the engines in one call, each prompt through its run's
slot; the reward pool grades them all, advantages are taken within each run's groups, and the shared
learners update every run at once (rank1.driver.sweep). Then each run's adapter goes to its slot and
is proven there against that run's own probe.
"""

from __future__ import annotations

import dataclasses
import math
import time

import torch

from rank1.core.config import ConfigError
from rank1.core.data import global_batch, load_prompt_data
from rank1.driver.grpo import learned_rows, rollout_rows, split_rollouts, step_record
from rank1.driver.loop import RunState, StepLoop
from rank1.driver.rollouts import RolloutBatch, lora_rank, probe_tolerance, push_learner_adapter, rollout_seed
from rank1.rollout.engine import SamplingSpec, probe_token_ids


# step_record fields that need per-run sums the learners do not split out (clip fraction, KL, entropy, weights)
PER_BATCH_ONLY = ("step", "clip_fraction", "kl", "entropy", "train_tokens_per_s", "is_mean", "is_min", "is_max")


class GRPOSweep:
    curve = ("reward_mean", "mean reward")

    def __init__(self, cfg, runs, model_path: str, tokenizer):
        from rank1.trainer.grpo import GRPOObjective

        self.cfg, self.runs, self.model_path, self.tokenizer = cfg, runs, model_path, tokenizer
        self.pad_id, n = tokenizer.pad_token_id, len(runs)
        r, g = cfg.rollout, cfg.grpo
        if g.updates_per_batch > 1 or g.kl_coef:
            raise ConfigError("rank1 sweep: GRPO sweeps take one update per rollout batch and no KL term "
                              "(grpo.updates_per_batch 1, grpo.kl_coef 0); run those settings with rank1 train")
        if r.max_adapters not in (1, n) and r.max_adapters < n:
            raise ConfigError(f"rank1 sweep: {n} runs need {n} adapter slots per engine, rollout.max_adapters is {r.max_adapters}")
        # One LoRA slot per run; merged weights can hold only one adapter.
        cfg.rollout = dataclasses.replace(r, adapter_mode="lora", max_adapters=max(n, r.max_adapters))
        max_prompt = min(cfg.data.max_length, r.max_model_len - cfg.grpo.max_completion_length)
        self.data = load_prompt_data(cfg.data, tokenizer, max_prompt, cfg.grpo.instruction)
        t = cfg.trainer
        self.total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(self.data.rows) / g.prompts_per_step))
        one = GRPOObjective.from_config(cfg)
        self.objective = dataclasses.replace(one, rows_per_step=one.rows_per_step * n)
        self.optimizer_steps = self.total_steps * g.updates_per_batch
        self.engines = self.rewards = None

    def describe(self) -> str:
        return self.data.describe()

    def open(self) -> None:
        from rank1.core.workers import init_ray
        from rank1.rewards.pool import RewardPool
        from rank1.rollout.actors import EngineGroup

        init_ray(self.cfg.cluster)
        self.engines = EngineGroup.from_config(self.cfg.rollout, self.model_path, seed=self.cfg.seed, model=self.cfg.model,
                                               max_lora_rank=lora_rank(self.cfg))
        self.rewards = RewardPool(self.cfg.rewards)
        self.probe_ids, self.atol = probe_token_ids(self.tokenizer), probe_tolerance(self.cfg)
        self.last_probes: list = [None] * len(self.runs)

    def close(self) -> None:
        if self.engines is not None:
            self.engines.shutdown()
        if self.rewards is not None:
            self.rewards.close()

    def make_learners(self):
        from rank1.driver.sweep import make_sweep_learners

        return make_sweep_learners(self.cfg, self.runs, self.model_path, self.objective, self.optimizer_steps)

    def sync(self, learners, version: int) -> float:
        began = time.perf_counter()
        for run in range(len(self.runs)):
            _, self.last_probes[run] = push_learner_adapter(self.engines, learners, self.probe_ids, self.atol, version,
                                                            self.last_probes[run], run=run)
        return time.perf_counter() - began

    def sample(self, step: int) -> list[RolloutBatch]:
        """Every run's rollout batch, generated in one call (each prompt through its run's slot) and graded together."""
        g = self.cfg.grpo
        rows = [[self.data.rows[i] for i in global_batch(len(self.data.rows), r.seed, step, g.prompts_per_step)] for r in self.runs]
        prompts = [row.prompt_ids for run_rows in rows for row in run_rows]
        slots = [run for run, run_rows in enumerate(rows) for _ in run_rows]
        began = time.perf_counter()
        sampling = SamplingSpec(n=g.num_generations, max_new_tokens=g.max_completion_length, temperature=g.temperature,
                                top_p=g.top_p, seed=rollout_seed(self.cfg.seed, step),
                                slot_seeds=tuple(rollout_seed(r.seed, step) for r in self.runs))  # each run's solo sampling seed
        completions = self.engines.generate(prompts, sampling, slots)
        generated = time.perf_counter()
        flat = [row for run_rows in rows for row in run_rows]
        results = self.rewards.score([(flat[c.prompt_index].gold, c.text) for c in completions])
        graded = time.perf_counter()
        batches, per_run = [], g.prompts_per_step * g.num_generations
        for run in range(len(self.runs)):
            mine = range(run * per_run, (run + 1) * per_run)  # completions come back in prompt order, G per prompt
            math_ok = [results[i].components.get("math", results[i].reward) > 0 for i in mine]
            batches.append(RolloutBatch(step, [flat[completions[i].prompt_index].prompt_ids for i in mine], [completions[i] for i in mine],
                                        torch.tensor([results[i].reward for i in mine], dtype=torch.float32), sum(math_ok) / len(math_ok),
                                        sum(results[i].status != "ok" for i in mine), generated - began, graded - generated))
        return batches

    def loop(self, run: RunState) -> None:
        cfg, learners, n = self.cfg, run.learners, len(self.runs)
        micro = cfg.grpo.prompts_per_step * cfg.grpo.num_generations // (cfg.trainer.micro_batch_size * learners.size)
        self.sync(learners, run.start)
        loop = StepLoop(run, "grpo sweep")
        for step in loop.steps():
            batches = self.sample(step)
            learn_began = time.perf_counter()
            rows_per_run = [rollout_rows(b, cfg)[0] for b in batches]
            skipped = all(not rows or all(r["advantage"] == 0 for r in rows) for rows in rows_per_run) and cfg.grpo.kl_coef == 0
            results = [] if skipped else self.update(learners, rows_per_run, micro)
            learn_s = time.perf_counter() - learn_began
            sync_s = self.sync(learners, step + 1)
            per_run = []
            for i, batch in enumerate(batches):
                stats = {}
                if results:
                    first = results[0]
                    gaps = [gap for r in results for gap, k in zip(r["row_engine_gap"], r["row_run"]) if k == i and self._has_rows[i]]
                    stats = {"loss": sum(l for r in results for l, k in zip(r["row_loss"], r["row_run"]) if k == i) / self._norms[i],
                             "lr": first["lrs"][i], "grad_norm": first["group_grad_norms"][i], "nonfinite": first["run_nonfinite"][i],
                             "engine_logprob_gap_max": max(gaps, default=0.0)}
                times = {"generate": batch.generate_s, "reward": batch.reward_s, "learn": learn_s, "sync": sync_s}
                record = step_record(step, batch, stats, 0, skipped, times, time.perf_counter() - loop.began)
                if "engine_logprob_gap_max" in stats:
                    record["engine_logprob_gap_max"] = stats["engine_logprob_gap_max"]
                per_run.append({k: v for k, v in record.items() if k not in PER_BATCH_ONLY})
            record = {"step": step + 1, "runs": per_run, "skipped": skipped, "seconds": time.perf_counter() - loop.began,
                      "nonfinite": any(r["nonfinite"] for r in per_run)}
            loop.end_step(step, record, reward=max(r["reward_mean"] for r in per_run))

    def update(self, learners, rows_per_run: list[list[dict]], micro: int) -> list[dict]:
        """One optimizer step for every run: each run's rows split as its solo learners would, weighted by its normalizer."""
        shards: list[list[dict]] = [[] for _ in range(learners.size)]
        self._norms, self._has_rows = [], [bool(rows) for rows in rows_per_run]
        spare = next(r for rows in rows_per_run for r in rows)
        for run, rows in enumerate(rows_per_run):
            # A run left without rows (every group filtered) still runs its micro-batches, at weight 0: under
            # ZeRO-3 every forward is a collective and DeepSpeed counts them to its accumulation boundary.
            rows, norm = learned_rows(rows, self.objective, self.cfg.grpo)  # as a solo run skips zero-advantage rows
            rows = rows or [dict(spare, advantage=0.0, weight=0.0)]
            self._norms.append(norm)
            for rank, batches in enumerate(split_rollouts(rows, learners.size, micro, self.objective.collate, self.pad_id)):
                for b in batches:
                    b["run"] = torch.full((len(b["advantages"]),), run, dtype=torch.long)
                    b["row_weight"] = torch.full((len(b["advantages"]),), 1.0 / norm)
                    shards[rank].append(b)
        for _ in range(self.cfg.grpo.updates_per_batch):
            results = learners.call("train_step", per_rank=[(shard, 1.0) for shard in shards])
        return results
