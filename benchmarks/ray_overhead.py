"""SFT step time through the Ray driver and actor group vs the same learner run directly in-process.

    python benchmarks/ray_overhead.py [--steps 20] [--batch 8]

Both sides run the driver's own loop (`rank1.driver.run_steps`) on the same data; the learner is either
a LocalGroup in this process or a one-actor RayGroup holding all CPUs (so both get the same threads).
Each side runs in its own child process. Prints mean step seconds of both and the ratio (target <= 1.1x).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from sides import report, run_sides


def run_side(side: str, args) -> float:
    from rank1.core.flags import load_config
    from rank1.core.model import load_tokenizer, resolve_model_path
    from rank1.core.workers import LocalGroup, WorkerGroup, free_port, init_ray
    from rank1.driver.loop import RunState, StopSignals
    from rank1.driver.metrics import MetricsSink
    from rank1.driver.sft import SFTJob
    from rank1.trainer.learner import Learner, Placement
    from rank1.trainer.sft import SFTObjective

    out = Path(tempfile.mkdtemp())
    cfg = load_config(["--data.arithmetic_rows", "256", "--data.max_length", "256", "--trainer.global_batch_size", str(args.batch),
                       "--trainer.micro_batch_size", str(args.batch), "--max-steps", str(args.steps), "--trainer.checkpoint_every", "0",
                       "--trainer.zero_stage", "0", "--logging.progress", "false", "--output-dir", str(out), "--eval.in_training", "false",
                       "--cluster.cpus_per_learner", str(os.cpu_count()), "--cluster.local_object_store_mb", "256"])
    path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(path, cfg.model)
    objective = SFTObjective.from_config(cfg)
    job = SFTJob(cfg, path, tokenizer, objective)

    def learner_args(ip: str) -> tuple:
        return (cfg.model, cfg.adapter, cfg.trainer, objective, path, Placement(0, 1, ip, free_port()), args.steps, cfg.seed)

    if side == "direct":
        group = LocalGroup(Learner, learner_args("127.0.0.1"))
    else:
        init_ray(cfg.cluster)
        group = WorkerGroup(Learner, 1, lambda rank, ips: learner_args(ips[0]), num_cpus=cfg.cluster.cpus_per_learner, name="learner")
    sink = MetricsSink(cfg, out, 0)
    job.loop(RunState(cfg, out, group, sink, 0, args.steps, StopSignals()))
    sink.close()
    group.shutdown()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    return sum(r["seconds"] for r in rows) / len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--side", choices=["direct", "ray"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_side(args.side, args))
        return
    seconds = run_sides(__file__, ("direct", "ray"))
    print(f"SmolLM2-135M, batch {args.batch}, {args.steps} steps ({args.warmup} warm-up not timed)")
    for side, s in seconds.items():
        print(f"{side:8} {s:.3f} s/step")
    print(f"ratio ray/direct: {seconds['ray'] / seconds['direct']:.3f}x")


if __name__ == "__main__":
    main()
