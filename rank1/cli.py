"""`rank1` command line: every command reads the same config tree (--config FILE, then dotted flags).

    rank1 train [--config FILE] [--objective sft|grpo] [--section.field VALUE ...] [--resume] [--dry-run]
    rank1 sweep --trainer.lr 1e-4,1e-3 --seed 0,1 [train flags]   N runs over one frozen base (the cartesian product)
    rank1 study [accuracy] [flags]       the paper's tables: accuracy per arm, recovery, then the SAE study
    rank1 config show [flags]            print the resolved config as YAML
    rank1 adapters --model ID_OR_PATH    adapter count and trainable parameters, from the config alone
    rank1 generate PROMPT --adapter DIR [--max-new-tokens N] [--temperature T]
    rank1 grade IN.jsonl --out OUT.jsonl grade completions against golds (math-verify)
    rank1 eval --data arithmetic|math500|gsm8k|aime24|amc23|PATH [--adapter DIR] [--k N]   pass@1 and pass@k
    rank1 export RUN_OR_CHECKPOINT --out DIR [--merge] [--push-to-hub OWNER/NAME]   PEFT folder + model card, Hub push
    rank1 plan RECIPE [--gpu h200]       per-device memory plan from the model config; refuses what does not fit
    rank1 sae SUBCOMMAND ...             capture adapter activations, train and read SAEs

`rank1 COMMAND --help` lists a command's own flags; `rank1 config show` lists every field.
"""

from __future__ import annotations

import importlib
import sys

from rank1.core.commands import ADAPTERS, CONFIG_SHOW, TRAIN
from rank1.core.config import ConfigError
from rank1.core.flags import parse_command, to_yaml, usage

USAGE = __doc__
# Commands whose module reads its own arguments (with rank1.core.flags); imported only when used.
ROLE_COMMANDS = {"grade": "rank1.rewards.cli", "sae": "rank1.sae.cli", "eval": "rank1.driver.evaluate",
                 "export": "rank1.export", "plan": "rank1.driver.plan", "generate": "rank1.driver.generate",
                 "sweep": "rank1.driver.sweep", "study": "rank1.driver.study"}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"train": cmd_train, "config": cmd_config, "adapters": cmd_adapters}
    if command not in handlers and command not in ROLE_COMMANDS:
        print(f"rank1: unknown command '{command}'\n{USAGE}", file=sys.stderr)
        return 2
    try:
        if command in handlers:
            return handlers[command](rest)
        return importlib.import_module(ROLE_COMMANDS[command]).main(rest)
    except (ConfigError, ValueError, OSError, RuntimeError) as e:
        # Our input errors (ConfigError, DataError, ModelError are ValueErrors) end the run with
        # one clear line; anything else is a bug and keeps its traceback.
        print(f"rank1 {command}: error: {e}", file=sys.stderr)
        return 2


def cmd_train(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(usage(TRAIN))
        return 0
    cfg = parse_command(TRAIN, argv)
    from rank1.driver.loop import PREEMPTED_EXIT_CODE, Preempted
    from rank1.driver.run import train

    try:
        train(cfg)
    except Preempted as e:
        print(f"rank1 train: {e}", file=sys.stderr)
        return PREEMPTED_EXIT_CODE
    return 0


def cmd_config(argv: list[str]) -> int:
    if not argv or argv[0] != "show":
        raise ConfigError("usage: rank1 config show [--config FILE] [--section.field VALUE ...]")
    print(to_yaml(parse_command(CONFIG_SHOW, argv[1:])), end="")
    return 0


def cmd_adapters(argv: list[str]) -> int:
    cfg = parse_command(ADAPTERS, argv)
    from rank1.core.model import count_adapters_from_config

    count = count_adapters_from_config(cfg.model.name_or_path, cfg.adapter, cfg.model.trust_remote_code)
    print(f"{cfg.model.name_or_path}: {count.describe()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
