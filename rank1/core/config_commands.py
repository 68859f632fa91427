"""The sections of the config tree that one command reads: export, generate, grade, plan, sweep, study
and the `rank1 sae` subcommands (rank1.core.config holds the training run's sections and the tree)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from rank1.core.knobs import knob


@dataclass
class ExportConfig:
    source: str | None = None  # `rank1 export SOURCE`: a run dir, a checkpoint, or a PEFT folder
    out: str | None = None  # the folder to write (new or empty, unless force)
    merge: bool = False  # also write the merged full model (sharded safetensors + tokenizer)
    dtype: Literal["fp32", "bf16"] = "fp32"
    push_to_hub: str | None = None  # OWNER/NAME; with `rank1 train`, the final adapter is pushed when the run ends
    private: bool = False
    revision: str | None = None  # Hub branch to push to (created if needed); None = main
    base_model: str | None = None  # name this base in the adapter config and card (default: the adapter's own)
    license: str | None = None  # license id for the card (default: the base's, when rank1 knows it)
    max_shard_size: str = "2GB"  # merge: largest safetensors shard
    force: bool = False  # replace a non-empty out folder


@dataclass
class GenerateConfig:
    prompt: str | None = None
    adapter: str | None = None  # PEFT folder (a run's adapter/ or a checkpoint's)
    max_new_tokens: int = knob(128, gt=0)
    temperature: float = knob(0.0, ge=0)  # 0 = greedy


@dataclass
class GradeConfig:
    input: str | None = None  # JSONL rows {gold, completion}
    out: str | None = None  # graded rows, written whole or not at all


@dataclass
class PlanConfig:
    recipe: str | None = None  # the recipe YAML (also read as --config)
    gpu: Literal["h100", "h200", "a100-80g", "a100-40g", "l40s"] = "h100"
    device_memory_gb: float | None = knob(None, gt=0)  # instead of gpu
    gpus_per_node: int = knob(8, gt=0)
    nodes: int | None = knob(None, gt=0)  # cluster size to check the job against (default: as many as it needs)
    runs: int = knob(1, gt=0)  # a `rank1 sweep` of this many runs: one base, this many adapters and optimizer states


@dataclass
class SweepConfig:
    """`rank1 sweep`: runs over one base (axes are comma lists on train flags, e.g. --trainer.lr 1e-4,3e-4)."""

    runs: str | None = None  # a YAML list of override mappings instead of axes, e.g. [{trainer.lr: 1e-4, seed: 1}]
    max_runs: int = knob(16, gt=0)  # a sweep larger than this is refused (each run is an adapter in every learner)


@dataclass
class SAECollectConfig:
    """`rank1 sae collect`: documents come from the data section, the base from the model section."""

    adapter: str | None = None  # the PEFT folder whose activations are captured
    tokens: int = knob(100_000, gt=0)  # collect at least this many tokens (whole batches)
    out: str | None = None
    text_field: str | None = None  # read this field as plain text instead of a chat format
    batch_docs: int = knob(8, gt=0)
    shard_tokens: int = knob(65536, gt=0)
    neurons_per_layer: int = knob(6, ge=0)  # the paper's MLP baseline: first 6 up_proj channels per layer
    # Recorded with the collection, which stores every position: SAE training, the adapter effect, analysis
    # and concept scores leave out positions below it. Position 0 is an attention sink whose adapter vector
    # is the same in every document at ~10x the norm (measured: 70 % of the variance on SmolLM2).
    skip_positions: int = knob(1, ge=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # cuda: the base spread over every visible GPU
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU (stored as fp32)


@dataclass
class SAETrainConfig:
    activations: str | None = None  # a collection folder
    out: str | None = None
    architecture: Literal["batchtopk", "topk", "relu"] = "batchtopk"
    k: int = knob(16, gt=0)
    expansion: int = knob(8, gt=0)
    lr: float = knob(5e-4, gt=0)
    batch_size: int = knob(512, gt=0)
    warmup_steps: int = knob(100, ge=0)  # at most a tenth of the run's steps
    train_tokens: int = knob(2_000_000, gt=0)  # passes over a small collection until this many (at least one pass)
    aux_coefficient: float = knob(0.03125, ge=0)  # AuxK, 1/32
    dead_after_tokens: int = knob(1_000_000, gt=0)  # a latent is dead (AuxK revives it) after this many tokens unfired
    l1_coefficient: float = knob(5.0, ge=0)  # relu architecture only
    aux_k: int | None = knob(None, gt=0)  # dead latents AuxK reconstructs from per token; None = d_in // 2
    betas: list[float] = knob([0.9, 0.999])  # Adam
    normalization_batches: int = knob(4, gt=0)  # batches that estimate the input scale and b_dec
    log_every: int = knob(100, gt=0)
    normalize: bool = True  # scale inputs to mean squared norm d_in
    effect: bool = True  # evaluate the adapter effect recovered (needs the model)
    # The adapter effect is measured on the collection's own data past what it collected (keys effect_recovered,
    # ...), and on each of these data sets (names or files) too, under keys suffixed '@<name>' (effect_recovered@gsm8k-test).
    eval_data: list[str] = knob([])
    eval_docs: int = knob(16, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "cpu"


@dataclass
class SAEAnalyzeConfig:
    activations: str | None = None
    sae: str | None = None  # an SAE folder from `train` (its latents become features)
    out: str | None = None  # output JSON file
    top_k: int = knob(50, gt=0)
    context: int = knob(30, ge=0)
    bins: int = knob(40, gt=0)
    random_examples: int = knob(200, ge=0)
    max_features_per_source: int | None = knob(None, gt=0)


@dataclass
class SAEExplainConfig:
    analysis: str | None = None
    out: str | None = None
    base_url: str | None = None  # OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1
    llm: str | None = None  # model name at base_url, or a local transformers model path with local
    local: bool = False
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the API key (never written out)
    max_features: int | None = knob(None, gt=0)  # per source
    n_explain: int = knob(20, gt=0)
    n_score: int = knob(10, gt=0)
    max_tokens: int = knob(256, gt=0)  # reply length limit per request


@dataclass
class SAEReportConfig:
    analysis: str | None = None
    explanations: str | None = None
    out: str | None = None
    max_examples: int = knob(10, gt=0)


@dataclass
class SAEConceptsConfig:
    """`rank1 sae concepts`: each feature's best concept F1 on held-out documents, per family (no LLM needed)."""

    activations: str | None = None  # a collection folder: adapter directions (±) and MLP neurons
    sae: str | None = None  # an SAE trained on it: its latents are a family too
    control: str | None = None  # a collection made with `rank1 sae random-adapter`'s adapter: the random_adapter family
    out: str | None = None  # output JSON; the F1 distributions go to the same name with .png
    heldout_fraction: float = knob(0.3, gt=0, lt=1)  # documents held out: F1 is reported on them only
    threshold: float = knob(0.5, gt=0, le=1)  # the table's share of features with held-out F1 at or above this


