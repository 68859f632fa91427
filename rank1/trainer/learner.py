"""A learner: one data-parallel rank holding the frozen base and its rank-1 adapters in DeepSpeed.

Only adapter vectors have gradients and optimizer state. When the base does not fit one device,
ZeRO stage 3 shards it across learners; then every method that touches parameters is collective
(all ranks must call it together), and the adapter is gathered before it is read or saved. The loss
is the objective object's (rank1.trainer.sft / grpo), handed in by the driver.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch

from rank1.core.adapter_io import check_tensors, config_dict, write_adapter
from rank1.core.config import AdapterConfig, ModelConfig, TrainerConfig
from rank1.core.logprobs import sequence_logprobs
from rank1.core.model import attach_adapter, load_base, public_model_id
from rank1.trainer.devices import learner_device, precision_dtype
from rank1.trainer.optim import GuardedAdamW, deepspeed_config, injected_fault, lr_scheduler, merge_stats, rng_state, \
    seed_everything, set_rng_state, unclipped_grad_norm

CHECKPOINT_TAG = "state"


@dataclass
class Placement:
    """Where a learner sits in the process group; handed out by the driver."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    node_rank: int = 0  # position among the learners on its node


def choose_zero_stage(t: TrainerConfig, model_path: str, device: str, dtype: torch.dtype) -> int:
    """ZeRO-3 only when the base does not fit one device: sharding costs a gather every forward."""
    if t.zero_stage != "auto":
        return int(t.zero_stage)
    if device == "cpu":
        return 0  # host memory holds the base; ZeRO-3 on CPU is ~14x slower per step
    from rank1.core.model import parameter_count_from_config

    base_bytes = parameter_count_from_config(model_path) * torch.finfo(dtype).bits // 8
    return 0 if base_bytes < AUTO_ZERO3_SHARE * torch.cuda.get_device_properties(device).total_memory else 3


AUTO_ZERO3_SHARE = 0.5  # 'auto' shards the base when it takes at least this share of one device (rank1 plan reads it)


