"""The argument reading of every `rank1` command: one `Command` each over the same config tree.

Each command takes --config FILE and every dotted flag; its own section's fields are flags by their
short names too (`rank1 eval --k 4`), which keeps the flags of earlier releases working.
"""

from __future__ import annotations

from rank1.core.flags import Command

TRAIN = Command("train", "Train a rank-1 adapter: SFT or GRPO (trainer.objective), on the embedded default without flags.",
                switches={"--dry-run": ("trainer.dry_run", True)})
SWEEP = Command("sweep", "N rank-1 runs over one frozen base: comma lists on train flags are the axes.",
                switches={"--dry-run": ("trainer.dry_run", True)})
STUDY = Command("study", "The paper's measurements on one config: accuracy per arm and recovery, then the SAE study.",
                section="study")
CONFIG_SHOW = Command("config show", "Print the resolved config tree as YAML.")
ADAPTERS = Command("adapters", "Adapter count and trainable parameters of a base model, from its config alone.")
GENERATE = Command("generate", "Sample from a base model plus a rank-1 adapter (transformers).", section="generate",
                   positionals=("generate.prompt",), required=("generate.prompt", "generate.adapter"),
                   switches={"--trust-remote-code": ("model.trust_remote_code", True)})
GRADE = Command("grade", "Grade {gold, completion} JSONL rows with math-verify (the math reward).", section="grade",
                positionals=("grade.input",), required=("grade.input", "grade.out"),
                flags={"--workers": "rewards.num_workers", "--timeout": "rewards.timeout_s", "--gold-format": "rewards.gold_format"})
EVAL = Command("eval", "pass@1 (greedy) and pass@k of base + adapter on a math benchmark.", section="eval")
EXPORT = Command("export", "A run, checkpoint or adapter folder -> a PEFT folder + model card (+ merged model, Hub push).",
                 section="export", positionals=("export.source",), required=("export.source", "export.out"),
                 switches={"--trust-remote-code": ("model.trust_remote_code", True)})
PLAN = Command("plan", "Per-device memory plan of a recipe from the model config; refuses what does not fit.", section="plan",
               positionals=("plan.recipe",), required=("plan.recipe",), config_positional="plan.recipe")
SAE_DATA_FLAGS = {"--data-format": "data.format", "--max-length": "data.max_length", "--max-rows": "data.max_rows"}
SAE_COLLECT = Command("sae collect", "Capture adapter activations (and baseline neurons) to resumable shards.",
                      section="sae.collect", required=("sae.collect.adapter", "sae.collect.out"), flags=SAE_DATA_FLAGS)
SAE_TRAIN = Command("sae train", "Train an SAE on collected adapter activations (SAELens format).", section="sae.train",
                    required=("sae.train.activations", "sae.train.out"))
SAE_ANALYZE = Command("sae analyze", "Top examples, histograms and density of every feature.", section="sae.analyze",
                      required=("sae.analyze.activations", "sae.analyze.out"))
SAE_EXPLAIN = Command("sae explain", "LLM explanations with detection and fuzzing scores and self-ratings.", section="sae.explain",
                      required=("sae.explain.analysis", "sae.explain.out"))
SAE_REPORT = Command("sae report", "Static HTML dashboard and PNG plots.", section="sae.report",
                     required=("sae.report.analysis", "sae.report.out"))
SAE_RANDOM = Command("sae random-adapter", "Save a randomly initialized rank-1 adapter (the control).",
                     section="sae.random_adapter", required=("sae.random_adapter.out",))
SAE_CONCEPTS = Command("sae concepts", "LLM-free score: each feature's best concept F1 on held-out documents, per family (JSON + PNG).",
                      section="sae.concepts", required=("sae.concepts.activations", "sae.concepts.out"))
SAE_COMPARE = Command("sae compare", "Two SAEs (SFT vs GRPO): shared and unique features, and the adapters' change per module and layer.",
                     section="sae.compare", required=("sae.compare.sae_a", "sae.compare.sae_b", "sae.compare.out"))
SAE_ABLATE = Command("sae ablate", "Leave-one-layer-out: KL(full adapter || adapter without layer L) on held-out text (JSON + PNG).",
                    section="sae.ablate", required=("sae.ablate.adapter", "sae.ablate.out"), flags=SAE_DATA_FLAGS)
SAE_COMMANDS = {c.name.split()[1]: c for c in (SAE_COLLECT, SAE_TRAIN, SAE_ANALYZE, SAE_EXPLAIN, SAE_REPORT, SAE_RANDOM, SAE_CONCEPTS,
                                                SAE_COMPARE, SAE_ABLATE)}


def command_main(command, argv: list[str], run, errors: tuple[type[BaseException], ...] = (), prog: str | None = None) -> int:
    """Parse argv for `command`, run `run(cfg)`; --help prints the flags; `errors` end with one line and exit 2."""
    import sys

    from rank1.core.config import ConfigError
    from rank1.core.flags import parse_command, usage

    if "--help" in argv or "-h" in argv:
        print(usage(command))
        return 0
    try:
        result = run(parse_command(command, argv))
    except (ConfigError, *errors) as e:
        print(f"{prog or 'rank1 ' + command.name}: error: {e}", file=sys.stderr)
        return 2
    return result if isinstance(result, int) else 0
