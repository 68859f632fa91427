"""`rank1 sweep`: N rank-1 runs over one frozen base, at the memory cost of one run.

    rank1 sweep --trainer.lr 1e-4,3e-4,1e-3 --seed 0,1 [any train flag]      # the cartesian product: 6 runs
    rank1 sweep --sweep.runs runs.yaml [any train flag]                      # a YAML list of override mappings

A comma list on a scalar field is a sweep axis; every other flag applies to all runs. The runs share
one learner group holding the base once and one rank-1 adapter per run (rank1.trainer.sweep_learner):
each learner takes every run's micro-batches as that run's solo learner would (the same rows together,
so even the padding matches), and each run keeps its own
initialisation, data order, learning rate and schedule, loss normalisation, clipping, metrics and
adapter — each equals its solo `rank1 train` up to float reassociation. The batched layer serves
micro-batches that mix runs as well (the GRPO sweep's engines do). Output: OUT/run-NN-<overrides>/ (config.yaml, metrics.jsonl, loss.png,
adapter/), OUT/checkpoints/ for the whole sweep, OUT/summary.md + summary.json and OUT/curves.png.
`--resume` continues every run from the sweep's newest whole checkpoint. GRPO sweeps serve all runs'
adapters from one vLLM engine (rank1.driver.sweep_grpo).
"""

from __future__ import annotations

import copy
import itertools
import json
import time
from pathlib import Path

import yaml

from rank1.core.commands import SWEEP
from rank1.core.config import Config, ConfigError
from rank1.core.flags import parse_command, resolve_key, set_value, to_yaml, validate
from rank1.driver.checkpoints import latest_checkpoint, prepare_output_dir, restore_point
from rank1.driver.loop import RunState, StepLoop, job_session
from rank1.driver.metrics import MetricsSink, log, plot_curve, read_metrics
from rank1.driver.sft import SFTRows

# What may differ between runs that share one base and one batching (everything else is one value).
SWEEPABLE = ("seed", "trainer.lr", "trainer.warmup_ratio", "trainer.lr_schedule", "trainer.weight_decay", "trainer.grad_clip",
             "trainer.betas", "adapter.alpha", "adapter.use_rslora")


