"""`rank1 sae ...`: collect, train, analyze, explain, report, random-adapter, concepts, compare, ablate — each
reads the config tree.

    rank1 sae collect --adapter runs/sft/adapter --data ../shared/data/gsm8k/test.jsonl --tokens 100000 --out acts/
    rank1 sae train --activations acts/ --out sae/ --eval-data ../shared/data/gsm8k/test.jsonl
    rank1 sae analyze --activations acts/ --sae sae/ --out analysis.json
    rank1 sae explain --analysis analysis.json --base-url http://127.0.0.1:8000/v1 --llm gpt-x --out explanations.json
    rank1 sae report --analysis analysis.json --explanations explanations.json --out dashboard/
    rank1 sae random-adapter --out random/ && rank1 sae collect --adapter random/ --data ... --out random_acts/
    rank1 sae concepts --activations acts/ --sae sae/ --control random_acts/ --out concepts.json
    rank1 sae compare --sae-a sft_sae/ --sae-b grpo_sae/ --analysis-a a.json --analysis-b b.json --out compare.json
    rank1 sae ablate --adapter runs/sft/adapter --data arithmetic-heldout.jsonl --out ablation.json

Each subcommand's flags are the fields of its section (`--k` is `--sae.train.k`); the documents and the
base come from the data and model sections (`--data`, `--model`), as for `rank1 train`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rank1.core.commands import SAE_COMMANDS, command_main
from rank1.core.config import Config
from rank1.core.data import DataError
from rank1.core.model import ModelError
from rank1.sae.errors import SAEError


def collect(cfg: Config) -> dict:
    from rank1.sae.collect import collect as run

    return run(cfg.sae.collect, cfg.data, cfg.model, progress=cfg.logging.progress)


def train(cfg: Config) -> dict:
    from rank1.sae.train import train_from_store

    return train_from_store(cfg.sae.train, seed=cfg.seed, progress=cfg.logging.progress)


def analyze(cfg: Config) -> dict:
    from rank1.sae.analyze import analyze as run
    from rank1.sae.analyze import write_json
    from rank1.sae.loading import load_tokenizer_for
    from rank1.sae.saelens_format import load_sae
    from rank1.sae.store import ActivationStore

    a = cfg.sae.analyze
    store = ActivationStore(a.activations)
    sae = load_sae(a.sae)[0] if a.sae else None
    data = run(store, sae, load_tokenizer_for(store.meta), a, seed=cfg.seed, progress=cfg.logging.progress)
    write_json(data, a.out)
    return {"out": a.out, "features": len(data["features"])}


def explain(cfg: Config) -> dict:
    from rank1.sae.clients import OpenAIChatClient, TransformersChatClient
    from rank1.sae.explain import explain_all

    e = cfg.sae.explain
    if not e.llm:
        raise SAEError("--llm is required: a model name at --base-url, or a local model path with --local")
    if e.local:
        client = TransformersChatClient(e.llm)
    elif e.base_url:
        client = OpenAIChatClient(e.base_url, e.llm, e.api_key_env)
    else:
        raise SAEError("give --base-url (an OpenAI-compatible endpoint) or --local")
    path = Path(e.analysis)
    if not path.is_file():
        raise SAEError(f"--analysis {path}: no such file (run `rank1 sae analyze` first)")
    analysis = json.loads(path.read_text())
    if any("random_window_max" not in f for f in analysis.get("features", [])):
        raise SAEError(f"--analysis {path}: no random_window_max per feature (an older analysis); rerun `rank1 sae analyze`")
    result = explain_all(client, analysis, e, seed=cfg.seed, progress=cfg.logging.progress)
    Path(e.out).parent.mkdir(parents=True, exist_ok=True)
    Path(e.out).write_text(json.dumps(result, indent=1))
    return {"out": e.out, "explained": len(result["explanations"])}


def report(cfg: Config) -> dict:
    from rank1.sae.report import write_report

    r = cfg.sae.report
    for flag, value in (("--analysis", r.analysis), ("--explanations", r.explanations)):
        if value and not Path(value).is_file():
            raise SAEError(f"{flag} {value}: no such file")
    return {"out": str(write_report(r.analysis, r.explanations, r.out, r.max_examples))}


def random_adapter(cfg: Config) -> dict:
    from rank1.sae.random_adapter import build_random_adapter

    return {"out": str(build_random_adapter(cfg.sae.random_adapter.out, cfg.model, cfg.adapter, seed=cfg.seed))}


def concepts(cfg: Config) -> dict:
    from rank1.sae.concept_table import write_concept_table

    return write_concept_table(cfg.sae.concepts, cfg.data.think_open, cfg.data.think_close, seed=cfg.seed)


def compare(cfg: Config) -> dict:
    from rank1.sae.compare_saes import write_comparison

    return write_comparison(cfg.sae.compare, seed=cfg.seed)


def ablate(cfg: Config) -> dict:
    from rank1.sae.ablate import ablate as run

    return run(cfg.sae.ablate, cfg.data, cfg.model)


RUNNERS = {"collect": collect, "train": train, "analyze": analyze, "explain": explain, "report": report,
           "random-adapter": random_adapter, "concepts": concepts, "compare": compare, "ablate": ablate}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in SAE_COMMANDS:
        print(__doc__ + "\nsubcommands: " + ", ".join(SAE_COMMANDS), file=sys.stderr if argv and argv[0] not in ("-h", "--help") else sys.stdout)
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    name, rest = argv[0], argv[1:]
    return command_main(SAE_COMMANDS[name], rest, lambda cfg: print(json.dumps(RUNNERS[name](cfg))),
                        errors=(SAEError, ModelError, DataError))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