@dataclass
class SAECompareConfig:
    """`rank1 sae compare`: two SAEs (e.g. of an SFT adapter and of the GRPO adapter trained from it)."""

    sae_a: str | None = None
    sae_b: str | None = None
    analysis_a: str | None = None  # `rank1 sae analyze --sae SAE_A` output: examples for A's latents
    analysis_b: str | None = None
    adapter_a: str | None = None  # default: the adapter SAE A was trained on (its cfg.json)
    adapter_b: str | None = None
    out: str | None = None  # output JSON; a PNG beside it
    quantile: float = knob(0.99, gt=0, lt=1)  # shared: matched cosine above this quantile of random dictionaries'
    method: Literal["auto", "hungarian", "greedy"] = "auto"
    examples: int = knob(3, ge=0)  # examples shown per feature


@dataclass
class SAEAblateConfig:
    """`rank1 sae ablate`: leave one layer's adapters out; KL(full adapter || without the layer) on the data section's text."""

    adapter: str | None = None
    out: str | None = None  # output JSON; a PNG beside it
    docs: int = knob(32, gt=0)  # documents read (the first of the data set: pass held-out text)
    batch_docs: int = knob(8, gt=0)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"


@dataclass
class SAERandomAdapterConfig:
    out: str | None = None  # the base comes from the model section, the shape from the adapter section


