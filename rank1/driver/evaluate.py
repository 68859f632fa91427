"""`rank1 eval`: pass@1 (greedy) and pass@k of base + adapter on a math benchmark; held-out accuracy in `rank1 train`.

A driver-side composition of two roles: rollout engines generate, the reward pool grades (math alone).

    rank1 eval --data math500 --adapter runs/x/adapter --k 4 --out runs/x/eval

Named sets: `arithmetic` (the embedded task's held-out problems: another generator seed, none of the
training questions), and `math500`, `gsm8k`, `aime24`, `amc23` from RANK1_DATA_DIR (a folder laid out
like `../shared/data`) when it is set, otherwise from the Hub; any JSONL file with a question field and
an answer field works too. The prompt follows how the adapter was trained (eval.prompt auto): the bare
question for SFT runs (s1K-style traces included), the run's instruction for GRPO runs; reasoning sets
get up to 32,768 new tokens (bounded by the model's context, or eval.max_model_len), as the paper's evaluation.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from rank1.core.commands import EVAL, command_main
from rank1.core.config import Config, DataConfig, EvalConfig
from rank1.core.data import DataError, heldout_arithmetic_rows, read_rows
from rank1.driver.eval_compare import describe, paired_gains, read_baseline, sampled_correct
from rank1.driver.metrics import log


@dataclass(frozen=True)
class Benchmark:
    local: str | None  # path under RANK1_DATA_DIR
    hub: tuple[str, str | None, str] | None  # (id, config, split)
    question: str
    gold_format: str
    max_new_tokens: int  # default generation length
    instruction: bool  # eval.prompt auto for a base model: append eval.instruction


REASONING_TOKENS = 32_768
VALIDATION_OFFSET = 1000  # arithmetic-val: held-out problems 1000.. (the reported `arithmetic` set uses the first ones)
BENCHMARKS = {
    "arithmetic": Benchmark(None, None, "question", "gsm8k", 64, False),
    "arithmetic-val": Benchmark(None, None, "question", "gsm8k", 64, False),  # for choosing settings: never the reported set
    "math500": Benchmark("math500/test.jsonl", ("HuggingFaceH4/MATH-500", None, "test"), "problem", "latex", REASONING_TOKENS, True),
    "gsm8k": Benchmark("gsm8k/test.jsonl", ("openai/gsm8k", "main", "test"), "question", "gsm8k", 1024, False),
    "aime24": Benchmark("aime24/test.jsonl", ("HuggingFaceH4/aime_2024", None, "train"), "problem", "latex", REASONING_TOKENS, True),
    "amc23": Benchmark("amc23/test.jsonl", ("math-ai/amc23", None, "test"), "problem", "latex", REASONING_TOKENS, True),
}
CUSTOM = Benchmark(None, None, "problem", "auto", REASONING_TOKENS, True)


def load_problems(name_or_path: str, limit: int | None, training_rows: int = 0) -> tuple[list[dict], str]:
    """[{question, gold}], gold format. Rows name their file and line in errors."""
    bench = BENCHMARKS.get(name_or_path)
    if name_or_path in ("arithmetic", "arithmetic-val"):
        # The validation problems follow the first VALIDATION_OFFSET held-out ones: disjoint from every test set
        # up to that size, and from training like them.
        skip = VALIDATION_OFFSET if name_or_path == "arithmetic-val" else 0
        rows = heldout_arithmetic_rows(skip + (limit or 200), training_rows)[skip:]
        return [{"question": r["question"], "gold": r["answer"]} for r in rows], bench.gold_format
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


def wilson_interval(correct: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion (sensible at 0 and 1, unlike p ± 1.96·se)."""
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def run_config_of(adapter: str | None) -> Config | None:
    """The rank1 run an adapter folder belongs to (RUN/adapter or RUN/checkpoints/step-N/adapter), if any."""
    if not adapter:
        return None
    from rank1.core.flags import from_dict

    import yaml

    here = Path(adapter).resolve()
    for run_dir in (here.parent, here.parent.parent.parent):
        if (run_dir / "config.yaml").is_file():
            return from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()) or {})
    return None