def split_axes(argv: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """argv with each comma list on a scalar field replaced by its first value, and the axes {key: [values]}."""
    from rank1.core.flags import SHORT_FLAGS, flag_tables

    flags, _ = flag_tables(SWEEP)
    base, axes, i = [], {}, 0
    probe = Config()
    while i < len(argv):
        arg = argv[i]
        name, eq, inline = arg.partition("=")
        value = inline if eq else (argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None)
        key = flags.get(name, SHORT_FLAGS.get(name, name[2:]))
        scalar = False
        if name.startswith("--") and value is not None and name != "--config":
            try:
                _, _, tp = resolve_key(probe, key)
                scalar = "list" not in str(tp)
            except ConfigError:
                pass
        if scalar and "," in value:
            values = [v.strip() for v in value.split(",")]
            if not all(values):
                raise ConfigError(f"flag {name}: {value!r} has an empty value in its list")
            axes[key] = values
            base += [name, values[0]]
        else:
            base += [arg] if eq or value is None else [arg, value]
        i += 1 if eq or value is None else 2
    return base, axes


def run_overrides(cfg: Config, axes: dict[str, list[str]]) -> list[dict]:
    """One {key: value} per run: the cartesian product of the axes, or sweep.runs' YAML list."""
    if cfg.sweep.runs:
        if not Path(cfg.sweep.runs).is_file():
            raise ConfigError(f"sweep.runs {cfg.sweep.runs}: no such file (a YAML list of override mappings)")
        listed = yaml.safe_load(Path(cfg.sweep.runs).read_text())
        if not isinstance(listed, list) or not all(isinstance(r, dict) for r in listed):
            raise ConfigError(f"sweep.runs {cfg.sweep.runs}: expected a YAML list of mappings of dotted keys, e.g. [{{trainer.lr: 1e-4}}]")
        runs = [{str(k): v for k, v in r.items()} for r in listed]
    else:
        runs = [dict(zip(axes, combo)) for combo in itertools.product(*axes.values())] if axes else [{}]
    if not runs:
        raise ConfigError("rank1 sweep: the list of runs is empty")
    for overrides in runs:
        for key in overrides:
            if key not in SWEEPABLE:
                raise ConfigError(f"rank1 sweep: {key} cannot vary across runs that share a base (one model, one adapter "
                                  f"shape, one batching and sequence length); fields a sweep varies: {', '.join(SWEEPABLE)}")
    if len(runs) > cfg.sweep.max_runs:
        raise ConfigError(f"rank1 sweep: {len(runs)} runs, over sweep.max_runs={cfg.sweep.max_runs}")
    return runs


def run_configs(cfg: Config, runs: list[dict]) -> list[Config]:
    out = []
    for i, overrides in enumerate(runs):
        run = copy.deepcopy(cfg)
        for key, value in overrides.items():
            _, _, tp = resolve_key(run, key)
            set_value(run, key, yaml.safe_load(value) if isinstance(value, str) and tp is not str else value)
        label = "-".join(f"{k.rsplit('.', 1)[-1]}{v}" for k, v in overrides.items()) or "base"
        run.logging.output_dir = str(Path(cfg.logging.output_dir) / f"run-{i:02d}-{label}")
        validate(run)
        out.append(run)
    return out


def sweep(cfg: Config, runs: list[Config], overrides: list[dict]) -> Path:
    from rank1.core.model import load_tokenizer, resolve_model_path
    from rank1.driver.run import make_objective

    objectives = [make_objective(r) for r in runs]  # every run's own checks
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    evalset = None
    if cfg.eval.in_training:
        from rank1.driver.evaluate import build_eval_set

        evalset = build_eval_set(cfg, tokenizer, run=cfg)
    job = sweep_job(objectives[0].name)(cfg, runs, model_path, tokenizer)  # its checks too, before the output dir exists
    log(f"sweep of {len(runs)} runs over one base: {job.describe()}")
    saved = Path(cfg.logging.output_dir) / "sweep.json"
    if cfg.trainer.resume and saved.is_file() and json.loads(saved.read_text())["runs"] != overrides:
        raise ConfigError(f"--resume: {saved} holds other runs ({json.loads(saved.read_text())['runs']}); resume with the same axes")
    out = prepare_output_dir(cfg)
    saved.write_text(json.dumps({"runs": overrides}, indent=1))
    for run in runs:
        Path(run.logging.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(run.logging.output_dir) / "config.yaml").write_text(to_yaml(run))
    start = restore_point(out) if cfg.trainer.resume else 0
    began = time.perf_counter()
    make_heldout = (lambda: sweep_heldout(cfg, len(runs), model_path, tokenizer, evalset, job)) if evalset is not None else (lambda: None)
    with job_session(job, make_heldout) as (signals, heldout):
        learners = job.make_learners()
        sink = SweepSink(cfg, runs, out, start)
        try:
            if start:
                checkpoint = latest_checkpoint(out)
                learners.call("load_checkpoint", str(checkpoint))
                log(f"resumed the sweep from {checkpoint} at step {start}")
            evaluate = None
            if heldout is not None:
                def evaluate(step: int) -> dict:
                    if step == 0:  # every run starts from the same function (B = 0, or the same adapter.init)
                        return {"runs": [heldout(learners, 0, run=0)] * len(runs)}
                    return {"runs": [heldout(learners, step, run=i) for i in range(len(runs))]}
            state = RunState(cfg, out, learners, sink, start, job.total_steps, signals, evaluate,
                             on_checkpoint=lambda step: save_run_adapters(runs, learners, step, cfg.trainer.keep_checkpoints))
            job.loop(state)
            learners.call("save_adapters", [str(Path(r.logging.output_dir) / "adapter") for r in runs])
        finally:
            sink.close()
            learners.shutdown()
    write_sweep_summary(out, runs, overrides, job.curve, time.perf_counter() - began)
    return out


def sweep_job(objective: str):
    """The driver's choice of sweep job for trainer.objective (as rank1.driver.run.JOBS for one run)."""
    from rank1.driver.sweep_grpo import GRPOSweep

    return {"sft": SFTSweep, "grpo": GRPOSweep}[objective]


def save_run_adapters(runs: list[Config], learners, step: int, keep: int) -> None:
    """Each run's adapter at a checkpoint in its own folder, RUN/checkpoints/step-NNNNNN/adapter (what `rank1 export`
    takes); the sweep's own checkpoint holds the state every run resumes from."""
    import shutil

    folders = [Path(r.logging.output_dir) / "checkpoints" / f"step-{step:06d}" for r in runs]
    learners.call("save_adapters", [str(f / "adapter") for f in folders])
    for folder in folders:
        for old in sorted(folder.parent.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def sweep_heldout(cfg: Config, n: int, model_path: str, tokenizer, evalset, job):
    """Held-out accuracy per run: each run's adapter in its own engine slot (a GRPO sweep's engines, or an eval
    engine group for an SFT sweep, both serving through LoRA since merged weights hold one adapter)."""
    import dataclasses

    from rank1.driver.heldout import HeldoutEval

    cfg = copy.copy(cfg)
    cfg.rollout = dataclasses.replace(cfg.rollout, adapter_mode="lora", max_adapters=max(n, cfg.rollout.max_adapters))
    return HeldoutEval(cfg, model_path, tokenizer, evalset, job if getattr(job, "engines", None) is not None else None)


class SweepSink:
    """Each run's metrics.jsonl (per-run rows of a sweep step) plus the sweep's own."""

    def __init__(self, cfg: Config, runs: list[Config], out: Path, start: int):
        self.own = MetricsSink(cfg, out, start)
        self.runs = [MetricsSink(r, Path(r.logging.output_dir), start) for r in runs]

    def write(self, record: dict) -> None:
        per_run = record.pop("runs", None)
        if per_run is not None:
            for sink, row in zip(self.runs, per_run):
                sink.write({"step": record["step"], **row})
        self.own.write(record)

    def close(self) -> None:
        for sink in [self.own, *self.runs]:
            sink.close()


class SFTSweep(SFTRows):
    curve = ("loss", "completion loss")

    def __init__(self, cfg: Config, runs: list[Config], model_path: str, tokenizer):
        from rank1.trainer.sft import SFTObjective

        super().__init__(cfg, tokenizer)
        self.runs, self.model_path = runs, model_path
        one = SFTObjective.from_config(cfg)
        self.objective = SFTObjective(one.rows_per_step * len(runs), one.max_sequence_tokens)

    def make_learners(self):
        return make_sweep_learners(self.cfg, self.runs, self.model_path, self.objective, self.total_steps)

    def loop(self, run: RunState) -> None:
        from rank1.core.data import global_batch

        t, examples, learners, n = self.cfg.trainer, self.data.examples, run.learners, len(self.runs)
        loop = StepLoop(run, "sweep")
        for step in loop.steps():
            batches = [[examples[i] for i in global_batch(len(examples), r.seed, step, t.global_batch_size)] for r in self.runs]
            norms = [self.objective.normalizer(b) for b in batches]
            shards = run_shards(batches, learners.size, t.micro_batch_size, self.objective.collate, self.pad_id, norms)
            results = learners.call("train_step", per_rank=[(shard, 1.0) for shard in shards])
            seconds = time.perf_counter() - loop.began
            losses = [0.0] * n
            for r in results:
                for loss, i in zip(r["row_loss"], r["row_run"]):
                    losses[i] += loss
            first = results[0]
            per_run = [{"loss": losses[i] / norms[i], "lr": first["lrs"][i], "grad_norm": first["group_grad_norms"][i],
                        "nonfinite": first["run_nonfinite"][i], "seconds": seconds} for i in range(n)]
            tokens = sum(r["tokens"] for r in results)
            record = {"step": step + 1, "runs": per_run, "tokens": tokens, "tokens_per_s": tokens / seconds, "seconds": seconds,
                      "nonfinite": any(row["nonfinite"] for row in per_run)}
            loop.end_step(step, record, loss=min(row["loss"] for row in per_run), tok_s=round(tokens / seconds))


def run_shards(batches: list[list], world: int, micro: int, collate, pad_id: int, norms: list[float]) -> list[list[dict]]:
    """Each run's global batch split over ranks and micro-batches exactly as its solo run splits it; every
    micro-batch carries its rows' run and weight 1 / that run's normalizer."""
    import torch

    shards: list[list[dict]] = [[] for _ in range(world)]
    for run, rows in enumerate(batches):
        per_rank = len(rows) // world
        for r in range(world):
            mine = rows[r * per_rank : (r + 1) * per_rank]
            for i in range(0, len(mine), micro):
                batch = collate(mine[i : i + micro], pad_id)
                batch["run"] = torch.full((len(mine[i : i + micro]),), run, dtype=torch.long)
                batch["row_weight"] = torch.full((len(mine[i : i + micro]),), 1.0 / norms[run])
                shards[r].append(batch)
    return shards


def make_sweep_learners(cfg: Config, runs: list[Config], model_path: str, objective, total_steps: int):
    from rank1.driver.run import learner_group
    from rank1.trainer.sweep_learner import RunSpec, SweepLearner

    specs = [RunSpec.of(r) for r in runs]
    return learner_group(cfg, SweepLearner, lambda placement: (specs, cfg.model, cfg.adapter, cfg.trainer, objective, model_path,
                                                              placement, total_steps, cfg.seed))


def write_sweep_summary(out: Path, runs: list[Config], overrides: list[dict], curve: tuple, seconds: float) -> dict:
    """summary.json + summary.md (a row per run) and curves.png (every run's curve overlaid)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    key, label = curve
    rows = []
    fig, ax = plt.subplots(figsize=(7, 4))
    for run, o in zip(runs, overrides):
        folder = Path(run.logging.output_dir)
        metrics = read_metrics(folder / "metrics.jsonl")
        trained = [m for m in metrics if key in m]
        plot_curve(folder / "metrics.jsonl", folder / f"{key.split('_')[0]}.png", key, label, f"rank1 sweep: {folder.name}")
        ax.plot([m["step"] for m in trained], [m[key] for m in trained], label=folder.name)
        heldout = [m for m in metrics if "heldout_accuracy" in m]
        accuracy = {"heldout_start": heldout[0]["heldout_accuracy"], "heldout_end": heldout[-1]["heldout_accuracy"],
                    "heldout_problems": heldout[-1]["heldout_problems"]} if heldout else {}
        rows.append({"run": folder.name, **{k: v for k, v in o.items()}, f"final_{key}": trained[-1][key] if trained else None, **accuracy})
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    summary = {"runs": rows, "wall_s": round(seconds, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    table = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    table += ["| " + " | ".join(f"{r.get(c):.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns) + " |" for r in rows]
    (out / "summary.md").write_text(f"# rank1 sweep: {len(rows)} runs, {seconds / 60:.1f} min\n\n" + "\n".join(table) + "\n")
    print("\n".join(table))
    return summary


def main(argv: list[str]) -> int:
    import sys

    from rank1.core.flags import usage

    if "--help" in argv or "-h" in argv:
        print(__doc__ + "\n" + usage(SWEEP))
        return 0
    base_argv, axes = split_axes(argv)
    cfg = parse_command(SWEEP, base_argv)
    overrides = run_overrides(cfg, axes)
    runs = run_configs(cfg, overrides)
    try:
        sweep(cfg, runs, overrides)
    except Exception as e:
        from rank1.driver.loop import PREEMPTED_EXIT_CODE, Preempted

        if isinstance(e, Preempted):
            print(f"rank1 sweep: {e}", file=sys.stderr)
            return PREEMPTED_EXIT_CODE
        raise
    return 0
