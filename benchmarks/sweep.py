"""`rank1 sweep` of N runs vs N sequential `rank1 train` runs: peak memory and wall time, then the
memory model of a sweep on Qwen2.5-32B-Instruct over 8×H200.

    python benchmarks/sweep.py [--runs 4] [--steps 20] [--batch 8]

Both sides do the same work: the embedded model and data, the same steps, batch, micro-batch and
sequence length per run, one learner at ZeRO-0, no held-out eval (it would start engines, the same on
both sides); the runs differ by learning rate (1e-3, 2e-3, ...). Every run is its own `rank1` child
process (the real CLI); peak RSS is that process's own (os.wait4), wall time is the child's, model loading
included: loading the base once instead of N times is part of what a sweep saves. Targets (the issue):
sweep peak RSS <= 1.3x one run's, sweep wall <= 1.0x the sum of the N runs.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one `rank1` child process."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    began = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", *args], cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - began
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"rank1 {args[0]} failed:\n{proc.stderr.read().decode()[-3000:]}")
    return seconds, usage.ru_maxrss / 1e6  # Linux reports kB


def memory_model(runs: int) -> str:
    from rank1.core.flags import load_config
    from rank1.driver.plan import GB, plan_recipe

    def plan(n: int):
        return plan_recipe(load_config(["--config", str(REPO / "clusters/recipes/qwen2.5-32b-s1k-sft.yaml"), "--plan.gpu", "h200",
                                        "--trainer.num_learners", "8", "--plan.runs", str(n)]))

    one, many = plan(1), plan(runs)
    state = sum(c.bytes for c in many.components if c.name.startswith(("adapter", "optimizer")))
    return (f"memory model, Qwen2.5-32B-Instruct SFT recipe on 8×H200 (8 learners, ZeRO-{many.zero_stage}, bf16, the recipe's "
            f"sequence length): one run {one.total / GB:.2f} GB per GPU, a sweep of {runs} runs {many.total / GB:.2f} GB "
            f"(adapter + optimizer state of all {runs}: {state / 1e6:.0f} MB); {many.max_runs:,} runs' adapters fit beside one "
            f"sharded base; {runs} separate runs would need {runs}x the GPUs (64 H200)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rows", type=int, default=400)
    args = p.parse_args()
    lrs = [f"{i + 1}e-3" for i in range(args.runs)]
    common = ["--data.arithmetic_rows", str(args.rows), "--data.max_length", "128", "--trainer.global_batch_size", str(args.batch),
              "--trainer.micro_batch_size", str(args.batch), "--trainer.zero_stage", "0", "--max-steps", str(args.steps),
              "--trainer.checkpoint_every", "0", "--eval.in_training", "false", "--logging.progress", "false"]
    root = Path(tempfile.mkdtemp(prefix="rank1-sweep-bench-"))
    print(f"load: {os.getloadavg()[0]:.2f} (1-min average) on {os.cpu_count()} CPUs; {args.runs} runs × {args.steps} steps × batch {args.batch}")
    solo = [run_cli("train", *common, "--trainer.lr", lr, "--output-dir", str(root / f"solo-{lr}")) for lr in lrs]
    swept = run_cli("sweep", *common, "--trainer.lr", ",".join(lrs), "--output-dir", str(root / "sweep"))
    wall_sum, rss_one = sum(s for s, _ in solo), max(r for _, r in solo)
    print(f"\n| side | wall s | peak RSS GB |\n|---|---|---|")
    for lr, (s, r) in zip(lrs, solo):
        print(f"| rank1 train --lr {lr} | {s:.1f} | {r:.2f} |")
    print(f"| {args.runs} sequential runs (sum / max) | {wall_sum:.1f} | {rss_one:.2f} |")
    print(f"| rank1 sweep of {args.runs} | {swept[0]:.1f} | {swept[1]:.2f} |")
    print(f"\nsweep / sequential wall: {swept[0] / wall_sum:.2f}x (target <= 1.0x); "
          f"sweep / one run peak RSS: {swept[1] / rss_one:.2f}x (target <= 1.3x)")
    print(f"load at the end: {os.getloadavg()[0]:.2f}")
    print(memory_model(8))


if __name__ == "__main__":
    main()
