"""The rollout engines' share of `rank1 plan`: weights per tensor-parallel shard and the KV cache they leave.

One vLLM engine of tensor_parallel_size T holds on each of its T GPUs:
  weights     P × b / T (the embedding and lm_head are split too; norms are tiny)
  overhead    CUDA context, NCCL and activation workspace (the learners' constant)
  KV cache    what gpu_memory_utilization leaves: (u × device - weights - overhead), at
              2 (k and v) × layers × kv_dim × b / T' bytes per token, T' = min(T, kv_heads) (heads
              are split over ranks, replicated once T exceeds their number)
An engine that cannot hold one sequence of rollout.max_model_len tokens does not fit.
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass
class EnginePlan:
    engines: int
    tensor_parallel: int
    dtype: str
    device_bytes: float
    utilization: float
    weights: float  # per GPU
    overhead: float
    kv_bytes_per_token: float  # per GPU
    max_model_len: int

    @property
    def kv_cache(self) -> float:
        return self.utilization * self.device_bytes - self.weights - self.overhead

    @property
    def kv_tokens(self) -> int:
        return max(0, int(self.kv_cache // self.kv_bytes_per_token))

    @property
    def fits(self) -> bool:
        return self.kv_tokens >= self.max_model_len

    @property
    def gpus(self) -> int:
        return self.engines * self.tensor_parallel

    def lines(self) -> list[str]:
        seqs = self.kv_tokens // self.max_model_len
        return [
            f"rollout engines: {self.engines} × vLLM, tensor_parallel_size {self.tensor_parallel} ({self.gpus} GPUs), {self.dtype}, "
            f"gpu_memory_utilization {self.utilization:g}",
            f"  {'weights per GPU':<32} {self.weights / GB:>10.2f}",
            f"  {'CUDA / NCCL overhead':<32} {self.overhead / GB:>10.2f}",
            f"  {'KV cache per GPU':<32} {self.kv_cache / GB:>10.2f}   {self.kv_tokens:,} tokens at "
            f"{self.kv_bytes_per_token / 1e3:.0f} kB/token: {seqs} sequence(s) of {self.max_model_len:,} at once",
        ]

    def refusal(self, gpu: str) -> str:
        if self.kv_cache <= 0:
            return (f"a rollout engine needs {(self.weights + self.overhead) / GB:.1f} GB per GPU for the base weights "
                    f"(tensor_parallel_size {self.tensor_parallel}) and overhead, but gpu_memory_utilization leaves it "
                    f"{self.utilization * self.device_bytes / GB:.1f} of {gpu}'s {self.device_bytes / GB:.0f} GB; "
                    "raise rollout.tensor_parallel_size")
        return (f"a rollout engine's KV cache holds {self.kv_tokens:,} tokens, less than one sequence of "
                f"rollout.max_model_len {self.max_model_len:,}; raise rollout.tensor_parallel_size or lower the length")


def plan_engines(cfg, shape, device_bytes: float, overhead: float) -> EnginePlan:
    r = cfg.rollout
    b = 2 if r.dtype == "bfloat16" else 4
    tp = r.tensor_parallel_size
    kv_heads = max(1, shape.kv_dim // max(1, shape.hidden // shape.heads))
    kv_split = min(tp, kv_heads)
    return EnginePlan(r.num_engines, tp, r.dtype, device_bytes, r.gpu_memory_utilization, shape.parameters * b / tp, overhead,
                      2 * shape.layers * shape.kv_dim * b / kv_split, r.max_model_len)