def subcommand(cls, name: str):
    """A section read by one `rank1 sae NAME` (the name is recorded for `--help` and the docs)."""
    return field(default_factory=cls, metadata={"command": f"rank1 sae {name}"})


@dataclass
class SAEConfig:
    """One subsection per `rank1 sae` subcommand (`--sae.train.k` is `rank1 sae train --k`)."""

    collect: SAECollectConfig = subcommand(SAECollectConfig, "collect")
    train: SAETrainConfig = subcommand(SAETrainConfig, "train")
    analyze: SAEAnalyzeConfig = subcommand(SAEAnalyzeConfig, "analyze")
    explain: SAEExplainConfig = subcommand(SAEExplainConfig, "explain")
    report: SAEReportConfig = subcommand(SAEReportConfig, "report")
    random_adapter: SAERandomAdapterConfig = subcommand(SAERandomAdapterConfig, "random-adapter")
    concepts: SAEConceptsConfig = subcommand(SAEConceptsConfig, "concepts")
    compare: SAECompareConfig = subcommand(SAECompareConfig, "compare")
    ablate: SAEAblateConfig = subcommand(SAEAblateConfig, "ablate")


@dataclass
class StudyConfig:
    """`rank1 study [accuracy]`: every arm is `rank1 train` with the study's train flags plus its own, and every
    arm is scored by `rank1 eval` on the same held-out problems."""

    out: str = "study"  # one folder per arm, results.json, report.md, accuracy.png (and the interpretability stages)
    # base, rank1-sft, rank1-grpo (GRPO from the rank1-sft adapter), rank<r>-sft (any r), full-sft (every weight)
    arms: list[str] = knob(["base", "rank1-sft", "rank1-grpo", "rank8-sft", "full-sft"])
    rank1_lrs: list[float] = knob([1e-3])  # SFT learning rates tried for rank 1 (several: the best on validation)
    rank_r_lrs: list[float] = knob([1e-3, 3e-3])  # ... for the rank-r arms
    full_lrs: list[float] = knob([3e-5, 1e-4])  # ... for the full fine-tune
    grpo_lr: float | None = knob(None, gt=0)  # None: the GRPO default (trainer.lr's for grpo)
    grpo_steps: int = knob(20, gt=0)
    eval_sets: list[str] = knob(["arithmetic"])  # what every arm is scored on (eval.data names or JSONL paths)
    test_rows: int = knob(400, gt=0, le=1000)  # problems of the arithmetic test set
    validation_data: str = "arithmetic-val"  # where several learning rates are compared (never a test set)
    validation_rows: int = knob(100, gt=0)
    stages: list[Literal["accuracy", "interpretability"]] = knob(["accuracy", "interpretability"])  # `rank1 study accuracy`: the first
    # A published full fine-tune's accuracy per eval set, NAME=ACCURACY (e.g. math500=0.93 for s1-32B), for the
    # recovery of a study that trains no full-sft arm (a 32B full fine-tune is not rank1's business)
    full_reference: list[str] = knob([])
    # interpretability: activations collected per adapter (SFT, GRPO, the random control) on the training data
    collect_tokens: int = knob(50_000, gt=0)
    other_text: str | None = None  # a data set (file or name) that is not the adapter's: its SAE effect recovered is reported too

    def reference_for(self, data: str) -> float | None:
        for item in self.full_reference:
            name, _, value = item.partition("=")
            if name.strip() == data:
                return float(value)
        return None
