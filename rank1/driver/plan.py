"""`rank1 plan RECIPE [--gpu NAME | --device-memory-gb N] [--gpus-per-node N] [--section.field VALUE ...]`

Memory per device for a recipe, from the model's config alone (no weights, no GPU), before anyone
rents a cluster. It prints one row per component, the total and the headroom, and exits non-zero,
naming what does not fit and by how much, when the plan exceeds the device.

Units: GB = 10^9 bytes. The GPU table uses the advertised sizes (H100 80 GB, H200 141 GB, ...), which
are at or below what the devices report, so the plan errs on the safe side.

What is counted, for one learner (one data-parallel rank, one device):
  base        frozen weights: P × b, split over the world size under ZeRO-3 (whole under 0/1/2)
  gather      ZeRO-3 only: the prefetch bucket the learner configures (5e7 params) plus the largest
              module gathered whole (the bigger of a decoder layer and the embedding / lm_head)
  adapter     A × b weights and A × b gradients (sharded under ZeRO-3, gradients under ZeRO-2 too)
  optimizer   AdamW for the adapters only: fp32 master copy, fp32 gradient copy and two fp32 moments
              (16 bytes per adapter parameter in bf16; 8 in fp32, where the weights are the master)
  runs        a sweep (plan.runs N): the adapter, gradient and optimizer rows × N; the base, gather
              buffers and activations once (each micro-batch holds one run's rows, as in its solo run)
  activations for T = micro_batch_size × sequence tokens (every row padded to the longest, so the
              worst case is every row at the sequence length), see `activation_components`
  overhead    CUDA context, cuBLAS workspaces, NCCL buffers and allocator fragmentation: a constant
where b is 2 bytes in bf16 (the default on GPU) and 4 in fp32.
"""

from __future__ import annotations

import functools
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

from rank1.core.commands import PLAN, command_main
from rank1.core.config import AdapterConfig, Config
from rank1.core.model import AdapterCount, ModelError, count_adapters_from_config, load_model_config, parameter_count_from_config
from rank1.trainer.learner import AUTO_ZERO3_SHARE
from rank1.trainer.optim import ZERO3_PREFETCH_PARAMS

GB = 1e9
# Advertised device memory in GB (nvidia-smi reports slightly more: 81,559 MiB on an H100 80 GB).
GPUS = {"h100": 80.0, "h200": 141.0, "a100-80g": 80.0, "a100-40g": 40.0, "l40s": 48.0}
# CUDA context (~0.5-1 GB with kernels loaded), NCCL communicator buffers (~1 GB over 2 nodes),
# cuBLAS workspaces and caching-allocator fragmentation.
CUDA_NCCL_OVERHEAD_GB = 3.0


@dataclass
class ModelShape:
    """The sizes the plan needs, read from a transformers config."""

    parameters: int
    layers: int
    hidden: int
    intermediate: int
    kv_dim: int  # num_key_value_heads × head_dim: the width of k and v
    heads: int
    vocab: int
    largest_module: int  # parameters of the biggest module ZeRO-3 gathers whole


@functools.lru_cache(maxsize=8)  # building a 32B model on the meta device takes seconds; plans repeat it
def model_shape(name_or_path: str, trust_remote_code: bool = False) -> ModelShape:
    config = load_model_config(name_or_path, trust_remote_code)
    config = getattr(config, "text_config", None) or config  # multimodal configs nest the LM
    params = parameter_count_from_config(name_or_path, trust_remote_code)
    hidden, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # Everything but the embedding, the untied lm_head and the final norm is spread evenly over layers.
    layer_params = (params - vocab * hidden * (1 if tied else 2) - hidden) // layers
    return ModelShape(
        parameters=params,
        layers=layers,
        hidden=hidden,
        intermediate=getattr(config, "intermediate_size", 4 * hidden),
        kv_dim=kv_heads * head_dim,
        heads=heads,
        vocab=vocab,
        largest_module=max(layer_params, vocab * hidden),
    )


@dataclass
class Component:
    name: str
    bytes: float
    how: str  # the formula with its numbers, printed next to the size


@dataclass
class MemoryPlan:
    model: str
    gpu: str
    device_bytes: float
    world_size: int
    zero_stage: int
    precision: str
    tokens: int  # per micro-batch on one learner
    components: list[Component]
    notes: list[str] = field(default_factory=list)
    engines: object = None  # rank1.driver.plan_engines.EnginePlan when the objective uses rollout engines
    max_runs: int = 1  # sweep runs whose adapters fit beside the base on each device

    @property
    def total(self) -> float:
        return sum(c.bytes for c in self.components)

    @property
    def headroom(self) -> float:
        return self.device_bytes - self.total

    @property
    def learner_fits(self) -> bool:
        return self.headroom >= 0

    @property
    def engine_fits(self) -> bool:
        return self.engines is None or self.engines.fits

    @property
    def fits(self) -> bool:
        return self.learner_fits and self.engine_fits


