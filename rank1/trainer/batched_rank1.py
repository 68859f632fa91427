"""N rank-1 adapters on one frozen base, each row of a batch through its own: the layer behind `rank1 sweep`.

    y = W x + scale[i] · b[i] (a[i] · x)        i = the run of the row

One pass of the base matmul serves the whole mixed batch; the rank-1 term is N dot products per token
(x @ Aᵀ, an (in × N) matmul), a gather of each row's own column, and one outer product with that row's
b — the cost of one rank-N LoRA. PEFT serves mixed-adapter batches for inference only (its
`adapter_names` refuses training mode), so this layer is written here; each run's vectors are its own
parameters, so optimizer groups, clipping and saving stay per run, and every run saves as a standard PEFT
folder (`run_state_dict`). Each run starts from exactly PEFT's initialisation for its own seed.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from rank1.core.adapter_io import adapter_scale, config_dict

PEFT_PREFIX = "base_model.model."


class RunIndex:
    """The run of each row of the batch in flight (set by the learner before each forward, kept through
    its backward for recomputation), shared by every batched layer of one model."""

    def __init__(self):
        self.rows: torch.Tensor | None = None
        self.disabled = False  # the base alone (GRPO's KL reference)


class BatchedRank1Linear(nn.Module):
    def __init__(self, base: nn.Linear, a: list[torch.Tensor], b: list[torch.Tensor], scales: list[float], index: RunIndex,
                 dropout: float = 0.0):
        super().__init__()
        self.base_layer, self.index, self.dropout = base, index, nn.Dropout(dropout) if dropout else nn.Identity()
        self.lora_A = nn.ParameterList([nn.Parameter(t.detach().clone().float()) for t in a])  # (1, in) each
        self.lora_B = nn.ParameterList([nn.Parameter(t.detach().clone().float()) for t in b])  # (out, 1) each
        self.register_buffer("scales", torch.tensor(scales, dtype=torch.float32), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.index.disabled:
            return result
        rows = self.index.rows
        if rows is None or len(rows) != x.shape[0]:
            raise RuntimeError("BatchedRank1Linear: no run index for this batch's rows (the learner sets it from batch['run'])")
        h = self.dropout(x).to(self.lora_A[0].dtype)
        A = torch.cat(list(self.lora_A))  # (N, in)
        B = torch.cat(list(self.lora_B), dim=1).T  # (N, out)
        s = h @ A.T  # (batch, seq, N): every run's activation; each row keeps its own
        own = s.gather(-1, rows.view(-1, *([1] * (s.dim() - 1))).expand(*s.shape[:-1], 1))  # (batch, seq, 1)
        own = own * self.scales[rows].view(-1, *([1] * (s.dim() - 1)))
        return result + (own * B[rows].unsqueeze(1)).to(result.dtype)


class SweepModel(nn.Module):
    """The base with its targeted linears replaced by batched layers (the run of each row: `index.rows`)."""

    def __init__(self, base: nn.Module, index: RunIndex, names: list[str]):
        super().__init__()
        self.base, self.index, self.names = base, index, names
        self.config = base.config

    def forward(self, **inputs):
        return self.base(**inputs)

    @contextlib.contextmanager
    def disable_adapter(self):
        """The frozen base alone, as PeftModel.disable_adapter gives it."""
        self.index.disabled = True
        try:
            yield
        finally:
            self.index.disabled = False

    def layers(self):
        return [(n, self.base.get_submodule(n)) for n in self.names]


def peft_init(base: nn.Module, adapter_cfg, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's initial adapter for `seed`, as a solo run gets it (seeded, then get_peft_model), without keeping PEFT."""
    from peft import get_peft_model_state_dict

    from rank1.core.model import attach_adapter
    from rank1.trainer.optim import seed_everything

    seed_everything(seed)
    peft_model = attach_adapter(base, adapter_cfg, "sweep")
    tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}
    peft_model.unload()  # the base, unwrapped again
    return tensors


def attach_runs(base: nn.Module, adapter_cfgs: list, seeds: list[int]) -> SweepModel:
    """Replace every targeted linear of `base` by a batched layer holding one rank-1 adapter per run."""
    from rank1.core.model import lora_config

    inits = [peft_init(base, cfg, seed) for cfg, seed in zip(adapter_cfgs, seeds)]
    scales = [adapter_scale(config_dict(lora_config(cfg))) for cfg in adapter_cfgs]
    index = RunIndex()
    names = sorted({k.removeprefix(PEFT_PREFIX).split(".lora_")[0] for k in inits[0]})
    base.requires_grad_(False)
    for name in names:
        parent, _, leaf = name.rpartition(".")
        linear = base.get_submodule(name)
        a = [init[f"{PEFT_PREFIX}{name}.lora_A.weight"] for init in inits]
        b = [init[f"{PEFT_PREFIX}{name}.lora_B.weight"] for init in inits]
        setattr(base.get_submodule(parent), leaf, BatchedRank1Linear(linear, a, b, scales, index, adapter_cfgs[0].dropout))
    return SweepModel(base, index, names)


def run_state_dict(model: SweepModel, run: int) -> dict[str, torch.Tensor]:
    """Run `run`'s adapter under PEFT's key names: a standard adapter_model.safetensors."""
    out = {}
    for name, layer in model.layers():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A[run].detach().to("cpu", torch.float32).clone()
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B[run].detach().to("cpu", torch.float32).clone()
    return out


def run_parameters(model: SweepModel, run: int) -> list[nn.Parameter]:
    return [p for _, layer in model.layers() for p in (layer.lora_A[run], layer.lora_B[run])]
