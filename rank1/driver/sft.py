"""The SFT loop: rows of the data set -> micro-batches on every learner -> one optimizer step each.

Data order is a pure function of (seed, step), so a resumed run sees exactly the rows it would have.
"""

from __future__ import annotations

import math
import time

from rank1.core.data import global_batch, load_sft_data
from rank1.driver.loop import RunState, StepLoop


def shard_rows(rows: list, world_size: int, micro_batch_size: int, collate, pad_id: int) -> list[list[dict]]:
    """Global batch -> per-rank lists of collated micro-batches (rank r takes a contiguous slice)."""
    per_rank = len(rows) // world_size
    shards = [rows[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    return [[collate(s[i : i + micro_batch_size], pad_id) for i in range(0, len(s), micro_batch_size)] for s in shards]


class SFTRows:
    """An SFT job's data side, whatever its learners: the rows, the steps, and no engines to open."""

    def __init__(self, cfg, tokenizer):
        self.cfg, self.pad_id = cfg, tokenizer.pad_token_id
        self.data = load_sft_data(cfg.data, tokenizer)
        t = cfg.trainer
        self.total_steps = self.optimizer_steps = t.max_steps or max(1, math.ceil(t.epochs * len(self.data.examples) / t.global_batch_size))

    def describe(self) -> str:
        return self.data.describe()

    def open(self) -> None:
        pass

    def close(self) -> None:
        pass


class SFTJob(SFTRows):
    curve = ("loss", "completion loss", "loss.png")

    def __init__(self, cfg, model_path: str, tokenizer, objective):
        super().__init__(cfg, tokenizer)
        self.objective = objective

    def loop(self, run: RunState) -> None:
        cfg, t, learners, examples = self.cfg, self.cfg.trainer, run.learners, self.data.examples
        loop = StepLoop(run, "sft")
        for step in loop.steps():
            rows = [examples[i] for i in global_batch(len(examples), cfg.seed, step, t.global_batch_size)]
            shards = shard_rows(rows, learners.size, t.micro_batch_size, self.objective.collate, self.pad_id)
            norm = self.objective.normalizer(rows)
            results = learners.call("train_step", per_rank=[(shard, norm) for shard in shards])
            seconds = time.perf_counter() - loop.began
            tokens = sum(r["tokens"] for r in results)
            record = {"step": step + 1, "loss": sum(r["loss_sum"] for r in results) / norm, "lr": results[0]["lr"],
                      "grad_norm": results[0]["grad_norm"], "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
                      "nonfinite": any(r["nonfinite"] for r in results)}
            loop.end_step(step, record, loss=record["loss"], lr=record["lr"], tok_s=round(record["tokens_per_s"]))
