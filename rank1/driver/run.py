"""The driver: the one process that owns a training run and knows every role.

    config -> objective -> data -> learner group -> the objective's loop (-> checkpoints) -> final adapter

The objective (SFT or GRPO) is chosen here and only here (`JOBS`); everything after is the same for
both: the learner group (rank1.core.workers: in this process for one local learner, Ray actors
otherwise), restarts from the last checkpoint when a learner dies, pre-emption by SIGTERM, the run
directory, the final adapter and the Hub push.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from rank1.core.config import Config
from rank1.core.model import count_adapters_from_config, load_tokenizer, resolve_model_path
from rank1.core.workers import LocalGroup, WorkerDied, WorkerGroup, free_port, init_ray, rendezvous_port
from rank1.driver.checkpoints import latest_checkpoint, prepare_output_dir, restore_point
from rank1.driver.eval_compare import paired_interval
from rank1.driver.grpo import GRPOJob
from rank1.driver.loop import RunState, job_session
from rank1.driver.metrics import MetricsSink, log, plot_curve, read_metrics
from rank1.driver.sft import SFTJob
from rank1.export import check_push_ready, push_run
from rank1.trainer.grpo import GRPOObjective
from rank1.trainer.learner import Learner, Placement
from rank1.trainer.sft import SFTObjective

# The driver's choice of objective: the loss object the learners run, and the job that feeds them.
JOBS = {"sft": (SFTObjective, SFTJob), "grpo": (GRPOObjective, GRPOJob)}


def make_objective(cfg: Config):
    """The objective object for trainer.objective; its own checks (batch split, lengths) run here."""
    objective_cls, _ = JOBS[cfg.trainer.objective]
    return objective_cls.from_config(cfg)


def uses_ray(cfg: Config) -> bool:
    return cfg.trainer.num_learners > 1 or bool(cfg.cluster.address or os.environ.get("RAY_ADDRESS"))


def make_learners(cfg: Config, model_path: str, total_steps: int, objective=None, actor_cls=None):
    """The learner group: one in this process, or Ray actors in a placement group (actor_cls: --dry-run's probe)."""
    objective = objective or make_objective(cfg)
    learner_cls = Learner
    if cfg.adapter.full_finetune:  # the baseline that trains every weight
        from rank1.trainer.full_learner import FullLearner as learner_cls
    return learner_group(cfg, learner_cls, lambda placement: (cfg.model, cfg.adapter, cfg.trainer, objective, model_path,
                                                             placement, total_steps, cfg.seed), actor_cls)


def learner_group(cfg: Config, learner_cls, make_args, actor_cls=None):
    """`learner_cls(*make_args(placement))` for each of trainer.num_learners ranks: in this process for one
    local learner, else Ray actors in a placement group; with actor_cls, that class gets the placement alone."""
    n = cfg.trainer.num_learners
    if not uses_ray(cfg) and actor_cls is None:
        return LocalGroup(learner_cls, make_args(Placement(0, 1, "127.0.0.1", free_port())))
    init_ray(cfg.cluster)
    port: list[int] = []

    def args(rank: int, ips: list[str]):
        port or port.append(rendezvous_port(ips[0]))
        placement = Placement(rank, n, ips[0], port[0], ips[:rank].count(ips[rank]))
        return (placement,) if actor_cls is not None else make_args(placement)

    group = WorkerGroup(actor_cls or learner_cls, n, args, num_cpus=cfg.cluster.cpus_per_learner, num_gpus=cfg.cluster.gpus_per_learner,
                        placement=cfg.cluster.placement, name="learner")
    if actor_cls is None:
        log("learners placed " + ", ".join(f"rank {r} on node {node[:12]}" for r, node in enumerate(group.node_ids())))
    return group


def train(cfg: Config) -> Path:
    """Run one training job; SFT and GRPO share everything but the batch source and the loss."""
    t = cfg.trainer
    objective = make_objective(cfg)
    if t.dry_run:
        from rank1.driver.placement import dry_run

        return dry_run(cfg, objective)
    # Everything that can reject the input runs before the run directory is touched.
    model_path = resolve_model_path(cfg.model)
    if cfg.adapter.full_finetune:
        from rank1.core.model import parameter_count_from_config

        log(f"model {cfg.model.name_or_path}: full fine-tune baseline, all {parameter_count_from_config(model_path):,} weights trained")
    else:
        log(f"model {cfg.model.name_or_path}: {count_adapters_from_config(model_path, cfg.adapter, cfg.model.trust_remote_code).describe()}")
    tokenizer = load_tokenizer(model_path, cfg.model)
    job = JOBS[objective.name][1](cfg, model_path, tokenizer, objective)
    log(job.describe())
    evalset = None
    if cfg.eval.in_training:
        from rank1.driver.evaluate import build_eval_set

        evalset = build_eval_set(cfg, tokenizer, run=cfg)  # its prompts as the run trains (and its errors, before any work)
    if cfg.export.push_to_hub:
        check_push_ready(cfg)  # a missing token fails now, not after hours of training
    out = prepare_output_dir(cfg)
    artifact = "model" if cfg.adapter.full_finetune else "adapter"  # the full fine-tune baseline writes the whole model

    start = restore_point(out) if t.resume else 0
    began = time.perf_counter()
    with job_session(job, lambda: make_heldout(cfg, model_path, tokenizer, evalset, job, out)) as (signals, heldout):
        for attempt in range(cfg.cluster.max_learner_restarts + 1):
            learners = make_learners(cfg, model_path, job.optimizer_steps, objective)
            sink = MetricsSink(cfg, out, start)
            try:
                if start:
                    checkpoint = latest_checkpoint(out)
                    learners.call("load_checkpoint", str(checkpoint))
                    log(f"resumed from {checkpoint} at step {start}")
                evaluate = (lambda step, learners=learners: heldout(learners, step)) if heldout else None
                job.loop(RunState(cfg, out, learners, sink, start, job.total_steps, signals, evaluate))
                learners.call("save_adapter", str(out / artifact))
                break
            except WorkerDied as e:
                if attempt == cfg.cluster.max_learner_restarts:
                    raise RuntimeError(f"learners died {attempt + 1} times (cluster.max_learner_restarts={attempt}); last: {e}") from e
                start = restore_point(out)
                log(f"{e}; restarting the learner group from step {start} (restart {attempt + 1} of {cfg.cluster.max_learner_restarts})")
            finally:
                sink.close()
                learners.shutdown()
    key, label, png = job.curve
    summary = write_summary(out, objective.name, key, time.perf_counter() - began)
    plot_curve(out / "metrics.jsonl", out / png, key, label, f"rank1 {objective.name.upper()}")
    log(f"{artifact} saved to {out / artifact}{describe_heldout(summary)}")
    if cfg.export.push_to_hub:
        log(f"pushed {push_run(out, cfg)} to {cfg.export.push_to_hub}")
    return out


def make_heldout(cfg: Config, model_path: str, tokenizer, evalset, job, out: Path):
    """Held-out accuracy during the run (None when eval.in_training is off): served by the job's own
    engines where it has them; the full fine-tune baseline evaluates its whole model."""
    if evalset is None:
        return None
    if cfg.adapter.full_finetune:
        from rank1.driver.heldout import FullModelEval

        return FullModelEval(cfg, model_path, tokenizer, evalset, out)
    from rank1.driver.heldout import HeldoutEval

    return HeldoutEval(cfg, model_path, tokenizer, evalset, getattr(job, "rollouts", None))


def describe_heldout(summary: dict) -> str:
    """The final log line's account of held-out accuracy: start -> end, and the paired gain where measured."""
    if "heldout_start" not in summary:
        return ""

    def change(metric: str) -> str:
        if f"heldout_gain_{metric}" not in summary:
            return ""
        return f" ({100 * summary[f'heldout_gain_{metric}']:+.1f} points, {paired_interval(summary[f'heldout_gain_{metric}_ci95'])})"

    text = (f"; held-out accuracy {100 * summary['heldout_start']:.1f} % -> {100 * summary['heldout_end']:.1f} %{change('pass@1')}, "
            f"{summary['heldout_problems']} problems")
    if "heldout_sampled_start" in summary:
        text += (f"; sampled pass@1 {100 * summary['heldout_sampled_start']:.1f} % -> {100 * summary['heldout_sampled_end']:.1f} %"
                 f"{change('sampled_pass@1')}")
    return text


def write_summary(out: Path, objective: str, key: str, seconds: float) -> dict:
    """RUN/summary.json: the run's first and last held-out accuracy, its final training metric and wall time."""
    rows = read_metrics(out / "metrics.jsonl")
    heldout = [r for r in rows if "heldout_accuracy" in r]
    trained = [r for r in rows if key in r]
    summary = {"objective": objective, "steps": max((r["step"] for r in rows), default=0), f"final_{key}": trained[-1][key] if trained else None,
               "wall_s": round(seconds, 1)}
    if heldout:
        first, last = heldout[0], heldout[-1]
        summary.update(heldout_start=first["heldout_accuracy"], heldout_end=last["heldout_accuracy"],
                       heldout_start_step=first["step"], heldout_end_step=last["step"],
                       heldout_ci95_end=last["heldout_ci95"], heldout_problems=last["heldout_problems"])
        if "heldout_sampled_accuracy" in first and "heldout_sampled_accuracy" in last:
            summary.update(heldout_sampled_start=first["heldout_sampled_accuracy"], heldout_sampled_end=last["heldout_sampled_accuracy"])
        if last.get("heldout_gain_since_step") == first["step"]:  # after a resume the gain is over its first evaluation
            summary.update({k: v for k, v in last.items() if k.startswith("heldout_gain_")})  # the end's paired gain over the start
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
