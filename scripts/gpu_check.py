"""The GPU check: rank1's GPU path on one GPU in a few minutes, printed as one table.

    python scripts/gpu_check.py --prepare             # here: the model's config and tokenizer into .gpu-check/
    python scripts/gpu_check.py                        # on the GPU machine (scripts/gpu_check.sh runs this)
    python scripts/gpu_check.py --device cpu --tiny    # the same logic on a CPU, with a 2-layer model (CI)

It needs torch (CUDA), transformers and peft; DeepSpeed, Ray and vLLM may be absent, and the rows that
need them say "skipped: <package> not installed". The base is SmolLM2-135M-Instruct's architecture and
tokenizer with random weights (no weights can travel or be downloaded): every check compares rank1 with
itself or with PEFT on the same weights, so random weights test the same paths.

Checks: learner steps in bf16 (DeepSpeed, or the objective with torch AdamW), the GRPO loss at T = 0.7,
the transformers engine's adapter sync and probe in bf16 (and a stale engine caught), activation
capture in bf16, the vLLM engine (LoRA mode), and a Ray actor's device choice.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
PREPARED = REPO / ".gpu-check" / "model"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja", "generation_config.json")


def prepare() -> None:
    """Copy the embedded model's config and tokenizer (no weights) where `run` on the device machine carries them."""
    from rank1.core.config import ModelConfig
    from rank1.core.model import resolve_model_path

    src = Path(resolve_model_path(ModelConfig()))
    PREPARED.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (src / name).is_file():
            shutil.copy(src / name, PREPARED / name)
    print(f"prepared {PREPARED} ({sum(f.stat().st_size for f in PREPARED.iterdir()) / 1e6:.1f} MB)")


def build_model(folder: Path, out: Path, tiny: bool, dtype) -> str:
    """A model folder with random weights of the prepared architecture (tiny: 2 layers) and its tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    if tiny:
        config.num_hidden_layers, config.hidden_size, config.intermediate_size = 2, 64, 128
        config.num_attention_heads, config.num_key_value_heads = 4, 2
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (folder / name).is_file():
            shutil.copy(folder / name, out / name)
    return str(out)


class Report:
    def __init__(self, device: str):
        self.device, self.rows = device, []

    def run(self, name: str, fn, needs: tuple[str, ...] = ()) -> None:
        import importlib.util

        import torch

        missing = [m for m in needs if importlib.util.find_spec(m) is None]
        if missing:
            self.rows.append((name, f"skipped: {', '.join(missing)} not installed", "", ""))
            return
        if self.device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        began = time.perf_counter()
        try:
            detail = fn()
            result = f"pass{': ' + detail if detail else ''}"
        except Exception as e:  # the table reports every check, whatever one of them does
            traceback.print_exc()
            result = f"FAIL: {type(e).__name__}: {str(e)[:160]}"
        seconds = f"{time.perf_counter() - began:.1f}"
        memory = f"{torch.cuda.max_memory_allocated() / 2**30:.2f}" if self.device == "cuda" else "-"
        self.rows.append((name, result, seconds, memory))

    def print(self) -> bool:
        width = max(len(r[0]) for r in self.rows)
        print(f"\n| {'check':<{width}} | result | s | peak GPU GiB |\n|{'-' * (width + 2)}|---|---|---|")
        for name, result, seconds, memory in self.rows:
            print(f"| {name:<{width}} | {result} | {seconds} | {memory} |")
        return not any(r[1].startswith("FAIL") for r in self.rows)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--tiny", action="store_true", help="a 2-layer model (CPU runs of this script's logic)")
    p.add_argument("--model-dir", default=str(PREPARED))
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.prepare:
        prepare()
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device visible to torch", file=sys.stderr)
        return 2
    from scripts.gpu_checks import CHECKS  # the checks themselves, one function each

    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    work = Path("/tmp/rank1-gpu-check")
    shutil.rmtree(work, ignore_errors=True)
    model = build_model(Path(args.model_dir), work / "model", args.tiny, dtype)
    print(json.dumps({"torch": torch.__version__, "device": torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu",
                      "model": model, "tiny": args.tiny}))
    report = Report(args.device)
    state: dict = {"model": model, "device": args.device, "dtype": dtype, "steps": args.steps, "work": work}
    for name, fn, needs in CHECKS:
        report.run(name, lambda fn=fn: fn(state), needs)
    return 0 if report.print() else 1


if __name__ == "__main__":
    sys.exit(main())