class Learner:
    def __init__(self, model_cfg: ModelConfig, adapter_cfg: AdapterConfig, trainer_cfg: TrainerConfig, objective,
                 model_path: str, placement: Placement, total_steps: int, seed: int = 0):
        import deepspeed

        self.objective, self.placement, self.adapter_cfg, self.model_cfg = objective, placement, adapter_cfg, model_cfg
        t = trainer_cfg
        self.device, device_index = learner_device(t.device)
        dtype = precision_dtype(t.precision, self.device)
        # LOCAL_RANK is DeepSpeed's device index (cuda:LOCAL_RANK): an index into the devices this process
        # sees, which under Ray is its own GPU only, not the learner's position on the node.
        os.environ.update(RANK=str(placement.rank), LOCAL_RANK=str(device_index), WORLD_SIZE=str(placement.world_size),
                          MASTER_ADDR=placement.master_addr, MASTER_PORT=str(placement.master_port))
        if self.device.startswith("cuda"):
            torch.cuda.set_device(device_index)
        seed_everything(seed)
        deepspeed.init_distributed(dist_backend="nccl" if self.device.startswith("cuda") else "gloo", auto_mpi_discovery=False)

        self.zero_stage = choose_zero_stage(t, model_path, self.device, dtype)
        ds_config = deepspeed_config(t, placement.world_size, self.zero_stage, dtype == torch.bfloat16, objective.rows_per_step)
        if self.clips_per_group:
            ds_config["gradient_clipping"] = 0.0  # the optimizer clips each run's group itself
        if self.zero_stage == 3:
            # Must stay alive while from_pretrained runs: it makes transformers build the model
            # inside deepspeed.zero.Init, so each rank only ever materializes its shard.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_ds_config = HfDeepSpeedConfig(ds_config)
        self.model = self.build_model(load_base(model_path, model_cfg, dtype))
        self.adapter_params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer, schedule = self.build_optimizer(t, total_steps)
        self.engine, _, _, self.scheduler = deepspeed.initialize(model=self.model, optimizer=self.optimizer, lr_scheduler=schedule,
                                                                 config=ds_config)
        self.steps_done = 0

    clips_per_group = False  # rank1.trainer.sweep_learner: one optimizer group (and clipping) per run

    def build_model(self, base):
        return attach_adapter(base, self.adapter_cfg, self.model_cfg.name_or_path)

    def build_optimizer(self, t: TrainerConfig, total_steps: int):
        optimizer = GuardedAdamW(self.adapter_params, lr=t.lr, betas=tuple(t.betas), weight_decay=t.weight_decay)
        return optimizer, lr_scheduler(optimizer, t, total_steps)

    def before_forward(self, batch: dict) -> None:
        """Called with each micro-batch before its forward (a sweep sets the run of each row here)."""

    # ------------------------------------------------------------ training

    def train_step(self, micro_batches: list[dict], normalizer: float) -> dict:
        """One optimizer step over this rank's micro-batches; collective.

        The objective's loss is a sum over the micro-batch, divided by `normalizer`, which the driver
        computes for the whole global batch. DeepSpeed divides by gradient-accumulation steps and
        averages over ranks, so we scale by both to get exactly that gradient. Every rank gets the same
        number of micro-batches: under ZeRO-3 each forward is a collective. A step whose loss or
        gradient is not finite changes nothing (GuardedAdamW) and is reported as `nonfinite`.
        """
        lrs = self.scheduler.get_last_lr()
        lr = lrs[0]
        scale = self.engine.gradient_accumulation_steps() * self.placement.world_size / normalizer
        loss_sum, tokens, stats, grad_norm, loss_finite = 0.0, 0, {}, None, True
        poison = injected_fault("RANK1_FAULT_NAN_STEPS", self.steps_done + 1)
        self.engine.train()
        for i, batch in enumerate(micro_batches):
            batch = {k: v.to(self.engine.device) for k, v in batch.items()}
            self.before_forward(batch)
            loss, extra = self.objective.loss(self.engine, batch)
            if poison:
                loss = loss * float("nan")
            self.engine.backward(loss * scale)
            last = i == len(micro_batches) - 1
            if last and self.zero_stage == 0:
                grad_norm = unclipped_grad_norm(self.adapter_params)  # DeepSpeed reports none at stage 0
            if last:
                schedule = self.scheduler.state_dict()
            loss_finite = loss_finite and bool(torch.isfinite(loss))
            self.optimizer.loss_finite = loss_finite  # read by GuardedAdamW at the accumulation boundary
            self.engine.step()
            loss_sum += loss.item()
            tokens += int(batch["attention_mask"].sum())
            merge_stats(stats, extra)
        skipped = self.optimizer.overflow or not self.engine.was_step_applied()
        if skipped and self.engine.was_step_applied():  # DeepSpeed stepped the schedule for an update that did not happen
            self.scheduler.load_state_dict(schedule)
            for group, group_lr in zip(self.optimizer.param_groups, self.scheduler.get_last_lr()):
                group["lr"] = group_lr
        if grad_norm is None and self.engine.get_global_grad_norm() is not None:
            grad_norm = float(self.engine.get_global_grad_norm())
        self.steps_done += 1
        extra = {"lrs": lrs, "group_grad_norms": self.optimizer.group_norms} if self.clips_per_group else {}
        return {"loss_sum": loss_sum, "tokens": tokens, "lr": lr, "grad_norm": grad_norm, "nonfinite": bool(skipped), **extra, **stats}

    def rollout_logprobs(self, micro_batches: list[dict], adapter: bool = True) -> list[torch.Tensor]:
        """Completion logprobs of each micro-batch under the current adapter, or the base with the adapter
        disabled (the GRPO KL reference: no second model in memory); collective."""
        self.engine.eval()
        context = contextlib.nullcontext() if adapter else self.model.disable_adapter()
        out = []
        with context:
            for b in micro_batches:
                b = {k: v.to(self.engine.device) for k, v in b.items()}
                self.before_forward(b)
                out.append(self.objective.logprobs(self.engine, b).cpu())
        return out

    def sequence_logprobs(self, token_ids: list[int], temperature: float = 1.0) -> list[float]:
        """The learner's side of the engines' sync probe, by one plain forward; collective."""
        self.engine.eval()
        return sequence_logprobs(self.engine, token_ids, temperature)

    # ------------------------------------------------------------ the adapter

    def peft_config(self) -> dict:
        """The adapter's own config (an adapter.init folder's, not rebuilt from adapter_cfg)."""
        return config_dict(self.model.peft_config["default"])

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
            write_adapter(folder, tensors, self.peft_config(), public_model_id(self.model_cfg))

    # ------------------------------------------------------------ checkpoints

    def save_checkpoint(self, folder: str) -> None:
        """Optimizer, scheduler, adapter shards and this rank's RNG into `folder`; collective."""
        tensors = self.adapter_tensors()
        if tensors is not None:
            check_tensors(tensors)  # never a checkpoint holding NaN or inf
        self.engine.save_checkpoint(folder, tag=CHECKPOINT_TAG, client_state={"rng": rng_state(), "steps_done": self.steps_done},
                                    save_latest=False, exclude_frozen_parameters=True)

    def load_checkpoint(self, folder: str) -> None:
        _, client_state = self.engine.load_checkpoint(
            folder, tag=CHECKPOINT_TAG, load_module_strict=False, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if client_state is None:
            raise FileNotFoundError(f"{folder}: no DeepSpeed checkpoint for rank {self.placement.rank}")
        set_rng_state(client_state["rng"])
        self.steps_done = client_state.get("steps_done", 0)

    def close(self) -> None:
        import deepspeed.comm as dist
        import torch.distributed

        if torch.distributed.is_initialized():
            dist.barrier()
            torch.distributed.destroy_process_group()
