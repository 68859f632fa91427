"""GRPO's batch source: the prompts, a group of rollout engines and the reward pool, and the adapter sync.

After each update only the adapter tensors travel (one ray.put), and every engine proves it serves the
new version: its probe logprobs match the learner's within the tolerance of both sides' precision,
and are closer to this version's than to the previous one's (rank1.rollout.sync).
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from rank1.core.config import Config, ConfigError
from rank1.core.data import PromptData, global_batch
from rank1.core.workers import init_ray
from rank1.rewards.pool import RewardPool
from rank1.rollout.actors import EngineGroup
from rank1.rollout.engine import SamplingSpec, probe_token_ids
from rank1.rollout.sync import PROBE_NOISE
from rank1.trainer.devices import precision_dtype


@dataclass
class RolloutBatch:
    step: int
    prompt_ids: list[list[int]]  # one per completion (repeated G times)
    completions: list  # rank1.rollout.engine.Completion, G consecutive per prompt
    rewards: torch.Tensor  # (P * G,)
    accuracy: float  # share of completions the 'math' grader accepted (reward > 0 without it)
    reward_errors: int  # timeouts and errors (reward 0)
    generate_s: float
    reward_s: float


def probe_tolerance(cfg: Config) -> float:
    """How far an engine's probe may be from the learner's: the noise of the learner's precision plus the engine's."""
    t = cfg.trainer
    on_gpu = t.device == "cuda" or cfg.cluster.gpus_per_learner > 0 or (t.device == "auto" and torch.cuda.is_available())
    learner = "bfloat16" if precision_dtype(t.precision, "cuda" if on_gpu else "cpu") == torch.bfloat16 else "float32"
    return PROBE_NOISE[learner] + PROBE_NOISE[cfg.rollout.dtype]


def check_engine_resources(cfg: Config, cluster_gpus: float) -> None:
    """A GPU cluster's vLLM engines must hold GPUs: with gpus_per_engine 0 Ray hides every GPU from them."""
    r = cfg.rollout
    if r.backend == "vllm" and r.gpus_per_engine == 0 and (cluster_gpus > 0 or cfg.cluster.gpus_per_learner > 0):
        raise ConfigError(f"rollout.gpus_per_engine: 0, but the cluster has {cluster_gpus:g} GPUs and vLLM engines need one per "
                          f"tensor-parallel rank; set --rollout.gpus_per_engine 1 (and rollout.tensor_parallel_size)")


def lora_rank(cfg: Config) -> int:
    """The rank of the adapter a run trains: its adapter.init folder's, else adapter.r."""
    if cfg.adapter.init:
        from rank1.core.adapter_io import check_adapter_folder

        return int(check_adapter_folder(cfg.adapter.init, "adapter.init").get("r", 1))
    return cfg.adapter.r


def push_learner_adapter(engines, learners, probe_ids: list[int], atol: float, version: int,
                         previous: list[float] | None, run: int | None = None) -> tuple[float, list[float]]:
    """The learners' adapter (tensors only) to every engine, proven against the learners' probe and the
    previous version's; returns (seconds, this version's probe) for the next sync to compare with.
    A sweep's `run` goes to engine slot `run`."""
    began = time.perf_counter()
    which = () if run is None else (run,)
    tensors = learners.call("adapter_tensors", *which)[0]
    config = learners.call("peft_config", *which)[0]  # the model's own: an adapter.init folder's config, not rebuilt
    expected = learners.call("sequence_logprobs", probe_ids, 1.0, *which)[0]
    engines.push_adapter(tensors, config, version, expected_probe=expected, atol=atol, previous_probe=previous, slot=run or 0)
    return time.perf_counter() - began, expected


def rollout_seed(seed: int, step: int) -> int:
    """The sampling seed of a step's rollouts: a pure function of (seed, step), so a resumed run samples the same."""
    return seed * 100_003 + step


class Rollouts:
    def __init__(self, cfg: Config, model_path: str, data: PromptData, tokenizer):
        import ray

        init_ray(cfg.cluster)
        check_engine_resources(cfg, ray.cluster_resources().get("GPU", 0))
        self.cfg, self.data = cfg, data
        self.probe_ids = probe_token_ids(tokenizer)
        self.atol = probe_tolerance(cfg)
        self.engines = EngineGroup.from_config(cfg.rollout, model_path, seed=cfg.seed, model=cfg.model, max_lora_rank=lora_rank(cfg))
        self._last_probe: list[float] | None = None
        try:
            self.rewards = RewardPool(cfg.rewards)
        except BaseException:
            self.engines.shutdown()
            raise
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rollout")
        self._grader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grade")

    def sample(self, step: int) -> RolloutBatch:
        g = self.cfg.grpo
        rows = [self.data.rows[i] for i in global_batch(len(self.data.rows), self.cfg.seed, step, g.prompts_per_step)]
        began = time.perf_counter()
        sampling = SamplingSpec(n=g.num_generations, max_new_tokens=g.max_completion_length, temperature=g.temperature,
                                top_p=g.top_p, seed=rollout_seed(self.cfg.seed, step))
        # Each engine's share is graded as soon as it is back, while the other engines still generate.
        grading: dict[int, Future] = {}
        completions = self.engines.generate([r.prompt_ids for r in rows], sampling, on_shard=lambda i, shard: grading.__setitem__(
            i, self._grader.submit(self.rewards.score, [(rows[c.prompt_index].gold, c.text) for c in shard])))
        generated = time.perf_counter()
        results = [r for i in sorted(grading) for r in grading[i].result()]
        graded = time.perf_counter()  # reward_s: the grading that generation did not hide
        math_ok = [r.components.get("math", r.reward) > 0 for r in results]
        return RolloutBatch(
            step=step,
            prompt_ids=[rows[c.prompt_index].prompt_ids for c in completions],
            completions=completions,
            rewards=torch.tensor([r.reward for r in results], dtype=torch.float32),
            accuracy=sum(math_ok) / len(math_ok),
            reward_errors=sum(r.status != "ok" for r in results),
            generate_s=generated - began,
            reward_s=graded - generated,
        )

    def submit(self, step: int) -> Future:
        """sample(step) in the background: engines and graders work while the learners update."""
        return self._executor.submit(self.sample, step)

    def sync(self, learners, version: int) -> float:
        """Send the learners' adapter (tensors only) to every engine; each proves it serves it."""
        seconds, self._last_probe = push_learner_adapter(self.engines, learners, self.probe_ids, self.atol, version, self._last_probe)
        return seconds

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)
        self._grader.shutdown(wait=True, cancel_futures=True)
        self.engines.shutdown()
        self.rewards.close()
