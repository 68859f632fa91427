"""Rollout engines as a group of restartable Ray actors (one rank1.core.workers.WorkerGroup).

`EngineGroup` starts `num_engines` `EngineActor`s, queues each generate() call's shards to whichever is
free, and keeps the latest adapter (an object-store ref, put once) so that an actor Ray restarts after
a crash or a hang gets that adapter back before it retries the shard it lost. Ray's own task retry is
off on purpose (max_task_retries=0): it would rerun the batch on the fresh actor before the adapter is
reloaded, i.e. sample from the base model.

With rollout.tensor_parallel_size > 1 each engine gets a placement group of that many GPU bundles on
one node; the actor itself holds no GPU and vLLM's Ray executor starts its workers in those bundles.
"""

from __future__ import annotations

import os
from typing import Callable

from rank1.core.config import ModelConfig, RolloutConfig
from rank1.core.workers import WorkerDied, WorkerGroup
from rank1.rollout.engine import AdapterReceipt, Completion, SamplingSpec
from rank1.rollout.sync import AdapterRefs, check_receipts, put_adapter


def make_engine(backend: str, model_path: str, **engine_kwargs):
    if backend == "vllm":
        from rank1.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **engine_kwargs)
    if backend == "transformers":
        from rank1.rollout.hf_engine import HFEngine

        return HFEngine(model_path, **engine_kwargs)
    raise ValueError(f"rollout.backend: {backend!r} is not one of vllm, transformers")


def engine_kwargs(cfg: RolloutConfig, model: ModelConfig | None = None, seed: int = 0) -> dict:
    """The RolloutConfig fields each backend's constructor takes; learner and engines load the same weights."""
    model = model or ModelConfig()
    common = dict(dtype=cfg.dtype, seed=seed, revision=model.revision, trust_remote_code=model.trust_remote_code,
                  adapter_mode=cfg.adapter_mode, max_adapters=cfg.max_adapters)
    if cfg.backend == "vllm":
        return dict(common, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb, max_num_seqs=cfg.max_num_seqs, block_size=cfg.block_size,
                    tensor_parallel_size=cfg.tensor_parallel_size, gpu_memory_utilization=cfg.gpu_memory_utilization,
                    enforce_eager=cfg.enforce_eager)
    return common


class EngineActor:
    def __init__(self, backend: str, model_path: str, engine_kwargs: dict, threads: int | None = None):
        import torch

        # Before vLLM starts: its CPU worker forbids changing the thread count afterwards.
        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.engine = make_engine(backend, model_path, **engine_kwargs)

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, slots: list[int] | None = None) -> list[Completion]:
        return self.engine.generate(prompts, sampling, slots)

    def score(self, sequences: list[list[int]], slot: int = 0) -> list[list[float]]:
        return self.engine.score(sequences, slot)

    def load_adapter(self, tensors, peft_config: dict, version: int, slot: int = 0) -> AdapterReceipt:
        return self.engine.load_adapter(tensors, peft_config, version, slot)

    def version(self, slot: int = 0) -> int:
        return self.engine.version(slot)

    def pid(self) -> int:
        return os.getpid()

    def close(self) -> None:
        if hasattr(self.engine, "close"):
            self.engine.close()


def split_evenly(n_items: int, n_parts: int) -> list[range]:
    """Contiguous index ranges whose sizes differ by at most one (empty ranges dropped)."""
    base, extra = divmod(n_items, n_parts)
    bounds, start = [], 0
    for part in range(n_parts):
        stop = start + base + (part < extra)
        if stop > start:
            bounds.append(range(start, stop))
        start = stop
    return bounds


