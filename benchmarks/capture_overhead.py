"""Forward-pass time of base+adapter with activation capture on vs off (target: ≤ 10 % overhead).

    python benchmarks/capture_overhead.py [--batch-docs 4] [--repeats 5] [--threads 2]

SmolLM2-135M-Instruct (embedded) with a randomly initialized rank-1 adapter on all 210 projections,
on GSM8K train rows (../shared/data, else the embedded arithmetic task). "on" = forward hooks on every
lora_A plus the 30 up_proj baselines, and reading out the (batch, seq, 210) and (batch, seq, 180) tensors.
Runs alternate on/off so machine load affects both alike; the median of each is reported.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from rank1.core.config import DataConfig, ModelConfig
from rank1.sae.capture import ActivationCapture
from rank1.sae.documents import load_documents, padded_batch
from rank1.core.adapter_io import load_adapted_model
from rank1.sae.random_adapter import build_random_adapter

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--batch-docs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-length", type=int, default=128)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    gsm8k = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
    data = DataConfig(path=str(gsm8k) if gsm8k.is_file() else "arithmetic", max_rows=args.batch_docs, max_length=args.max_length)
    with tempfile.TemporaryDirectory() as tmp:
        adapter = build_random_adapter(Path(tmp) / "adapter", ModelConfig(), seed=0)
        model, tokenizer, _ = load_adapted_model(adapter, ModelConfig())
    docs = load_documents(data, tokenizer)
    ids, mask, _ = padded_batch(docs, tokenizer.pad_token_id)
    capture = ActivationCapture(model, neurons_per_layer=6)

    def off() -> float:
        start = time.perf_counter()
        model(input_ids=ids, attention_mask=mask)
        return time.perf_counter() - start

    def on() -> float:
        start = time.perf_counter()
        with capture:
            model(input_ids=ids, attention_mask=mask)
            keep = mask.bool()
            capture.adapter_activations()[keep], capture.neuron_activations()[keep]
        return time.perf_counter() - start

    with torch.inference_mode():
        off(), on()  # warm up
        times = {"off": [], "on": []}
        for _ in range(args.repeats):
            times["off"].append(off())
            times["on"].append(on())
    median = {k: statistics.median(v) for k, v in times.items()}
    print(json.dumps({
        "tokens_per_forward": int(mask.sum()), "shape": list(ids.shape), "threads": args.threads, "adapters": len(capture.sites),
        "median_s": median, "overhead": median["on"] / median["off"] - 1, "runs_s": times,
    }, indent=1))


if __name__ == "__main__":
    main()
