"""Rollout engines as a group of restartable Ray actors.

`EngineGroup` starts `num_engines` `EngineActor`s, splits each generate() call across them, and keeps
the latest adapter (an object-store ref, put once) so that an actor Ray restarts after a crash gets
that adapter back before it retries the batch it lost. Ray's own task retry is off on purpose
(max_task_retries=0): it would rerun the batch on the fresh actor before the adapter is reloaded,
i.e. sample from the base model.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import ray

from rank1.config import RolloutConfig
from rank1.rollout.engine import AdapterReceipt, Completion, SamplingSpec
from rank1.rollout.sync import AdapterRefs, push_adapter, put_adapter


def make_engine(backend: str, model_path: str, **engine_kwargs):
    if backend == "vllm":
        from rank1.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **engine_kwargs)
    if backend == "transformers":
        from rank1.rollout.hf_engine import HFEngine

        return HFEngine(model_path, **engine_kwargs)
    raise ValueError(f"rollout.backend: {backend!r} is not one of vllm, transformers")


def engine_kwargs(cfg: RolloutConfig, seed: int = 0) -> dict:
    """The RolloutConfig fields each backend's constructor takes."""
    if cfg.backend == "vllm":
        return dict(dtype=cfg.dtype, max_model_len=cfg.max_model_len, kv_cache_gb=cfg.kv_cache_gb, seed=seed)
    return dict(dtype=cfg.dtype, seed=seed)


@ray.remote
class EngineActor:
    def __init__(self, backend: str, model_path: str, engine_kwargs: dict):
        self.engine = make_engine(backend, model_path, **engine_kwargs)

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[Completion]:
        return self.engine.generate(prompts, sampling)

    def score(self, sequences: list[list[int]]) -> list[list[float]]:
        return self.engine.score(sequences)

    def load_adapter(self, tensors, peft_config: dict, version: int) -> AdapterReceipt:
        return self.engine.load_adapter(tensors, peft_config, version)

    def version(self) -> int:
        return self.engine.version()

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


@dataclass
class EngineGroup:
    backend: str
    model_path: str
    num_engines: int = 1
    engine_kwargs: dict = field(default_factory=dict)
    max_restarts: int = 2  # per actor, over its lifetime
    max_batch_retries: int = 2  # per generate() shard
    num_cpus_per_engine: float = 1.0
    num_gpus_per_engine: float = 0.0

    def __post_init__(self):
        if self.num_engines < 1:
            raise ValueError(f"rollout.num_engines: must be >= 1, got {self.num_engines}")
        options = dict(max_restarts=self.max_restarts, max_task_retries=0, num_cpus=self.num_cpus_per_engine,
                       num_gpus=self.num_gpus_per_engine)
        self.actors = [
            EngineActor.options(**options).remote(self.backend, self.model_path, self.engine_kwargs)
            for _ in range(self.num_engines)
        ]
        self.latest: AdapterRefs | None = None
        self._accepted: tuple[list[float], float] = ([], 0.0)
        self.restarts_seen = 0  # shards retried after an actor died

    @classmethod
    def from_config(cls, cfg: RolloutConfig, model_path: str, seed: int = 0) -> EngineGroup:
        return cls(cfg.backend, model_path, cfg.num_engines, engine_kwargs(cfg, seed), max_restarts=cfg.max_restarts,
                   num_cpus_per_engine=cfg.cpus_per_engine, num_gpus_per_engine=cfg.gpus_per_engine)

    def push_adapter(self, tensors, peft_config: dict, version: int, expected_probe: list[float] | None = None, atol: float = 1e-3):
        """Send a new adapter version to every engine (one ray.put) and check all of them serve it."""
        self.latest = put_adapter(tensors, peft_config, version)
        receipts = push_adapter(self.actors, self.latest, expected_probe=expected_probe, atol=atol)
        self._accepted = (receipts[0].probe_logprobs, atol)  # what a restarted engine must reproduce
        return receipts

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec) -> list[Completion]:
        shards = split_evenly(len(prompts), len(self.actors))
        pending = {self.actors[i].generate.remote([prompts[j] for j in shard], sampling): (i, shard, 0) for i, shard in enumerate(shards)}
        results: dict[int, list[Completion]] = {}
        while pending:
            [done], _ = ray.wait(list(pending), num_returns=1)
            actor_index, shard, attempt = pending.pop(done)
            try:
                completions = ray.get(done)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:  # process died
                if attempt >= self.max_batch_retries:
                    raise RuntimeError(f"rollout engine {actor_index} died {attempt + 1} times on the same batch") from e
                self.restarts_seen += 1
                self._restore(actor_index)
                retry = self.actors[actor_index].generate.remote([prompts[j] for j in shard], sampling)
                pending[retry] = (actor_index, shard, attempt + 1)
                continue
            for c in completions:
                c.prompt_index = shard[c.prompt_index]
            results[shard.start] = completions
        return [c for start in sorted(results) for c in results[start]]

    def _restore(self, actor_index: int, timeout_s: float = 600.0) -> None:
        """Wait for Ray to restart the actor, then give it the latest adapter again."""
        actor = self.actors[actor_index]
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self.latest is not None:
                    probe, atol = self._accepted
                    push_adapter([actor], self.latest, expected_probe=probe, atol=atol)
                else:
                    ray.get(actor.version.remote())
                return
            except ray.exceptions.ActorUnavailableError:  # still restarting
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
            except ray.exceptions.ActorDiedError as e:
                raise RuntimeError(
                    f"rollout engine {actor_index} died and cannot be restarted (max_restarts={self.max_restarts} used up)"
                ) from e

    def versions(self) -> list[int]:
        return ray.get([a.version.remote() for a in self.actors])

    def pids(self) -> list[int]:
        return ray.get([a.pid.remote() for a in self.actors])

    def shutdown(self) -> None:
        # Let engines remove their adapter folders first; a dead one is simply skipped.
        ray.wait([a.close.remote() for a in self.actors], num_returns=len(self.actors), timeout=30)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)
        self.actors = []