@dataclass
class EvalSet:
    name: str
    problems: list[dict]
    prompts: list[list[int]]
    gold_format: str
    max_new_tokens: int


def build_eval_set(cfg: Config, tokenizer, run: Config | None = None) -> EvalSet:
    """The problems of eval.data as prompts the way the adapter was trained, and the generation length."""
    e = cfg.eval
    bench = BENCHMARKS.get(e.data, CUSTOM)
    problems, gold_format = load_problems(e.data, e.heldout_rows if e.data.startswith("arithmetic") and e.limit is None else e.limit,
                                          (run or cfg).data.arithmetic_rows)
    if e.prompt == "auto" and run is not None:
        from rank1.driver.run import make_objective

        instruction = make_objective(run).instruction  # as the adapter's run prompted in training
    elif e.prompt == "auto":
        instruction = e.instruction if bench.instruction else None
    else:
        instruction = e.instruction if e.prompt == "instruction" else None
    system = [{"role": "system", "content": run.data.system_prompt}] if run and run.data.system_prompt else []
    prompts = []
    for p in problems:
        text = f"{p['question']} {instruction}" if instruction else p["question"]
        ids = tokenizer.apply_chat_template(system + [{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        prompts.append(list(ids["input_ids"] if isinstance(ids, dict) else ids))
    context = cfg.rollout.max_model_len  # `rank1 eval`: eval.max_model_len or the model's; in training: the engines'
    room = context - max(len(p) for p in prompts)
    if room < 1:
        raise DataError(f"eval.data {e.data}: the longest prompt has {context - room} tokens, which leaves no "
                        f"room to answer within a context of {context} (eval.max_model_len)")
    wanted = e.max_new_tokens or bench.max_new_tokens
    if wanted > room:
        log(f"eval: {wanted} new tokens capped at {room} (a context of {context} minus the longest prompt)")
    return EvalSet(e.data, problems, prompts, gold_format, min(wanted, room))


def sample_count(e: EvalConfig) -> int:
    """Samples drawn per problem: eval.n (at least eval.k) when eval.k > 1, else the greedy answer alone."""
    return max(e.n or e.k, e.k) if e.k > 1 else 1


def score_eval_set(engines, rewards, evalset: EvalSet, cfg: Config, samples: int = 1, progress: bool = True,
                   slot: int = 0) -> tuple[list[dict], dict]:
    """Greedy pass@1 (and pass@k from `samples` draws) of what the engines serve now in `slot`; per-problem records and the summary."""
    from rank1.rollout.engine import SamplingSpec

    e = cfg.eval
    runs = [("greedy", SamplingSpec(n=1, max_new_tokens=evalset.max_new_tokens, temperature=0.0, seed=cfg.seed))]
    if samples > 1:
        runs.append(("sampled", SamplingSpec(n=samples, max_new_tokens=evalset.max_new_tokens, temperature=e.temperature, seed=cfg.seed)))
    completions = {name: [[] for _ in evalset.problems] for name, _ in runs}
    with tqdm(total=len(evalset.problems) * len(runs), desc="eval", unit="problem", disable=not progress) as bar:
        for name, sampling in runs:
            for start in range(0, len(evalset.prompts), e.batch):
                prompts = evalset.prompts[start : start + e.batch]
                for c in engines.generate(prompts, sampling, [slot] * len(prompts)):
                    completions[name][start + c.prompt_index].append(c.text)
                bar.update(min(e.batch, len(evalset.prompts) - start))
    # Problem by problem, each problem's runs in turn: the order the records below take the grades back in.
    pairs = [(p["gold"], text) for i, p in enumerate(evalset.problems) for name, _ in runs for text in completions[name][i]]
    grades = iter(rewards.score(pairs))
    records = []
    for i, p in enumerate(evalset.problems):
        record = {"index": i, "question": p["question"], "gold": p["gold"]}
        for name, _ in runs:
            graded = [next(grades) for _ in completions[name][i]]
            record[name] = [{"completion": t, "reward": g.reward, "extracted": g.extracted, "status": g.status}
                            for t, g in zip(completions[name][i], graded)]
        record["pass@1"] = record["greedy"][0]["reward"]
        if samples > 1:
            record[f"pass@{e.k}"] = pass_at_k(samples, sum(s["reward"] > 0 for s in record["sampled"]), e.k)
        records.append(record)
    correct = sum(r["pass@1"] for r in records)
    low, high = wilson_interval(correct, len(records))
    summary = {"data": evalset.name, "problems": len(records), "correct": correct, "pass@1": correct / len(records),
               "pass@1_ci95": [low, high], "max_new_tokens": evalset.max_new_tokens}
    if samples > 1:
        summary[f"pass@{e.k}"] = sum(r[f"pass@{e.k}"] for r in records) / len(records)
        summary["sampled_pass@1"] = sum(sampled_correct(r) for r in records) / len(records)  # at eval.temperature
        summary.update(samples=samples, temperature=e.temperature)
    return records, summary


def model_context(model_path: str, cfg: Config) -> int:
    """The model's own context length (max_position_embeddings), else rollout.max_model_len."""
    from rank1.core.model import load_model_config

    return getattr(load_model_config(model_path, cfg.model.trust_remote_code), "max_position_embeddings", None) or cfg.rollout.max_model_len


def evaluate(cfg: Config) -> dict:
    import ray

    from rank1.core.adapter_io import read_adapter, resolve_base
    from rank1.core.model import load_tokenizer, resolve_model_path
    from rank1.core.workers import init_ray
    from rank1.rewards.pool import RewardPool
    from rank1.rollout.actors import EngineGroup

    e = cfg.eval
    adapter = read_adapter(e.adapter) if e.adapter else None
    if adapter:
        cfg.model = resolve_base(adapter[1], cfg.model)
    run = run_config_of(e.adapter)
    model_path = resolve_model_path(cfg.model)
    tokenizer = load_tokenizer(model_path, cfg.model)
    cfg.rollout.max_model_len = e.max_model_len or model_context(model_path, cfg)
    evalset = build_eval_set(cfg, tokenizer, run)
    samples = sample_count(e)
    baseline = (read_baseline(Path(e.compare_to), [p["question"] for p in evalset.problems], samples, e.temperature)
                if e.compare_to else None)  # refused before anything is generated
    out = Path(e.out or (Path(e.adapter).parent / "eval" if e.adapter else "eval"))

    init_ray(cfg.cluster)
    engines = EngineGroup.from_config(cfg.rollout, model_path, seed=cfg.seed, model=cfg.model,
                                      max_lora_rank=adapter[1].get("r", 1) if adapter else 1)
    cfg.rewards.gold_format = evalset.gold_format
    cfg.rewards.functions = ["math"]  # pass@k counts correct answers only, whatever training rewarded
    rewards = RewardPool(cfg.rewards)
    try:
        if adapter:
            engines.push_adapter(adapter[0], adapter[1], version=1)
        records, summary = score_eval_set(engines, rewards, evalset, cfg, samples)
    finally:
        engines.shutdown()
        rewards.close()
    summary.update(model=cfg.model.name_or_path, adapter=e.adapter)
    if baseline is not None:
        summary["compared_to"] = {"folder": e.compare_to, **paired_gains(baseline, records)}
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
    metrics = [k for k in summary if k.startswith("pass@") and not k.endswith("ci95")]
    for m in metrics:
        table.add_column(m, justify="right")
    name = summary["model"] + (f" + {summary['adapter']}" if summary["adapter"] else "")
    table.add_row(name, *(f"{summary[m]:.3f}" for m in metrics))
    Console().print(table)
    low, high = summary["pass@1_ci95"]
    print(f"pass@1 95% interval: [{low:.3f}, {high:.3f}]; per-problem results: {out / 'problems.jsonl'}")
    if "sampled_pass@1" in summary:
        print(f"sampled pass@1 (the share of correct samples): {summary['sampled_pass@1']:.3f}")
    if "compared_to" in summary:
        print("\n".join(describe(summary["compared_to"])))


def main(argv: list[str]) -> int:
    return command_main(EVAL, argv, evaluate)
