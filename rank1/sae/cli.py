"""`rank1 sae ...`: collect, train, analyze, explain, report, random-adapter.

    rank1 sae collect --adapter runs/sft/adapter --data ../shared/data/gsm8k/test.jsonl --tokens 100000 --out acts/
    rank1 sae train --activations acts/ --out sae/
    rank1 sae analyze --activations acts/ --sae sae/ --out analysis.json
    rank1 sae explain --analysis analysis.json --base-url http://127.0.0.1:8000/v1 --llm gpt-x --out explanations.json
    rank1 sae report --analysis analysis.json --explanations explanations.json --out dashboard/
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rank1.config import ConfigError, DataConfig, SAEConfig
from rank1.data import DataError
from rank1.model import ModelError
from rank1.sae.errors import SAEError


def _parser() -> argparse.ArgumentParser:
    defaults = SAEConfig()
    p = argparse.ArgumentParser(prog="rank1 sae", description="Study rank-1 adapter activations with sparse autoencoders.")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("collect", help="capture adapter activations (and baseline neurons) to shards")
    c.add_argument("--adapter", required=True, help="saved PEFT adapter folder")
    c.add_argument("--data", required=True, help="a data set rank1.data reads (JSONL/JSON/Parquet, 'arithmetic', Hub id)")
    c.add_argument("--data-format", default="auto")
    c.add_argument("--text-field", default=None, help="read this field as plain text instead of a chat format")
    c.add_argument("--max-length", type=int, default=512)
    c.add_argument("--max-rows", type=int, default=None)
    c.add_argument("--tokens", type=int, required=True, help="collect at least this many tokens (whole batches)")
    c.add_argument("--out", required=True)
    c.add_argument("--model", default=None, help="base model (default: the embedded SmolLM2-135M-Instruct)")
    c.add_argument("--batch-docs", type=int, default=8)
    c.add_argument("--shard-tokens", type=int, default=65536)
    c.add_argument("--neurons-per-layer", type=int, default=6)

    t = sub.add_parser("train", help="train an SAE on collected adapter activations")
    t.add_argument("--activations", required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--architecture", default=defaults.architecture, help="batchtopk | topk | relu")
    t.add_argument("--k", type=int, default=defaults.k)
    t.add_argument("--expansion", type=int, default=defaults.expansion)
    t.add_argument("--lr", type=float, default=defaults.lr)
    t.add_argument("--batch-size", type=int, default=defaults.batch_size)
    t.add_argument("--warmup-steps", type=int, default=defaults.warmup_steps)
    t.add_argument("--aux-coefficient", type=float, default=defaults.aux_coefficient)
    t.add_argument("--dead-after-tokens", type=int, default=defaults.dead_after_tokens)
    t.add_argument("--l1-coefficient", type=float, default=5.0, help="relu architecture only")
    t.add_argument("--log-every", type=int, default=100)
    t.add_argument("--no-normalize", action="store_true", help="train on raw activations (no input scaling)")
    t.add_argument("--no-effect", action="store_true", help="skip the adapter-effect-recovered evaluation (needs the model)")
    t.add_argument("--eval-data", default=None, help="held-out data for the effect (default: documents the collection did not use)")
    t.add_argument("--eval-docs", type=int, default=16)
    t.add_argument("--seed", type=int, default=0)

    a = sub.add_parser("analyze", help="top examples, histograms and density of every feature")
    a.add_argument("--activations", required=True)
    a.add_argument("--sae", default=None, help="an SAE folder from `train` (its latents become features)")
    a.add_argument("--out", required=True, help="output JSON file")
    a.add_argument("--top-k", type=int, default=50)
    a.add_argument("--context", type=int, default=30)
    a.add_argument("--bins", type=int, default=40)
    a.add_argument("--random-examples", type=int, default=200)
    a.add_argument("--max-features-per-source", type=int, default=None)

    e = sub.add_parser("explain", help="LLM explanations, detection scores and self-ratings")
    e.add_argument("--analysis", required=True)
    e.add_argument("--out", required=True)
    e.add_argument("--base-url", default=None, help="OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1")
    e.add_argument("--llm", default=None, help="model name at --base-url, or a local transformers model path with --local")
    e.add_argument("--local", action="store_true", help="run --llm locally with transformers")
    e.add_argument("--api-key-env", default="OPENAI_API_KEY", help="environment variable holding the API key")
    e.add_argument("--max-features", type=int, default=None, help="per source")
    e.add_argument("--n-explain", type=int, default=20)
    e.add_argument("--n-score", type=int, default=10)
    e.add_argument("--max-tokens", type=int, default=256, help="reply length limit per request")
    e.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("report", help="static HTML dashboard and PNG plots")
    r.add_argument("--analysis", required=True)
    r.add_argument("--explanations", default=None)
    r.add_argument("--out", required=True)
    r.add_argument("--max-examples", type=int, default=10)

    g = sub.add_parser("random-adapter", help="save a randomly initialized rank-1 adapter (the control)")
    g.add_argument("--out", required=True)
    g.add_argument("--model", default=None)
    g.add_argument("--seed", type=int, default=0)
    return p


def _positive(args, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise SAEError(f"--{name.replace('_', '-')} must be > 0, got {value}")


def run(args) -> dict:
    from rank1.sae.loading import model_config_for

    if args.command == "collect":
        from rank1.sae.collect import CollectSettings, collect

        _positive(args, "tokens", "batch_docs", "shard_tokens", "max_length", "max_rows")
        data = DataConfig(path=args.data, format=args.data_format, max_length=args.max_length, max_rows=args.max_rows)
        settings = CollectSettings(args.tokens, args.batch_docs, args.shard_tokens, args.neurons_per_layer, args.text_field)
        return collect(args.adapter, data, model_config_for(args.model), args.out, settings)
    if args.command == "train":
        from rank1.sae.train import EffectSettings, train_from_store
        from rank1.sae.trainer import SAETrainerConfig

        _positive(args, "k", "expansion", "lr", "batch_size", "log_every", "eval_docs")
        trainer = SAETrainerConfig(
            lr=args.lr, batch_size=args.batch_size, warmup_steps=args.warmup_steps, aux_coefficient=args.aux_coefficient,
            dead_after_tokens=args.dead_after_tokens, log_every=args.log_every,
        )
        sae_cfg = {"k": args.k, "expansion": args.expansion, "architecture": args.architecture,
                   "normalize_activations": not args.no_normalize, "l1_coefficient": args.l1_coefficient}
        effect = None if args.no_effect else EffectSettings(data=args.eval_data, docs=args.eval_docs)
        return train_from_store(args.activations, args.out, sae_cfg, trainer, effect, seed=args.seed)
    if args.command == "analyze":
        from rank1.sae.analyze import AnalyzeSettings, analyze, write_json
        from rank1.sae.loading import load_tokenizer_for
        from rank1.sae.saelens_format import load_sae
        from rank1.sae.store import ActivationStore

        _positive(args, "top_k", "bins", "max_features_per_source")
        store = ActivationStore(args.activations)
        sae = load_sae(args.sae)[0] if args.sae else None
        settings = AnalyzeSettings(args.top_k, args.context, args.bins, args.random_examples, args.max_features_per_source)
        data = analyze(store, sae, load_tokenizer_for(store.meta), settings)
        write_json(data, args.out)
        return {"out": args.out, "features": len(data["features"])}
    if args.command == "explain":
        from rank1.sae.clients import OpenAIChatClient, TransformersChatClient
        from rank1.sae.explain import ExplainSettings, explain_all

        if not args.llm:
            raise SAEError("--llm is required: a model name at --base-url, or a local model path with --local")
        if args.local:
            client = TransformersChatClient(args.llm)
        elif args.base_url:
            client = OpenAIChatClient(args.base_url, args.llm, args.api_key_env)
        else:
            raise SAEError("give --base-url (an OpenAI-compatible endpoint) or --local")
        path = Path(args.analysis)
        if not path.is_file():
            raise SAEError(f"--analysis {path}: no such file (run `rank1 sae analyze` first)")
        data = json.loads(path.read_text())
        result = explain_all(client, data, ExplainSettings(args.n_explain, args.n_score, args.max_features, args.max_tokens, args.seed))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        return {"out": args.out, "explained": len(result["explanations"])}
    if args.command == "report":
        from rank1.sae.report import write_report

        for flag, value in (("--analysis", args.analysis), ("--explanations", args.explanations)):
            if value and not Path(value).is_file():
                raise SAEError(f"{flag} {value}: no such file")
        return {"out": str(write_report(args.analysis, args.explanations, args.out, args.max_examples))}
    if args.command == "random-adapter":
        from rank1.sae.random_adapter import build_random_adapter

        return {"out": str(build_random_adapter(args.out, model_config_for(args.model), seed=args.seed))}
    raise AssertionError(args.command)


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        result = run(args)
    except (SAEError, ModelError, DataError, ConfigError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
