"""`rank1 eval`: pass@1 (greedy) and pass@k (k samples) of base + adapter on a math benchmark.

A driver-side composition of two roles: rollout engines generate, the reward pool grades.

    rank1 eval --data math500 --adapter runs/x/adapter --k 4 --out runs/x/eval

Named benchmarks load from RANK1_DATA_DIR (a folder laid out like `../shared/data`) when it is set,
otherwise from the Hub; any JSONL file with a question field and an answer field works too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rank1.config import ConfigError, load_config
from rank1.data import DataError

INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."


@dataclass(frozen=True)
class Benchmark:
    local: str  # path under RANK1_DATA_DIR
    hub: tuple[str, str | None, str]  # (id, config, split)
    question: str
    gold_format: str


BENCHMARKS = {
    "math500": Benchmark("math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"), "problem", "latex"),
    "gsm8k": Benchmark("gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"), "question", "gsm8k"),
    "aime24": Benchmark("aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train"), "problem", "latex"),
    "amc23": Benchmark("amc23/test.jsonl", ("math-ai/amc23", None, "test"), "problem", "latex"),
}


def load_problems(name_or_path: str, limit: int | None) -> tuple[list[dict], str]:
    """[{question, gold}], gold format. Rows name their file and line in errors."""
    from rank1.config import DataConfig
    from rank1.data import read_rows

    bench = BENCHMARKS.get(name_or_path)
    if bench:
        root = os.environ.get("RANK1_DATA_DIR")
        if root and (Path(root) / bench.local).is_file():
            cfg = DataConfig(path=str(Path(root) / bench.local))
        else:
            cfg = DataConfig(path=bench.hub[0], name=bench.hub[1], split=bench.hub[2])
        question_keys, gold_format = (bench.question,), bench.gold_format
    else:
        cfg, question_keys, gold_format = DataConfig(path=name_or_path), ("problem", "question", "prompt"), "auto"
    cfg.max_rows = limit
    rows, source = read_rows(cfg)
    problems = []
    for i, row in enumerate(rows):
        where = row.pop("__where__", f"{source} row {i + 1}")
        question = next((row[k] for k in question_keys if isinstance(row.get(k), str) and row[k]), None)
        gold = row.get("answer")
        if question is None:
            raise DataError(f"{where}: no question (expected a string field: {', '.join(question_keys)})")
        if isinstance(gold, float) and gold.is_integer():
            gold = int(gold)  # AMC23 stores 27.0
        if not isinstance(gold, (str, int, float)) or gold == "":
            raise DataError(f"{where}: missing or non-scalar 'answer'")
        problems.append({"question": question, "gold": str(gold)})
    return problems, gold_format


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased estimator (Chen et al., 2021): 1 - C(n - c, k) / C(n, k)."""
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def evaluate(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(prog="rank1 eval", description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", help="PEFT adapter folder; omit to evaluate the base model")
    parser.add_argument("--k", type=int, default=1, help="samples per problem for pass@k (temperature rollout.temperature)")
    parser.add_argument("--limit", type=int, help="first N problems only")
    parser.add_argument("--out", help="folder for problems.jsonl and summary.json (default: ADAPTER/../eval or eval/)")
    parser.add_argument("--batch", type=int, default=32, help="problems per generation call (progress granularity)")
    args, config_flags = parser.parse_known_args(argv)
    cfg = load_config(config_flags + ["--output-dir", "unused"])
    if args.k < 1:
        raise ConfigError(f"--k: must be >= 1, got {args.k}")
    problems, gold_format = load_problems(cfg.data.path, args.limit)
    out = Path(args.out or (Path(args.adapter).parent / "eval" if args.adapter else "eval"))

    import ray
    from safetensors.torch import load_file

    from rank1.actors import init_ray
    from rank1.model import load_tokenizer, resolve_model_path
    from rank1.rewards.pool import RewardPool
    from rank1.rollout.actors import EngineGroup
    from rank1.rollout.engine import SamplingSpec

    adapter_config = None
    if args.adapter:
        config_file = Path(args.adapter) / "adapter_config.json"
        if not config_file.is_file():
            raise ConfigError(f"--adapter {args.adapter}: no adapter_config.json there (not a PEFT adapter folder)")
        adapter_config = json.loads(config_file.read_text())
        if "--model" not in config_flags and "--model.name_or_path" not in config_flags:
            cfg.model.name_or_path = adapter_config["base_model_name_or_path"]
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": f"{p['question']}\n{INSTRUCTION}"}],
                                             add_generation_prompt=True, tokenize=True, return_dict=False) for p in problems]
    prompts = [list(p["input_ids"] if isinstance(p, dict) else p) for p in prompts]

    init_ray(cfg.cluster)
    engines = EngineGroup.from_config(cfg.rollout, model_path, seed=cfg.seed)
    cfg.rewards.gold_format = gold_format
    cfg.rewards.functions = ["math"]  # pass@k counts correct answers only, whatever training rewarded
    rewards = RewardPool(cfg.rewards)
    try:
        if adapter_config:
            engines.push_adapter(load_file(str(Path(args.adapter) / "adapter_model.safetensors")), adapter_config, version=1)
        runs = [("greedy", SamplingSpec.from_config(cfg.rollout, n=1, temperature=0.0, seed=cfg.seed))]
        if args.k > 1:
            runs.append(("sampled", SamplingSpec.from_config(cfg.rollout, n=args.k, seed=cfg.seed)))
        completions = {name: [[] for _ in problems] for name, _ in runs}
        with tqdm(total=len(problems) * len(runs), desc="eval", unit="problem") as bar:
            for name, sampling in runs:
                for start in range(0, len(prompts), args.batch):
                    for c in engines.generate(prompts[start : start + args.batch], sampling):
                        completions[name][start + c.prompt_index].append(c.text)
                    bar.update(min(args.batch, len(prompts) - start))
        pairs = [(p["gold"], text) for name, _ in runs for p, texts in zip(problems, completions[name]) for text in texts]
        grades = iter(rewards.score(pairs))
    finally:
        engines.shutdown()
        rewards.close()

    records = []
    for i, p in enumerate(problems):
        record = {"index": i, "question": p["question"], "gold": p["gold"]}
        for name, _ in runs:
            graded = [next(grades) for _ in completions[name][i]]
            record[name] = [{"completion": t, "reward": g.reward, "extracted": g.extracted, "status": g.status}
                            for t, g in zip(completions[name][i], graded)]
        record["pass@1"] = record["greedy"][0]["reward"]
        if args.k > 1:
            record[f"pass@{args.k}"] = pass_at_k(args.k, sum(s["reward"] > 0 for s in record["sampled"]), args.k)
        records.append(record)
    summary = {"data": cfg.data.path, "model": cfg.model.name_or_path, "adapter": args.adapter, "problems": len(records),
               "pass@1": sum(r["pass@1"] for r in records) / len(records)}
    if args.k > 1:
        summary[f"pass@{args.k}"] = sum(r[f"pass@{args.k}"] for r in records) / len(records)
    out.mkdir(parents=True, exist_ok=True)
    (out / "problems.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print_summary(summary, out)
    if ray.is_initialized():
        ray.shutdown()
    return summary


def print_summary(summary: dict, out: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"rank1 eval: {summary['data']} ({summary['problems']} problems)")
    table.add_column("model")
    metrics = [k for k in summary if k.startswith("pass@")]
    for m in metrics:
        table.add_column(m, justify="right")
    name = summary["model"] + (f" + {summary['adapter']}" if summary["adapter"] else "")
    table.add_row(name, *(f"{summary[m]:.3f}" for m in metrics))
    Console().print(table)
    print(f"per-problem results: {out / 'problems.jsonl'}")


def main(argv: list[str]) -> int:
    evaluate(argv)
    return 0
