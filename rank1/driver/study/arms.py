"""The arms of the accuracy study and how one is run: `rank1 train` and `rank1 eval` as child processes.

Each arm is the study's train flags plus its own (objective, rank, learning rate); a child process per
run keeps DeepSpeed's and Ray's state to that run, and makes each step resumable on its own: a run
folder with a summary.json is done, one with checkpoints continues with --resume, an eval folder with a
summary.json is not redone. SIGTERM to the study reaches the running child (which checkpoints and exits
75, rank1's pre-emption code); a study killed outright takes its child with it (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from rank1.core.config import GRPO_LR, ConfigError, GRPOConfig, StudyConfig
from rank1.driver.metrics import log

PREEMPTED = 75


@dataclass
class Arm:
    name: str
    kind: str  # base | sft | grpo
    rank: int | None = None  # None: the base or the full fine-tune
    full: bool = False
    lrs: list[float] = field(default_factory=list)
    after: str | None = None  # the arm whose artifact a GRPO arm starts from

    def train_flags(self, lr: float, init: str | None, study: StudyConfig, grpo: GRPOConfig) -> list[str]:
        flags = ["--objective", self.kind, "--trainer.lr", repr(lr), "--eval.in_training", "false"]
        if self.full:
            flags += ["--adapter.full_finetune", "true"]
        else:
            flags += ["--adapter.r", str(self.rank)]
        if self.kind == "grpo":
            # The study's own batch (its config resolves from the base: 4 prompts x 4 unless set), not
            # GRPO_FROM_ADAPTER's 16 x 8, which alone would take ~17 of the study's 45 CPU minutes; the study
            # scores greedy, which neither batch moved (README Results).
            flags += ["--adapter.init", init, "--trainer.max_steps", str(study.grpo_steps),
                      "--grpo.prompts_per_step", str(grpo.prompts_per_step), "--grpo.num_generations", str(grpo.num_generations)]
        return flags

    @property
    def artifact(self) -> str:
        return "model" if self.full else "adapter"


def parse_arms(study: StudyConfig) -> list[Arm]:
    arms = []
    for name in study.arms:
        if name == "base":
            arms.append(Arm(name, "base"))
        elif name == "full-sft":
            arms.append(Arm(name, "sft", full=True, lrs=list(study.full_lrs)))
        elif m := re.fullmatch(r"rank(\d+)-(sft|grpo)", name):
            rank, kind = int(m.group(1)), m.group(2)
            if rank < 1:
                raise ConfigError(f"study.arms: {name}: the rank must be at least 1")
            if kind == "sft":
                arms.append(Arm(name, kind, rank, lrs=list(study.rank1_lrs if rank == 1 else study.rank_r_lrs)))
            else:
                after = f"rank{rank}-sft"
                if after not in study.arms or study.arms.index(after) > study.arms.index(name):
                    raise ConfigError(f"study.arms: {name} starts from the {after} adapter; list {after} before it")
                arms.append(Arm(name, kind, rank, lrs=[study.grpo_lr or GRPO_LR], after=after))
        else:
            raise ConfigError(f"study.arms: {name!r} is not an arm (base, full-sft, rank<r>-sft, rank<r>-grpo)")
    if len({a.name for a in arms}) != len(arms):
        raise ConfigError(f"study.arms: {study.arms} names an arm twice")
    for arm in arms:
        if not arm.lrs and arm.kind != "base":
            raise ConfigError(f"study: {arm.name} has no learning rate to try")
    return arms


def _die_with_parent() -> None:
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Preempted(Exception):
    pass


class StudySignals:
    """SIGTERM/SIGINT during a study: passed on to the running child (which checkpoints), and no new child starts."""

    child: subprocess.Popen | None = None
    requested = False

    def __enter__(self):
        self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        StudySignals.requested = True
        if StudySignals.child is not None:
            StudySignals.child.send_signal(signal.SIGTERM)

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        StudySignals.requested, StudySignals.child = False, None


def run_child(args: list[str], log_file: Path) -> float:
    """`rank1 ARGS` in a child process (its output to log_file); seconds taken. See StudySignals."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if StudySignals.requested:
        raise Preempted("stopped on SIGTERM before the next step")
    began = time.perf_counter()
    with open(log_file, "a") as out:
        StudySignals.child = subprocess.Popen([sys.executable, "-m", "rank1.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                              env=env, preexec_fn=_die_with_parent)
        try:
            code = StudySignals.child.wait()
        finally:
            StudySignals.child = None
    if code == PREEMPTED or code == -signal.SIGTERM or StudySignals.requested:
        raise Preempted(f"rank1 {args[0]} stopped on SIGTERM ({log_file})")
    if code != 0:
        tail = log_file.read_text()[-2500:]
        raise RuntimeError(f"rank1 {args[0]} failed (exit {code}); its log {log_file} ends:\n{tail}")
    return time.perf_counter() - began


def train_run(run_dir: Path, flags: list[str]) -> dict:
    """A finished training run's summary.json, training (or resuming) it first when needed."""
    summary = run_dir / "summary.json"
    if summary.is_file():
        return json.loads(summary.read_text())
    resume = any((run_dir / "checkpoints").glob("step-*")) if (run_dir / "checkpoints").is_dir() else False
    if run_dir.exists() and not resume:
        shutil.rmtree(run_dir)  # started but no checkpoint yet: nothing to keep
    run_dir.mkdir(parents=True, exist_ok=True)
    log(f"study: {'resuming' if resume else 'training'} {run_dir}")
    run_child(["train", *flags, "--output-dir", str(run_dir), *(["--resume"] if resume else [])], run_dir / "train.log")
    return json.loads(summary.read_text())


def eval_run(out: Path, flags: list[str], data: str, rows: int, artifact: Path | None, full: bool) -> dict:
    """`rank1 eval` of the base, an adapter or a fine-tuned model folder: its summary plus per-problem correctness."""
    if not (out / "summary.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        target = [] if artifact is None else (["--model", str(artifact)] if full else ["--adapter", str(artifact)])
        size = {"arithmetic": ["--eval.heldout_rows", str(rows)], "arithmetic-val": ["--eval.limit", str(rows)]}.get(data, [])
        log(f"study: evaluating {artifact or 'the base'} on {data}")
        seconds = run_child(["eval", *flags, "--eval.data", data, *size, *target, "--eval.k", "1", "--eval.out", str(out)],
                            out / "eval.log")
        summary = json.loads((out / "summary.json").read_text())
        summary["eval_s"] = round(seconds, 1)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    summary = json.loads((out / "summary.json").read_text())
    correct = [float(json.loads(line)["pass@1"]) for line in (out / "problems.jsonl").read_text().splitlines()]
    return {**summary, "correct_per_problem": correct}
