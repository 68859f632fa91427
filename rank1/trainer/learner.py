"""A learner: one data-parallel rank holding the frozen base and its rank-1 adapters in DeepSpeed.

Only adapter vectors have gradients and optimizer state. When the base does not fit one device,
ZeRO stage 3 shards it across learners; then every method that touches parameters is collective
(all ranks must call it together), and the adapter is gathered before it is read or saved.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from rank1.config import Config, TrainerConfig, rows_per_step
from rank1.model import attach_adapter, load_base, lora_config, public_model_id
from rank1.trainer.adapter_io import write_adapter_folder
from rank1.trainer.grpo import GRPOLossSettings, grpo_loss_sum, rollout_logprobs
from rank1.trainer.sft import sft_loss_sum

CHECKPOINT_TAG = "state"


@dataclass
class Placement:
    """Where a learner sits in the process group; handed out by the driver."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    local_rank: int = 0


def choose_zero_stage(t: TrainerConfig, model_path: str, device: str, dtype: torch.dtype) -> int:
    """ZeRO-3 only when the base does not fit one device: sharding costs a gather every forward."""
    if t.zero_stage != "auto":
        return int(t.zero_stage)
    if device != "cuda":
        return 0  # host memory holds the base; ZeRO-3 on CPU is ~10x slower per step
    from rank1.model import parameter_count_from_config

    base_bytes = parameter_count_from_config(model_path) * torch.finfo(dtype).bits // 8
    return 0 if base_bytes < 0.5 * torch.cuda.get_device_properties(0).total_memory else 3


def deepspeed_config(t: TrainerConfig, world_size: int, stage: int, bf16: bool, rows: int) -> dict:
    """`rows`: sequences per optimizer step over all learners (SFT rows or GRPO completions)."""
    grad_accum = rows // (t.micro_batch_size * world_size)
    zero = {"stage": stage}
    if stage == 3:
        # Frozen base weights are gathered layer by layer for each forward and released after.
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=5e7)
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


