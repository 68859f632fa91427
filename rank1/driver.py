"""The driver: the one process that owns the training loop and knows every role.

    config -> data -> learner group -> steps (-> checkpoints) -> final adapter

It pulls each global batch (SFT: rows of the data set; GRPO: rollouts, see rank1.grpo_loop), splits
it over learners and micro-batches, collects metrics, writes checkpoints atomically and the final
PEFT adapter. Learners are an actor group (rank1.actors): in this
process for one local learner, Ray actors otherwise.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from rank1.actors import LocalGroup, RayGroup, WorkerDied, free_port, init_ray, rendezvous_port
from rank1.config import Config, ConfigError, to_yaml
from rank1.data import collate, global_batch, load_prompt_data, load_sft_data
from rank1.export import check_push_ready, push_run
from rank1.grpo_loop import Rollouts, run_grpo_steps
from rank1.metrics import MetricsSink, plot_curve
from rank1.model import count_adapters_from_config, load_tokenizer, resolve_model_path
from rank1.trainer.learner import Learner, Placement
from rank1.trainer.sft import count_target_tokens

CHECKPOINTS = "checkpoints"


def log(message: str) -> None:
    tqdm.write(f"[rank1] {message}", file=sys.stderr)


# ---------------------------------------------------------------- run directory and checkpoints


def prepare_output_dir(cfg: Config) -> Path:
    out = Path(cfg.logging.output_dir)
    has_state = (out / CHECKPOINTS).is_dir() and any((out / CHECKPOINTS).glob("step-*"))
    if cfg.trainer.resume and not has_state:
        raise ConfigError(f"--resume: {out} has no complete checkpoint to resume from")
    if not cfg.trainer.resume and (has_state or (out / "adapter").exists()):
        raise ConfigError(f"--output-dir {out} already holds a run; pass --resume to continue it or choose another directory")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(cfg))
    return out


def latest_checkpoint(out: Path) -> Path | None:
    """The newest complete checkpoint; incomplete ones are temp folders never renamed into place."""
    done = sorted((out / CHECKPOINTS).glob("step-*"))
    return done[-1] if done else None


def restore_point(out: Path) -> int:
    """The step of the newest complete checkpoint, 0 when there is none."""
    checkpoint = latest_checkpoint(out)
    return json.loads((checkpoint / "trainer_state.json").read_text())["step"] if checkpoint else 0


def save_checkpoint(out: Path, step: int, learners, keep: int) -> Path:
    root = out / CHECKPOINTS
    final, tmp = root / f"step-{step:06d}", root / f".tmp-step-{step:06d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    learners.call("save_checkpoint", str(tmp))
    learners.call("save_adapter", str(tmp / "adapter"))
    (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "rows_seen": step}))
    tmp.rename(final)  # the checkpoint exists only once it is whole
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------- learners


def make_learners(cfg: Config, model_path: str, total_steps: int):
    n = cfg.trainer.num_learners
    if n == 1 and not (cfg.cluster.address or os.environ.get("RAY_ADDRESS")):
        return LocalGroup(Learner, (cfg, model_path, Placement(0, 1, "127.0.0.1", free_port()), total_steps))
    init_ray(cfg.cluster)
    port: list[int] = []

    def args(rank: int, ips: list[str]):
        port or port.append(rendezvous_port(ips[0]))
        local_rank = ips[:rank].count(ips[rank])
        return (cfg, model_path, Placement(rank, n, ips[0], port[0], local_rank), total_steps)

    group = RayGroup(
        Learner, n, args, num_cpus=cfg.cluster.cpus_per_learner, num_gpus=cfg.cluster.gpus_per_learner, strategy=cfg.cluster.placement
    )
    log("learners placed " + ", ".join(f"rank {r} on node {node[:12]}" for r, node in enumerate(group.node_ids())))
    return group


def split_batch(rows: list, world_size: int, micro_batch_size: int, pad_id: int) -> list[list[dict]]:
    """Global batch -> per-rank lists of collated micro-batches (rank r takes a contiguous slice)."""
    per_rank = len(rows) // world_size
    shards = [rows[r * per_rank : (r + 1) * per_rank] for r in range(world_size)]
    return [[collate(s[i : i + micro_batch_size], pad_id) for i in range(0, len(s), micro_batch_size)] for s in shards]


# ---------------------------------------------------------------- the loop


def train(cfg: Config) -> Path:
    """Run one training job; SFT and GRPO share everything but the batch source and the loss."""
    t = cfg.trainer
    grpo = t.objective == "grpo"
    # Everything that can reject the input runs before the run directory is touched.
    model_path = resolve_model_path(cfg.model)
    log(f"model {cfg.model.name_or_path}: {count_adapters_from_config(model_path, cfg.adapter, cfg.model.trust_remote_code).describe()}")
    tokenizer = load_tokenizer(model_path, cfg.model)
    if grpo:
        max_prompt = min(cfg.data.max_length, cfg.rollout.max_model_len - cfg.grpo.max_completion_length)
        data = load_prompt_data(cfg.data, tokenizer, max_prompt, cfg.grpo.instruction)
        total_steps = t.max_steps or max(1, math.ceil(t.epochs * len(data.rows) / cfg.grpo.prompts_per_step))
        optimizer_steps = total_steps * cfg.grpo.updates_per_batch
    else:
        data = load_sft_data(cfg.data, tokenizer)
        total_steps = optimizer_steps = t.max_steps or max(1, math.ceil(t.epochs * len(data.examples) / t.global_batch_size))
    log(data.describe())
    if cfg.export.push_to_hub:
        check_push_ready(cfg)  # a missing token fails now, not after hours of training
    out = prepare_output_dir(cfg)

    start = restore_point(out) if t.resume else 0
    rollouts = Rollouts(cfg, model_path, data, tokenizer) if grpo else None
    try:
        for attempt in range(cfg.cluster.max_learner_restarts + 1):
            learners = make_learners(cfg, model_path, optimizer_steps)
            sink = MetricsSink(cfg, out, start)
            try:
                if start:
                    checkpoint = latest_checkpoint(out)
                    learners.call("load_checkpoint", str(checkpoint))
                    log(f"resumed from {checkpoint} at step {start}")
                if grpo:
                    run_grpo_steps(cfg, out, learners, rollouts, tokenizer.pad_token_id, start, total_steps, save_checkpoint, sink)
                else:
                    run_steps(cfg, out, learners, data.examples, tokenizer.pad_token_id, start, total_steps, sink)
                learners.call("save_adapter", str(out / "adapter"))
                break
            except WorkerDied as e:
                if attempt == cfg.cluster.max_learner_restarts:
                    raise RuntimeError(f"learners died {attempt + 1} times (cluster.max_learner_restarts={attempt}); last: {e}") from e
                start = restore_point(out)
                log(f"{e}; restarting the learner group from step {start} (restart {attempt + 1} of {cfg.cluster.max_learner_restarts})")
            finally:
                sink.close()
                learners.shutdown()
    finally:
        if rollouts:
            rollouts.close()
    if grpo:
        plot_curve(out / "metrics.jsonl", out / "reward.png", "reward_mean", "mean reward", "rank1 GRPO")
    else:
        plot_curve(out / "metrics.jsonl", out / "loss.png", "loss", "completion loss", "rank1 SFT")
    log(f"adapter saved to {out / 'adapter'}")
    if cfg.export.push_to_hub:
        log(f"pushed {push_run(out, cfg)} to {cfg.export.push_to_hub}")
    return out


def run_steps(cfg: Config, out: Path, learners, examples, pad_id: int, start: int, total_steps: int, sink: MetricsSink) -> None:
    t = cfg.trainer
    bar = tqdm(total=total_steps, initial=start, desc="sft", unit="step", disable=not cfg.logging.progress)
    for step in range(start, total_steps):
        began = time.perf_counter()
        rows = [examples[i] for i in global_batch(len(examples), cfg.seed, step, t.global_batch_size)]
        shards = split_batch(rows, learners.size, t.micro_batch_size, pad_id)
        target_tokens = sum(count_target_tokens(mb["labels"]) for shard in shards for mb in shard)
        results = learners.call("train_step", per_rank=[(shard, target_tokens) for shard in shards])
        seconds = time.perf_counter() - began
        tokens = sum(r["tokens"] for r in results)
        record = {
            "step": step + 1,
            "loss": sum(r["loss_sum"] for r in results) / target_tokens,
            "lr": results[0]["lr"],
            "grad_norm": results[0]["grad_norm"],
            "tokens": tokens,
            "tokens_per_s": tokens / seconds,
            "seconds": seconds,
        }
        if (step + 1) % cfg.logging.log_every == 0 or step + 1 == total_steps:
            sink.write(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        if t.checkpoint_every and (step + 1) % t.checkpoint_every == 0 and step + 1 < total_steps:
            save_checkpoint(out, step + 1, learners, t.keep_checkpoints)
    bar.close()