def resolve_zero_stage(cfg: Config, base_bytes: float, device_bytes: float) -> int:
    """The stage the learner will use on a GPU (rank1.trainer.learner.choose_zero_stage's rule)."""
    if cfg.trainer.zero_stage != "auto":
        return int(cfg.trainer.zero_stage)
    return 0 if base_bytes < AUTO_ZERO3_SHARE * device_bytes else 3


def sequence_tokens(cfg: Config) -> tuple[int, str]:
    """Tokens per row a learner trains on, as the objective bounds them: SFT rows are cut at
    data.max_length, GRPO rollouts at rollout.max_model_len (prompt + completion)."""
    from rank1.driver.run import make_objective

    objective = make_objective(cfg)
    return objective.max_sequence_tokens, {"sft": "data.max_length", "grpo": "rollout.max_model_len"}[objective.name]


# Which input each adapted projection reads (Llama/Qwen2 naming); projections reading one tensor share it.
ADAPTER_INPUTS = {"q_proj": "attn_in", "k_proj": "attn_in", "v_proj": "attn_in", "o_proj": "attn_out",
                  "gate_proj": "mlp_in", "up_proj": "mlp_in", "down_proj": "mlp_mid"}


def layer_activation_bytes_per_token(shape: ModelShape, b: int, adapter: AdapterConfig) -> int:
    """Bytes autograd saves in one decoder layer's forward, per token (Llama/Qwen2 layout).

    The frozen base linears save nothing of their inputs (their weights need no gradient); what stays:
      two RMSNorms         fp32 input copy and the fp32 1/rms:                  2 × (4·H + 4)
      attention            rotated q and k, v and the output (b bytes), plus the fp32 logsumexp per
                           head; flash/SDPA keep no L×L score matrix:          b·(2·H + 2·kv) + 4·heads
      MLP                  gate, silu(gate) and up, for the product:           3·b·I
      rank-1 adapters      PEFT keeps adapter weights in fp32 (and DeepSpeed leaves them so under
                           ZeRO-3), so each adapter saves its input cast to fp32: q, k, v, o, gate and
                           up read H-wide inputs, down an I-wide one:          4·(6·H + I) + 7·4·r
                           (in fp32 the casts are no-ops: q/k/v and gate/up share one input, 4·(3·H + I))
    tests/clusters/test_activation_formula.py checks this against the bytes autograd really saves for a
    small Qwen2 with the paper's adapters, in bf16 and fp32.
    """
    H, kv, I = shape.hidden, shape.kv_dim, shape.intermediate
    norms = 2 * (4 * H + 4)
    attention = b * (2 * H + 2 * kv) + 4 * shape.heads
    mlp = 3 * b * I
    inputs = [ADAPTER_INPUTS.get(m, m) for m in adapter.target_modules]  # other names: their own H-wide input
    if b == 4:
        inputs = list(dict.fromkeys(inputs))  # no cast: adapters reading one tensor save it once
    adapter_inputs = sum(4 * (I if i == "mlp_mid" else H) for i in inputs) + len(adapter.target_modules) * 4 * adapter.r
    return norms + attention + mlp + adapter_inputs