class Learner:
    def __init__(self, cfg: Config, model_path: str, placement: Placement, total_steps: int):
        import deepspeed

        self.cfg, self.placement = cfg, placement
        t = cfg.trainer
        self.device = "cuda" if t.device == "cuda" or (t.device == "auto" and torch.cuda.is_available()) else "cpu"
        bf16 = t.precision == "bf16" or (t.precision == "auto" and self.device == "cuda")
        dtype = torch.bfloat16 if bf16 else torch.float32
        os.environ.update(
            RANK=str(placement.rank),
            LOCAL_RANK=str(placement.local_rank),
            WORLD_SIZE=str(placement.world_size),
            MASTER_ADDR=placement.master_addr,
            MASTER_PORT=str(placement.master_port),
        )
        if self.device == "cuda":
            torch.cuda.set_device(placement.local_rank)
        seed_everything(cfg.seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.device == "cuda" else "gloo", auto_mpi_discovery=False)

        self.zero_stage = choose_zero_stage(t, model_path, self.device, dtype)
        ds_config = deepspeed_config(t, placement.world_size, self.zero_stage, bf16, rows_per_step(cfg))
        if self.zero_stage == 3:
            # Must stay alive while from_pretrained runs: it makes transformers build the model
            # inside deepspeed.zero.Init, so each rank only ever materializes its shard.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        base = load_base(model_path, cfg.model, dtype)
        self.model = attach_adapter(base, cfg.adapter, cfg.model.name_or_path)
        self.adapter_params = [p for p in self.model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(self.adapter_params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, lr_scheduler=lr_scheduler(optimizer, t, total_steps), config=ds_config
        )
        g = cfg.grpo
        self.grpo = GRPOLossSettings(g.epsilon_low, g.epsilon_high, g.aggregation, g.kl_coef, g.is_correction, g.is_cap)

    # ------------------------------------------------------------ training

    def train_step(self, micro_batches: list[dict], normalizer: float) -> dict:
        """One optimizer step over this rank's micro-batches; collective.

        The objective's loss is a sum over the micro-batch (SFT: completion-token losses; GRPO: see
        trainer/grpo.py), divided by `normalizer`, which the driver computes for the whole global batch
        (SFT: its target tokens). DeepSpeed divides by gradient-accumulation steps and averages over
        ranks, so we scale by both to get exactly that gradient. Every rank gets the same number of
        micro-batches: under ZeRO-3 each forward is a collective.
        """
        lr = self.scheduler.get_last_lr()[0]
        scale = self.engine.gradient_accumulation_steps() * self.placement.world_size / normalizer
        loss_sum, tokens, stats = 0.0, 0, {}
        self.engine.train()
        grad_norm = None
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            loss, extra = self._loss_sum(batch)
            self.engine.backward(loss * scale)
            if i == len(micro_batches) - 1 and self.zero_stage == 0:
                grad_norm = unclipped_grad_norm(self.adapter_params)  # DeepSpeed reports none at stage 0
            self.engine.step()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
            merge_stats(stats, extra)
        if grad_norm is None and self.engine.get_global_grad_norm() is not None:
            grad_norm = float(self.engine.get_global_grad_norm())
        return {"loss_sum": loss_sum, "tokens": tokens, "lr": lr, "grad_norm": grad_norm, **stats}

    def _loss_sum(self, batch: dict) -> tuple[torch.Tensor, dict]:
        if self.cfg.trainer.objective == "grpo":
            return grpo_loss_sum(self.engine, batch, self.grpo)
        loss, _ = sft_loss_sum(self.engine, batch)
        return loss, {}

    def rollout_logprobs(self, micro_batches: list[dict], adapter: bool = True) -> list[torch.Tensor]:
        """Completion logprobs of each micro-batch under the current adapter, or the base with the adapter
        disabled (the GRPO KL reference: no second model in memory); collective."""
        import contextlib

        self.engine.eval()
        context = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        with context:
            return [rollout_logprobs(self.engine, {k: v.to(self.engine.device) for k, v in b.items()}).cpu() for b in micro_batches]

    @torch.no_grad()
    def sequence_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(ids[t] | ids[:t]) by one plain forward: the learner's side of the engine's sync probe; collective."""
        self.engine.eval()
        ids = torch.tensor([token_ids], device=self.engine.device)
        logits = self.engine(input_ids=ids).logits.float()
        return logits[0, :-1].log_softmax(-1).gather(-1, ids[0, 1:, None]).squeeze(-1).tolist()

    # ------------------------------------------------------------ the adapter

    def adapter_tensors(self) -> dict[str, torch.Tensor] | None:
        """The full adapter (gathered from ZeRO-3 shards) on rank 0, None elsewhere; collective."""
        import deepspeed
        from peft import get_peft_model_state_dict

        with deepspeed.zero.GatheredParameters(self.adapter_params, modifier_rank=None, enabled=self.zero_stage == 3):
            if self.placement.rank != 0:
                return None
            return {k: v.detach().to("cpu", torch.float32).clone() for k, v in get_peft_model_state_dict(self.model).items()}

    def save_adapter(self, folder: str) -> None:
        """Write a standard PEFT adapter folder (rank 0 writes); collective."""
        tensors = self.adapter_tensors()
        if tensors is not None:
            write_adapter_folder(folder, tensors, lora_config(self.cfg.adapter), public_model_id(self.cfg.model))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Optimizer, scheduler, adapter shards and this rank's RNG into `folder`; collective."""
        self.engine.save_checkpoint(
            folder, tag=CHECKPOINT_TAG, client_state={"rng": rng_state()}, save_latest=False, exclude_frozen_parameters=True
        )

    def load_checkpoint(self, folder: str) -> None:
        _, client_state = self.engine.load_checkpoint(
            folder, tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint for rank {self.placement.rank}")
        set_rng_state(client_state["rng"])

    def close(self) -> None:
        import deepspeed.comm as dist
        import torch.distributed

        if torch.distributed.is_initialized():
            dist.barrier()
            torch.distributed.destroy_process_group()


def merge_stats(total: dict, new: dict) -> dict:
    """Add per-micro-batch (or per-rank) statistics: sums add, *_min and *_max keep the extreme."""
    for k, v in new.items():
        if k not in total:
            total[k] = v
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