class EngineGroup:
    def __init__(self, backend: str, model_path: str, num_engines: int = 1, engine_kwargs: dict | None = None, *,
                 max_restarts: int = 2, max_batch_retries: int = 2, num_cpus_per_engine: float = 1.0,
                 num_gpus_per_engine: float = 0.0, tensor_parallel_size: int = 1, timeout_s: float | None = None,
                 threads: int | None = None):
        kwargs = dict(engine_kwargs or {})
        if tensor_parallel_size > 1:
            kwargs["distributed_executor_backend"] = "ray"  # vLLM's workers take the placement group's GPU bundles
        self.max_batch_retries, self.timeout_s = max_batch_retries, timeout_s
        self.group = WorkerGroup(EngineActor, num_engines, lambda i, ips: (backend, model_path, kwargs, threads),
                                 num_cpus=num_cpus_per_engine, num_gpus=num_gpus_per_engine, placement=None,
                                 gang=tensor_parallel_size, max_restarts=max_restarts, name="rollout engine")
        self.latest: dict[int, AdapterRefs] = {}  # slot -> the adapter it serves (an object-store ref)
        self._accepted: dict[int, tuple[list[float], float]] = {}  # slot -> what a restarted engine must reproduce
        self.noises: dict[int, float] = {}  # slot -> engines' distance from the learner's probe at the last accepted sync

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str, seed: int = 0, model: ModelConfig | None = None,
                    max_lora_rank: int = 1) -> EngineGroup:
        """`max_lora_rank`: the rank of the adapters it will serve (LoRA mode sizes its buffers by it)."""
        kwargs = dict(engine_kwargs(cfg, model, seed), max_lora_rank=max_lora_rank)
        return cls(cfg.backend, model_path, cfg.num_engines, kwargs, max_restarts=cfg.max_restarts,
                   num_cpus_per_engine=cfg.cpus_per_engine, num_gpus_per_engine=cfg.gpus_per_engine,
                   tensor_parallel_size=cfg.tensor_parallel_size, timeout_s=cfg.timeout_s, threads=cfg.threads_per_engine)

    @property
    def restarts_seen(self) -> int:
        return self.group.restarts

    @property
    def actors(self) -> list:
        return self.group.workers

    @property
    def noise(self) -> float | None:
        return self.noises.get(0)

    def push_adapter(self, tensors, peft_config: dict, version: int, expected_probe: list[float] | None = None,
                     atol: float = 1e-3, previous_probe: list[float] | None = None, slot: int = 0) -> list[AdapterReceipt]:
        """Send a new adapter version to every engine's `slot` (one ray.put) and check all of them serve it; with
        `previous_probe` (the learner's probe of the version before) also that none serves that one."""
        refs = self.latest[slot] = put_adapter(tensors, peft_config, version)
        receipts = self._load(refs, slot)
        self.noises[slot] = check_receipts(receipts, version, refs.digest, expected_probe, atol, previous_probe, self.noises.get(slot))
        self._accepted[slot] = (receipts[0].probe_logprobs, atol)
        return receipts

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, slots: list[int] | None = None,
                 on_shard: Callable[[int, list[Completion]], None] | None = None) -> list[Completion]:
        """Completions of every prompt (the prompts split evenly over the engines), in prompt order. `on_shard(i,
        completions)` runs as each engine's share comes back, so the caller can grade it while others generate."""
        shards = split_evenly(len(prompts), self.group.size)
        slots = [0] * len(prompts) if slots is None else slots

        def arrived(t: int, completions: list[Completion]) -> None:
            for c in completions:
                c.prompt_index = shards[t][c.prompt_index]
            if on_shard is not None:
                on_shard(t, completions)

        try:
            results = self.group.map("generate", [([prompts[j] for j in shard], sampling, [slots[j] for j in shard]) for shard in shards],
                                     retries=self.max_batch_retries, timeout_s=self.timeout_s, on_restart=self._restore, on_result=arrived)
        except WorkerDied as e:
            raise RuntimeError(str(e)) from e
        return [c for completions in results for c in completions]

    def _restore(self, index: int) -> None:
        """A restarted engine gets the latest adapter of every slot again, proven like every other sync."""
        for slot, refs in sorted(self.latest.items()):
            probe, atol = self._accepted[slot]
            check_receipts(self._load(refs, slot, only=[index]), refs.version, refs.digest, probe, atol)

    def _load(self, refs: AdapterRefs, slot: int, only: list[int] | None = None) -> list[AdapterReceipt]:
        """Every engine (or those in `only`) loads the adapter behind `refs` into `slot`; their receipts."""
        try:
            return self.group.call("load_adapter", refs.tensors, refs.peft_config, refs.version, slot, only=only)
        except WorkerDied as e:
            raise RuntimeError(str(e)) from e

    def versions(self, slot: int = 0) -> list[int]:
        return self.group.call("version", slot)

    def pids(self) -> list[int]:
        return self.group.pids()

    def shutdown(self) -> None:
        import ray

        # Let engines remove their adapter folders first; a dead one is simply skipped.
        refs = [a.close.remote() for a in self.group.workers]
        ray.wait(refs, num_returns=len(refs), timeout=30)
        self.group.shutdown()