def activation_components(cfg: Config, shape: ModelShape, tokens: int, b: int) -> list[Component]:
    """Activation memory of one micro-batch of `tokens` tokens, at its peak in the backward pass.

    Per layer, see layer_activation_bytes_per_token. With gradient checkpointing only each layer's
    input (b·H per token) stays saved, plus about one more for the final norm; the backward recomputes
    one layer at a time and holds its saved activations and their gradients together (assumed 2 × the
    per-layer size). Without it, every layer's activations stay saved.

    The loss (rank1.trainer.sft.sft_loss_sum) upcasts the logits to fp32: at its peak in the backward
    the b-byte logits (kept by the train step), the fp32 log-probs log_softmax saved, and the fp32
    gradients into and out of log_softmax are live: (b + 12) bytes per token × vocab. That peak and a
    layer's recompute are never live together: lm_head's backward consumes the logits' gradient
    before the first layer is recomputed; only the b-byte logits stay.
    """
    H, L, V = shape.hidden, shape.layers, shape.vocab
    per_layer = tokens * layer_activation_bytes_per_token(shape, b, cfg.adapter)
    mb = cfg.trainer.micro_batch_size
    rows = []
    if cfg.model.gradient_checkpointing:
        how = f"({L}+1) layers × {tokens:,} tok × H {H} × {b} B"
        rows.append(Component("activations: layer checkpoints", (L + 1) * tokens * H * b, how))
        recompute = 2 * per_layer
        recompute_how = f"2 × one layer's {per_layer / tokens / 1e3:.0f} kB/tok"
    else:
        how = f"{L} layers × {tokens:,} tok × {per_layer / tokens / 1e3:.0f} kB/tok"
        rows.append(Component("activations: all layers saved", L * per_layer, how))
        recompute = per_layer
        recompute_how = "one layer's gradients"
    loss_peak = tokens * V * (b + 12)
    held_logits = tokens * V * b
    if loss_peak >= held_logits + recompute:
        how = f"loss: {tokens:,} tok × vocab {V:,} × {b + 12} B (> logits + layer backward)"
    else:
        how = f"logits {held_logits / GB:.1f} GB + layer backward, {recompute_how} (> loss peak {loss_peak / GB:.1f} GB)"
    rows.append(Component("activations: loss / layer peak", max(loss_peak, held_logits + recompute), how))
    # transformers' SDPA path builds a boolean B×1×L×L mask when rows in a micro-batch carry padding
    # (unpadded rows use is_causal instead); counted always, on the safe side.
    seq = tokens // mb
    rows.append(Component("attention mask (SDPA)", mb * seq * seq, f"{mb} × {seq:,}² × 1 B"))
    return rows


