"""What every training loop does around its steps, written once: progress, metrics, checkpoints,
pre-emption, non-finite steps and held-out evaluation.

    loop = StepLoop(run, "sft")
    for step in loop.steps():
        record = ...one step...
        loop.end_step(step, record, loss=record["loss"])
"""

from __future__ import annotations

import signal
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

from tqdm import tqdm

from rank1.driver.checkpoints import latest_checkpoint, save_checkpoint
from rank1.driver.metrics import log, read_metrics

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on SIGTERM/SIGINT after a checkpoint; `--resume` continues


class Preempted(Exception):
    """SIGTERM or SIGINT arrived: the step in flight finished and a checkpoint was written."""

    def __init__(self, step: int, checkpoint):
        super().__init__(f"stopped by a signal after step {step}; checkpoint {checkpoint} written; continue with --resume")
        self.step, self.checkpoint = step, checkpoint


class NonFiniteError(RuntimeError):
    """Too many consecutive steps had a NaN or inf loss or gradient."""


class StopSignals:
    """First SIGTERM/SIGINT: finish the step, checkpoint, stop. A second one: stop at once."""

    def __init__(self):
        self.requested: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> StopSignals:
        self.arm()
        return self

    def arm(self) -> None:
        """Install the handlers, again if something replaced them: ray.init sets its own SIGTERM handler
        (sys.exit; with Ray's C++ handler the driver then aborts) when the first actor group starts, after
        this object was entered, so the loop arms again before every step."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                current = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (an embedding program): no pre-emption handling
                continue
            self._previous.setdefault(sig, current)

    def _handle(self, signum, frame) -> None:
        if self.requested is not None:
            raise SystemExit(128 + signum)
        self.requested = signum
        log(f"{signal.Signals(signum).name}: finishing the step in flight, then checkpointing and stopping "
            "(send it again to stop at once)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


@contextmanager
def job_session(job, make_heldout: Callable[[], object | None] = lambda: None):
    """(signals, held-out evaluator) for a job's life: pre-emption armed, the job's engines open, the
    evaluator built on them; the evaluator and the job are closed however the run ends."""
    with StopSignals() as signals:
        heldout = None
        try:
            job.open()
            heldout = make_heldout()
            yield signals, heldout
        finally:
            if heldout is not None:
                heldout.close()
            job.close()


@dataclass
class RunState:
    """What a loop needs of the run: set up by rank1.driver.run.train for each learner-group attempt."""

    cfg: object
    out: object
    learners: object
    sink: object
    start: int
    total: int
    signals: StopSignals
    evaluate: Callable[[int], dict] | None = None  # held-out accuracy at a step (None: not configured)
    extra_state: Callable[[], dict] = field(default=lambda: {})  # saved in trainer_state.json
    on_checkpoint: Callable[[int], None] | None = None  # after each checkpoint (a sweep: every run's adapter in its own folder)


class StepLoop:
    def __init__(self, run: RunState, desc: str):
        self.run, self.cfg = run, run.cfg
        self.nonfinite_in_a_row = 0
        earlier = read_metrics(run.out / "metrics.jsonl") if run.start else []  # a resumed run keeps counting
        self.nonfinite_total = sum(1 for r in earlier if r.get("nonfinite") and r.get("step", 0) <= run.start)
        self.bar = tqdm(total=run.total, initial=run.start, desc=desc, unit="step", disable=not self.cfg.logging.progress)

    def steps(self) -> Iterator[int]:
        if self.run.evaluate is not None and self.run.start == 0:  # where the run starts from, before any update
            self.run.sink.write({"step": 0, **self.run.evaluate(0)})
        try:
            for step in range(self.run.start, self.run.total):
                self.run.signals.arm()  # an actor group started since (held-out engines, restarts) may have replaced it
                self.began = time.perf_counter()
                yield step
        finally:
            self.bar.close()

    def end_step(self, step: int, record: dict, **postfix) -> None:
        cfg, t, run = self.cfg, self.cfg.trainer, self.run
        done = step + 1
        self._count_nonfinite(done, record)
        if run.evaluate is not None and ((cfg.eval.every and done % cfg.eval.every == 0) or done == run.total):
            extra = run.evaluate(done)
            for mine, its in zip(record.get("runs", []), extra.pop("runs", [])):  # a sweep's per-run accuracies
                mine.update(its)
            record.update(extra)
        if done % cfg.logging.log_every == 0 or done == run.total:
            run.sink.write(record)
        self.bar.set_postfix({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in postfix.items()})
        self.bar.update(1)
        stopping = run.signals.requested is not None and done < run.total
        if done < run.total and (stopping or (t.checkpoint_every and done % t.checkpoint_every == 0)):
            checkpoint = save_checkpoint(run.out, done, run.learners, t.keep_checkpoints, run.extra_state())
            if run.on_checkpoint is not None:
                run.on_checkpoint(done)
            if stopping:
                raise Preempted(done, checkpoint)

    def _count_nonfinite(self, done: int, record: dict) -> None:
        self.nonfinite_total += bool(record.get("nonfinite"))
        record["nonfinite_total"] = self.nonfinite_total
        if not record.get("nonfinite"):
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        limit = self.cfg.trainer.max_nonfinite_steps
        log(f"step {done}: the loss or a gradient is NaN or inf; the update was skipped ({self.nonfinite_in_a_row} in a row, "
            f"trainer.max_nonfinite_steps={limit})")
        if self.nonfinite_in_a_row >= limit:
            self.run.sink.write(record)
            last = latest_checkpoint(self.run.out, report=False)
            raise NonFiniteError(f"{limit} consecutive steps had a NaN or inf loss or gradient (last at step {done}); the run "
                                 f"stopped. The adapter never took those updates; the last good checkpoint is {last or 'none'}. "
                                 "Lower trainer.lr or check the data, then --resume")
