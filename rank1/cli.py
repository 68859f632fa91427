"""`rank1` command line.

    rank1 train [--config FILE] [--objective sft] [--section.field VALUE ...] [--resume]
    rank1 config show [flags]            print the resolved config as YAML
    rank1 adapters --model ID_OR_PATH    adapter count and trainable parameters, from the config alone
    rank1 generate --adapter DIR [--model M] [--max-new-tokens N] [--temperature T] PROMPT
    rank1 grade IN.jsonl --out OUT.jsonl grade completions against golds (math-verify)
    rank1 eval --data math500|gsm8k|aime24|amc23|PATH [--adapter DIR] [--k N]   pass@1 and pass@k
    rank1 export RUN_OR_CHECKPOINT --out DIR [--merge] [--push-to-hub OWNER/NAME]   PEFT folder + model card, Hub push
    rank1 plan RECIPE [--gpu h200]       per-device memory plan from the model config; refuses what does not fit
    rank1 sae SUBCOMMAND ...             capture adapter activations, train and read SAEs

Config flags are the same for every subcommand that takes them; see README.md for the reference.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from rank1.config import ConfigError, load_config, to_yaml

USAGE = __doc__
# Subcommands whose module parses its own arguments; imported only when used.
ROLE_COMMANDS = {"grade": "rank1.rewards.cli", "sae": "rank1.sae.cli", "eval": "rank1.evaluate", "export": "rank1.export", "plan": "rank1.plan"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"train": cmd_train, "config": cmd_config, "adapters": cmd_adapters, "generate": cmd_generate}
    if command not in handlers and command not in ROLE_COMMANDS:
        print(f"rank1: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if command in handlers:
            return handlers[command](rest)
        return importlib.import_module(ROLE_COMMANDS[command]).main(rest)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as e:
        # Our input errors (ConfigError, DataError, ModelError are ValueErrors) end the run with
        # one clear line; anything else is a bug and keeps its traceback.
        print(f"rank1 {command}: error: {e}", file=sys.stderr)
        return 2


def cmd_train(argv: list[str]) -> int:
    cfg = load_config(argv)
    from rank1.driver import train

    train(cfg)
    return 0


def cmd_config(argv: list[str]) -> int:
    if not argv or argv[0] != "show":
        raise ConfigError("usage: rank1 config show [--config FILE] [--section.field VALUE ...]")
    print(to_yaml(load_config(argv[1:])), end="")
    return 0


def cmd_adapters(argv: list[str]) -> int:
    cfg = load_config(argv)
    from rank1.model import count_adapters_from_config

    count = count_adapters_from_config(cfg.model.name_or_path, cfg.adapter, cfg.model.trust_remote_code)
    print(f"{cfg.model.name_or_path}: {count.describe()}")
    return 0


def cmd_generate(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="rank1 generate", description="Sample from a base model plus a rank-1 adapter.")
    parser.add_argument("prompt")
    parser.add_argument("--adapter", required=True, help="PEFT adapter folder (a run's adapter/ or a checkpoint's)")
    parser.add_argument("--model", help="base model; default: the adapter's base_model_name_or_path")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--trust-remote-code", action="store_true")
    args = parser.parse_args(argv)
    from rank1.generate import generate

    print(generate(args.adapter, args.prompt, model=args.model, max_new_tokens=args.max_new_tokens,
                   temperature=args.temperature, seed=args.seed, trust_remote_code=args.trust_remote_code))
    return 0


if __name__ == "__main__":
    sys.exit(main())
