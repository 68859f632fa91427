"""Generation throughput of the two rollout backends on the same model, adapter and batch.

    python benchmarks/generation_backends.py [--batch 8] [--max-new-tokens 64] [--repeats 2] [--json out.json]

Both engines serve the embedded SmolLM2-135M with the same random non-zero rank-1 adapter and sample
(temperature 1) completions for the same chat prompts (GSM8K test questions from the shared data
folder when present). Reported: generated tokens per second of wall time, median over repeats,
after one warm-up batch. The transformers backend runs first, with --threads torch threads; vLLM
then runs in this process with its own CPU thread binding.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K_TEST = REPO.parent / "shared" / "data" / "gsm8k" / "test.jsonl"


def questions(n: int) -> list[str]:
    if GSM8K_TEST.is_file():
        rows = [json.loads(line) for line in GSM8K_TEST.open() if line.strip()][:n]
        return [r["question"] for r in rows]
    return [f"What is {17 * i + 3} + {29 * i + 11}? Think step by step." for i in range(n)]


def measure(engine, prompts, spec, repeats: int) -> dict:
    engine.generate(prompts[:2], spec)  # warm-up
    rates, tokens = [], 0
    for _ in range(repeats):
        start = time.perf_counter()
        completions = engine.generate(prompts, spec)
        seconds = time.perf_counter() - start
        tokens = sum(len(c.token_ids) for c in completions)
        rates.append(tokens / seconds)
    return {"tokens_per_s": statistics.median(rates), "tokens_last_batch": tokens, "all_rates": rates}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads for the transformers backend")
    parser.add_argument("--backends", default="transformers,vllm")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model_state_dict

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, load_base, load_tokenizer, resolve_model_path
    from rank1.rollout.engine import SamplingSpec

    path = resolve_model_path(ModelConfig())
    tokenizer = load_tokenizer(path, ModelConfig())
    prompts = [
        list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
        for q in questions(args.batch)
    ]
    learner = attach_adapter(load_base(path, ModelConfig(), torch.float32), AdapterConfig(), "smollm2")
    g = torch.Generator().manual_seed(0)
    for name, p in learner.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.02
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(learner).items()}
    config = learner.peft_config["default"].to_dict()
    del learner
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0)

    results: dict = {"model": path, "batch": args.batch, "max_new_tokens": args.max_new_tokens, "prompt_tokens_mean": sum(map(len, prompts)) / len(prompts)}
    for backend in args.backends.split(","):
        start = time.perf_counter()
        if backend == "transformers":
            from rank1.rollout.hf_engine import HFEngine

            torch.set_num_threads(args.threads)
            engine = HFEngine(path, batch_size=args.batch)
        elif backend == "vllm":
            from rank1.rollout.vllm_engine import VLLMEngine

            engine = VLLMEngine(path, max_model_len=1024, max_num_seqs=max(8, args.batch))
        else:
            raise SystemExit(f"--backends: unknown backend {backend!r} (transformers, vllm)")
        startup = time.perf_counter() - start
        engine.load_adapter(tensors, config, 1)
        results[backend] = {"startup_s": startup, **measure(engine, prompts, spec, args.repeats)}
        print(f"{backend:12s} start-up {startup:6.1f}s  {results[backend]['tokens_per_s']:8.1f} generated tokens/s", flush=True)
        del engine
    if "vllm" in results and "transformers" in results:
        results["vllm_over_transformers"] = results["vllm"]["tokens_per_s"] / results["transformers"]["tokens_per_s"]
        print(f"vLLM / transformers: {results['vllm_over_transformers']:.2f}x  (batch {args.batch}, {args.max_new_tokens} new tokens)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
