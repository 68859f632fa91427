"""GRPO learner time at micro-batches of 4 rows (trainer.micro_batch_size's SFT default) vs the GRPO default
(a learner's whole share of the rollout batch, in forwards of up to 32 rows: rank1.core.config.micro_batch_default).

    python benchmarks/grpo_micro_batch.py [--steps 6] [--prompts 16] [--generations 8] [--adapter RUN/adapter]

Both sides are the same `rank1 train --objective grpo` run: same model, prompts, seed, G, completion length,
rewards and learning rate; only trainer.micro_batch_size differs, and with it how the rows learned are cut
into forwards. The gradient is the same sum either way (the loss is normalised by the whole batch), so the
sides sample the same completions until float reassociation moves a token. Learn time is compared per row
learned, over the timed steps (the first `--warmup` are not). From `--adapter` (an SFT adapter) the rewards
are math alone; from the base, math + format, so groups differ from the first step.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from sides import report, run_sides


def run_side(args, micro_batch: int | None) -> dict:
    from rank1.core.flags import load_config
    from rank1.driver.run import train

    out = Path(tempfile.mkdtemp()) / "run"
    argv = ["--objective", "grpo", "--grpo.prompts_per_step", str(args.prompts), "--grpo.num_generations", str(args.generations),
            "--max-steps", str(args.steps), "--trainer.checkpoint_every", "0", "--trainer.zero_stage", "0",
            "--logging.progress", "false", "--eval.in_training", "false", "--output-dir", str(out), "--lr", str(args.lr)]
    argv += ["--adapter.init", args.adapter] if args.adapter else []
    argv += ["--trainer.micro_batch_size", str(micro_batch)] if micro_batch else []
    cfg = load_config(argv)
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "rows_learned" in r][args.warmup :]
    learned = [r for r in rows if not r["skipped"]]
    return {"micro_batch": cfg.trainer.micro_batch_size, "learn_s": sum(r["time_learn"] for r in learned),
            "rows": sum(r["rows_learned"] for r in learned), "steps": len(learned),
            "per_step": [(r["rows_learned"], round(r["time_learn"], 2)) for r in learned]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--generations", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--adapter", default=None, help="start from this adapter (e.g. an SFT run's RUN/adapter)")
    parser.add_argument("--side", choices=["mb4", "default"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_side(args, 4 if args.side == "mb4" else None))
        return
    results = run_sides(__file__, ("mb4", "default"))
    print(f"GRPO {args.prompts} prompts x G={args.generations}, lr {args.lr:g}, from {args.adapter or 'the base'}, "
          f"{args.steps} steps ({args.warmup} warm-up not timed)")
    for name, r in results.items():
        print(f"micro-batch {r['micro_batch']:>2}: learn {r['learn_s']:.1f} s for {r['rows']} rows over {r['steps']} steps "
              f"({1000 * r['learn_s'] / max(1, r['rows']):.0f} ms a row); (rows, s) per step {r['per_step']}")
    small, large = (results[s]["learn_s"] / max(1, results[s]["rows"]) for s in ("mb4", "default"))
    print(f"learn time per row learned, micro-batch {results['default']['micro_batch']} / 4: {large / small:.2f}x")


if __name__ == "__main__":
    main()
