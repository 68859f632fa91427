"""The learner's optimizer, schedule and DeepSpeed config, and the state that makes resume exact."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from rank1.core.config import TrainerConfig

ZERO3_PREFETCH_PARAMS = 5e7  # stage3_prefetch_bucket_size (rank1 plan counts this buffer)


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips a step whose gradients are not all finite, on every rank alike.

    `overflow` is the attribute DeepSpeed reads to count a skipped step and hold the LR schedule; under
    ZeRO the partitions differ per rank, so the verdict is all-reduced before anyone steps.
    """

    overflow = False
    loss_finite = True  # set by the learner before the step: a NaN loss with finite gradients is skipped too

    @torch.no_grad()
    def step(self, closure=None):
        finite = torch.tensor(1.0 if self.loss_finite else 0.0)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                    finite.zero_()
        if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
            device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
            finite = finite.to(device)
            torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
        self.overflow = not bool(finite.item())
        if self.overflow:
            return None
        return super().step(closure)


def deepspeed_config(t: TrainerConfig, world_size: int, stage: int, bf16: bool, rows: int) -> dict:
    """`rows`: sequences per optimizer step over all learners (SFT rows or GRPO completions)."""
    grad_accum = rows // (t.micro_batch_size * world_size)
    zero = {"stage": stage}
    if stage == 3:
        # Frozen base weights are gathered layer by layer for each forward and released after.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=ZERO3_PREFETCH_PARAMS)
    return {
        "train_batch_size": rows,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "zero_allow_untested_optimizer": True,  # torch AdamW: DeepSpeedCPUAdam needs a JIT build
        "steps_per_print": 1 << 30,
    }


def lr_scheduler(optimizer, t: TrainerConfig, total_steps: int):
    from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

    warmup = int(round(t.warmup_ratio * total_steps))
    if t.lr_schedule == "cosine":
        return get_cosine_schedule_with_warmup(optimizer, warmup, total_steps)
    return get_constant_schedule_with_warmup(optimizer, warmup)


def merge_stats(total: dict, new: dict) -> dict:
    """Add per-micro-batch (or per-rank) statistics: sums add, *_min and *_max keep the extreme, flags OR."""
    for k, v in new.items():
        if k not in total:
            total[k] = v
        elif isinstance(v, bool):
            total[k] = total[k] or v
        elif k.endswith("_min"):
            total[k] = min(total[k], v)
        elif k.endswith("_max"):
            total[k] = max(total[k], v)
        else:
            total[k] += v
    return total


def unclipped_grad_norm(params) -> float:
    grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
    return float(torch.linalg.vector_norm(torch.stack(grads))) if grads else 0.0


def injected_fault(variable: str, step: int) -> bool:
    """Fault injection for the chaos benchmark and tests: RANK1_FAULT_NAN_STEPS=3,7 poisons those steps' loss."""
    steps = os.environ.get(variable, "")
    return str(step) in {s.strip() for s in steps.split(",")}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
