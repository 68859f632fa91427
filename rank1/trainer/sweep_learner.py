"""A learner holding one frozen base and N runs' rank-1 adapters (`rank1 sweep`).

Everything a run would have alone stays its own: its adapter's initialisation (PEFT's, for its seed),
an optimizer group with its learning rate, betas and weight decay, its schedule, its gradient clipping
and its non-finite check. Rows of all runs share micro-batches (rank1.trainer.batched_rank1); each row
carries its run (`batch["run"]`) and a weight 1 / (its run's normalizer), so the summed loss's gradient
for run i is exactly run i's solo gradient. Collective like the learner it extends (ZeRO-3 shards the
one base that all runs share).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rank1.core.adapter_io import config_dict, write_adapter
from rank1.core.config import AdapterConfig
from rank1.core.model import lora_config, public_model_id
from rank1.trainer.batched_rank1 import attach_runs, run_parameters, run_state_dict
from rank1.trainer.learner import Learner
from rank1.trainer.optim import GuardedAdamW


@dataclass(frozen=True)
class RunSpec:
    """What may differ between runs that share a base."""

    seed: int
    lr: float
    betas: tuple[float, float]
    weight_decay: float
    warmup_ratio: float
    lr_schedule: str
    grad_clip: float
    adapter: AdapterConfig

    @classmethod
    def of(cls, cfg) -> RunSpec:
        t = cfg.trainer
        return cls(cfg.seed, t.lr, tuple(t.betas), t.weight_decay, t.warmup_ratio, t.lr_schedule, t.grad_clip, cfg.adapter)


class SweepAdamW(GuardedAdamW):
    """AdamW with a group per run: each group clipped to its own norm and skipped alone when not finite."""

    group_norms: list[float] = []
    group_nonfinite: list[bool] = []

    @torch.no_grad()
    def step(self, closure=None):
        dist = torch.distributed
        spread = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
        squares = []
        for group in self.param_groups:
            grads = [p.grad.float() for p in group["params"] if p.grad is not None]
            squares.append(sum((g * g).sum() for g in grads) if grads else torch.zeros(()))
        squares = torch.stack([torch.as_tensor(s, dtype=torch.float32) for s in squares])
        if spread:  # ZeRO: each rank holds a partition of every group's gradients
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            squares = squares.to(device)
            dist.all_reduce(squares)
        norms = squares.sqrt().cpu()
        self.group_norms = [float(n) for n in norms]
        self.group_nonfinite = [not bool(torch.isfinite(n)) for n in norms]
        for group, norm in zip(self.param_groups, norms):
            clip = group.get("max_grad_norm", 0.0)
            if clip and torch.isfinite(norm) and norm > clip:  # torch.nn.utils.clip_grad_norm_'s rule, per run
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.mul_(clip / (norm + 1e-6))
        self.overflow = all(self.group_nonfinite)
        everything = self.param_groups
        self.param_groups = [g for g, bad in zip(everything, self.group_nonfinite) if not bad]
        try:
            if self.param_groups:
                torch.optim.AdamW.step(self, closure)
        finally:
            self.param_groups = everything
        return None


class SweepLearner(Learner):
    clips_per_group = True

    def __init__(self, runs: list[RunSpec], *args, **kwargs):
        self.runs = runs
        super().__init__(*args, **kwargs)

    def build_model(self, base):
        return attach_runs(base, [r.adapter for r in self.runs], [r.seed for r in self.runs])

    def build_optimizer(self, t, total_steps: int):
        from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

        groups = [{"params": run_parameters(self.model, i), "lr": r.lr, "betas": r.betas, "weight_decay": r.weight_decay,
                   "max_grad_norm": r.grad_clip} for i, r in enumerate(self.runs)]
        optimizer = SweepAdamW(groups, lr=self.runs[0].lr)

        def schedule(r: RunSpec):  # the solo run's own schedule function (transformers'), one per group
            warmup, probe = int(round(r.warmup_ratio * total_steps)), torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
            if r.lr_schedule == "cosine":
                return get_cosine_schedule_with_warmup(probe, warmup, total_steps).lr_lambdas[0]
            return get_constant_schedule_with_warmup(probe, warmup).lr_lambdas[0]

        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, [schedule(r) for r in self.runs])

    def before_forward(self, batch: dict) -> None:
        self.model.index.rows = batch["run"]

    def train_step(self, micro_batches: list[dict], normalizer: float) -> dict:
        result = super().train_step(micro_batches, normalizer)
        result["run_nonfinite"] = list(self.optimizer.group_nonfinite)
        return result

    def sequence_logprobs(self, token_ids: list[int], temperature: float = 1.0, run: int = 0) -> list[float]:
        self.model.index.rows = torch.tensor([run], device=self.engine.device)
        return super().sequence_logprobs(token_ids, temperature)

    # ------------------------------------------------------------ one run's adapter

    def peft_config(self, run: int = 0) -> dict:
        return config_dict(lora_config(self.runs[run].adapter))

    def adapter_tensors(self, run: int = 0) -> dict[str, torch.Tensor] | None:
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.adapter_params, modifier_rank=None, enabled=self.zero_stage == 3):
            return run_state_dict(self.model, run) if self.placement.rank == 0 else None

    def save_adapter(self, folder: str, run: int = 0) -> None:
        tensors = self.adapter_tensors(run)
        if tensors is not None:
            write_adapter(folder, tensors, self.peft_config(run), public_model_id(self.model_cfg))

    def save_adapters(self, folders: list[str]) -> None:
        """Every run's PEFT folder (one gather); collective."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(self.adapter_params, modifier_rank=None, enabled=self.zero_stage == 3):
            if self.placement.rank == 0:
                for run, folder in enumerate(folders):
                    write_adapter(folder, run_state_dict(self.model, run), self.peft_config(run), public_model_id(self.model_cfg))