def plan_memory(cfg: Config, shape: ModelShape, adapter_params: int, device_bytes: float, gpu: str) -> MemoryPlan:
    t = cfg.trainer
    b = 4 if t.precision == "fp32" else 2  # 'auto' is bf16 on a GPU
    world = t.num_learners
    base_bytes = shape.parameters * b
    stage = resolve_zero_stage(cfg, base_bytes, device_bytes)
    seq, seq_key = sequence_tokens(cfg)
    tokens = t.micro_batch_size * seq
    runs = cfg.plan.runs
    A = adapter_params * runs

    def shard(n: float, sharded: bool) -> tuple[float, str]:
        return (n / world, f" / {world} ranks") if sharded and world > 1 else (n, "")

    base, base_div = shard(base_bytes, stage == 3)
    adapter, adapter_div = shard(A * b, stage == 3)
    grads, grads_div = shard(A * b, stage >= 2)
    opt_bytes, opt_what = (16, "fp32 master, grad, 2 moments") if b == 2 else (8, "2 fp32 moments")
    optim, optim_div = shard(A * opt_bytes, stage >= 1)
    times = f" ({runs} runs)" if runs > 1 else ""
    components = [
        Component(f"base weights (ZeRO-{stage})", base, f"{shape.parameters:,} params × {b} B{base_div}"),
        Component("adapter weights" + times, adapter, f"{A:,} params × {b} B{adapter_div}"),
        Component("adapter gradients" + times, grads, f"{A:,} × {b} B{grads_div}"),
        Component("optimizer (AdamW)" + times, optim, f"{A:,} × {opt_bytes} B ({opt_what}){optim_div}"),
    ]
    if stage == 3:
        gather = (ZERO3_PREFETCH_PARAMS + shape.largest_module) * b
        how = f"(prefetch {ZERO3_PREFETCH_PARAMS:.0e} + largest module {shape.largest_module:,}) × {b} B"
        components.append(Component("ZeRO-3 gather buffers", gather, how))
    components += activation_components(cfg, shape, tokens, b)
    components.append(Component("CUDA / NCCL overhead", CUDA_NCCL_OVERHEAD_GB * GB, "context, workspaces, NCCL, fragmentation"))
    plan = MemoryPlan(cfg.model.name_or_path, gpu, device_bytes, world, stage, "fp32" if b == 4 else "bf16", tokens, components)
    per_run = (adapter + grads + optim) / runs
    plan.max_runs = runs + max(0, int(plan.headroom // per_run)) if plan.headroom >= 0 else 0
    plan.notes.append(f"each sweep run adds {per_run / 1e6:,.1f} MB per device (adapter, gradient, optimizer): "
                      f"{plan.max_runs:,} runs fit beside this base (plan.runs {runs}; sweep.max_runs and the engines' "
                      "rollout.max_adapters LoRA slots bound a sweep first)")
    plan.notes.append(f"activations for micro_batch_size {t.micro_batch_size} × {seq_key} {seq:,} = {tokens:,} tokens")
    if not cfg.model.gradient_checkpointing:
        plan.notes.append("model.gradient_checkpointing is off: every layer's activations stay saved")
    if t.device == "cpu":
        plan.notes.append("trainer.device is cpu: this plans one device of the given size as if it were the host")
    if world > 1 and cfg.cluster.gpus_per_learner == 0 and t.device != "cpu":
        plan.notes.append("cluster.gpus_per_learner is 0: Ray will give the learners no GPU (set it to 1)")
    from rank1.driver.run import make_objective

    if make_objective(cfg).rollout_engines:
        from rank1.driver.plan_engines import plan_engines

        plan.engines = plan_engines(cfg, shape, device_bytes, CUDA_NCCL_OVERHEAD_GB * GB)
    return plan


def format_plan(plan: MemoryPlan, gpus_per_node: int) -> str:
    nodes = math.ceil(plan.world_size / gpus_per_node)
    lines = [
        f"memory plan: {plan.model}, {plan.world_size} learner(s) on {plan.gpu} "
        f"({plan.device_bytes / GB:.0f} GB each; {nodes} node(s) of {gpus_per_node}), ZeRO-{plan.zero_stage}, {plan.precision}",
        "",
        f"  {'component':<32} {'GB/device':>10}   how",
    ]
    for c in plan.components:
        lines.append(f"  {c.name:<32} {c.bytes / GB:>10.2f}   {c.how}")
    lines += [
        f"  {'-' * 32} {'-' * 10}",
        f"  {'total per device':<32} {plan.total / GB:>10.2f}",
        f"  {'device memory':<32} {plan.device_bytes / GB:>10.2f}",
        f"  {'headroom':<32} {plan.headroom / GB:>10.2f}   ({plan.headroom / plan.device_bytes:+.0%})",
        "",
    ]
    if plan.engines is not None:
        lines += plan.engines.lines() + [""]
    lines += [f"  note: {n}" for n in plan.notes]
    return "\n".join(lines)


def refusal(plan: MemoryPlan) -> str:
    reasons = []
    if not plan.learner_fits:
        biggest = sorted(plan.components, key=lambda c: -c.bytes)[:3]
        parts = ", ".join(f"{c.name} {c.bytes / GB:.1f} GB" for c in biggest)
        reasons.append(
            f"a learner needs {plan.total / GB:.1f} GB per device, {plan.gpu} has {plan.device_bytes / GB:.0f} GB "
            f"({-plan.headroom / GB:.1f} GB over). Largest: {parts}. Try trainer.zero_stage 3, "
            "model.gradient_checkpointing true, a smaller trainer.micro_batch_size or sequence length, or a larger GPU"
        )
    if not plan.engine_fits:
        reasons.append(plan.engines.refusal(plan.gpu))
    return "does not fit: " + "; ".join(reasons) + "."


# ---------------------------------------------------------------- command line


def adapter_count(name_or_path: str, adapter: AdapterConfig, trust_remote_code: bool = False) -> AdapterCount:
    return _adapter_count(name_or_path, adapter.r, tuple(adapter.target_modules), trust_remote_code)


@functools.lru_cache(maxsize=8)
def _adapter_count(name_or_path: str, r: int, target_modules: tuple[str, ...], trust_remote_code: bool) -> AdapterCount:
    return count_adapters_from_config(name_or_path, AdapterConfig(r=r, target_modules=list(target_modules)), trust_remote_code)


def device_of(cfg: Config) -> tuple[str, float]:
    """(label, bytes) of the device plan.gpu or plan.device_memory_gb names."""
    p = cfg.plan
    if p.device_memory_gb is not None:
        return f"a {p.device_memory_gb:g} GB device", p.device_memory_gb * GB
    return p.gpu.upper(), GPUS[p.gpu] * GB


def plan_recipe(cfg: Config) -> MemoryPlan:
    label, device_bytes = device_of(cfg)
    shape = model_shape(cfg.model.name_or_path, cfg.model.trust_remote_code)
    adapters = adapter_count(cfg.model.name_or_path, cfg.adapter, cfg.model.trust_remote_code)
    plan = plan_memory(cfg, shape, adapters.parameters, device_bytes, label)
    plan.notes.append(adapters.describe())
    return plan


def run(cfg: Config) -> int:
    plan = plan_recipe(cfg)
    print(format_plan(plan, cfg.plan.gpus_per_node))
    if not plan.fits:
        print(f"rank1 plan: {cfg.plan.recipe}: {refusal(plan)}", file=sys.stderr)
        return 1
    print(f"\nfits: {plan.total / GB:.1f} of {plan.device_bytes / GB:.0f} GB per device, {plan.headroom / GB:.1f} GB headroom")
    return 0


def main(argv: list[str] | None = None) -> int:
    return command_main(PLAN, list(sys.argv[1:] if argv is None else argv), run, errors=(ModelError, ValueError, OSError))


if __name__ == "__main__":
    sys.exit(main())
