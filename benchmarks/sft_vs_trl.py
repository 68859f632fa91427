"""rank1 SFT vs TRL's SFTTrainer: same model, data, batch, sequence length, steps and rank-1 PEFT config.

    python benchmarks/sft_vs_trl.py [--steps 30] [--model smollm2-135m-instruct]

Each side runs in its own child process so peak RSS is its own. Tokens/s counts the non-padding
tokens of the training steps over the wall time of those steps (model loading excluded), skipping the
first `--warmup` steps of each side. Prints one table and the ratios, and each side's loss twice:
at the last step, and averaged over all steps. TRL's own end-of-run `train_loss` is the average (its
Trainer divides the summed step losses by the number of steps), which is why an earlier version of this
table compared rank1's last-step 0.168 with TRL's run-average 0.284: the same training, two statistics.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

from sides import report, run_sides


def run_rank1(args) -> dict:
    from rank1.core.flags import load_config
    from rank1.driver.run import train

    out = Path(tempfile.mkdtemp()) / "run"
    cfg = load_config(["--model", args.model, "--data.arithmetic_rows", str(args.rows), "--data.max_length", str(args.max_length),
                       "--trainer.global_batch_size", str(args.batch), "--trainer.micro_batch_size", str(args.batch),
                       "--max-steps", str(args.steps), "--trainer.checkpoint_every", "0", "--trainer.zero_stage", "0",
                       "--logging.progress", "false", "--output-dir", str(out), "--eval.in_training", "false",
                       "--model.gradient_checkpointing", str(args.gradient_checkpointing).lower()])
    train(cfg)
    every = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    rows = every[args.warmup :]
    return {"tokens": sum(r["tokens"] for r in rows), "seconds": sum(r["seconds"] for r in rows), "final_loss": every[-1]["loss"],
            "mean_loss": sum(r["loss"] for r in every) / len(every)}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.data import arithmetic_rows
    from rank1.core.model import load_tokenizer, lora_config, resolve_model_path

    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    tokenizer = load_tokenizer(path, ModelConfig(name_or_path=args.model))
    rows = [{"prompt": [{"role": "user", "content": r["question"]}], "completion": [{"role": "assistant", "content": r["answer"]}]}
            for r in arithmetic_rows(args.rows)]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.tokens, self.began, self.seen = [], [], 0.0, 0

        def on_step_begin(self, a, state, control, **kw):
            self.began, self.seen = time.perf_counter(), state.num_input_tokens_seen

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.began)
            self.tokens.append(state.num_input_tokens_seen - self.seen)

    timer = StepTimer()
    config = SFTConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=args.batch, gradient_accumulation_steps=1,
                       max_steps=args.steps, learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05,
                       weight_decay=1e-4, adam_beta2=0.95, max_grad_norm=1.0, max_length=args.max_length,
                       completion_only_loss=True, gradient_checkpointing=args.gradient_checkpointing, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                       logging_steps=1, include_num_input_tokens_seen="non_padding", dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         peft_config=lora_config(AdapterConfig()), callbacks=[timer])
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]  # one per step (logging_steps=1)
    return {"tokens": sum(timer.tokens[args.warmup :]), "seconds": sum(timer.times[args.warmup :]), "final_loss": losses[-1],
            "mean_loss": sum(losses) / len(losses), "trl_train_loss": trainer.state.log_history[-1].get("train_loss")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rows", type=int, default=512)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="on for both sides (TRL's SFTConfig turns it on by default)")
    parser.add_argument("--side", choices=["rank1", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        result = run_rank1(args) if args.side == "rank1" else run_trl(args)
        result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        report(result)
        return
    results = run_sides(__file__, ("rank1", "trl"))
    for r in results.values():
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
    print(f"model {args.model}, batch {args.batch}, max_length {args.max_length}, {args.steps} steps ({args.warmup} warm-up not timed), "
          f"gradient checkpointing {'on' if args.gradient_checkpointing else 'off'} for both")
    print(f"{'':8}{'tokens/s':>12}{'peak RSS MB':>14}{'last-step loss':>16}{'mean loss':>12}")
    for side, r in results.items():
        print(f"{side:8}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}{r['final_loss']:>16.4f}{r['mean_loss']:>12.4f}")
    print(f"(TRL's train_loss, its run average: {results['trl']['trl_train_loss']:.4f})")
    r, t = results["rank1"], results["trl"]
    print(f"ratio rank1/TRL: tokens/s {r['tokens_per_s'] / t['tokens_per_s']:.2f}x, peak RSS {r['peak_rss_mb'] / t['peak_rss_mb']:.2f}x")


if __name__ == "__main__":
    main()
