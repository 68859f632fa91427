"""The rollout engine interface every backend implements.

An engine holds a frozen base model plus at most one rank-1 adapter and turns token-id prompts into
sampled completions. The learner owns the adapter; after every optimizer step it sends the engine the
adapter tensors (exactly `peft.get_peft_model_state_dict(model)`) with a version number. Prompts are
token ids because the driver applies the chat template once, for every backend alike.

`load_adapter` returns an `AdapterReceipt` that proves what is being served, cheaply:
  * `digest`: sha256 of the tensors as received (proves the bytes arrived intact), and
  * `probe_logprobs`: the engine's own log-probabilities of a fixed token sequence (`PROBE_TEXT`)
    computed *through the serving path* after the swap. A stale engine (old adapter still cached,
    adapter not applied, wrong scaling) reports different numbers than the learner computes for the
    same tokens with a plain forward pass; `rank1.rollout.sync` compares them.
"""

from __future__ import annotations

import hashlib
import math
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

import torch


# Scored after every adapter swap. Short (cheap to score) and ordinary text, so every tokenizer
# splits it into a handful of common tokens whose logprobs move when the adapter moves.
PROBE_TEXT = "Question: what is 12 + 30? Answer: 12 + 30 = 42."


class AdapterError(ValueError):
    """Adapter tensors or config an engine cannot serve; the message names the key."""


class EngineError(ValueError):
    """A prompt or sampling setting an engine cannot run; the message names the item."""


@dataclass(frozen=True)
class SamplingSpec:
    n: int = 1  # completions per prompt
    max_new_tokens: int = 256
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()  # in addition to the model's end-of-sequence tokens
    ignore_eos: bool = False  # generate max_new_tokens whatever is sampled (benchmarks: equal work on every side)
    # The seed of each adapter slot's prompts, instead of `seed` (a GRPO sweep: each run samples as its solo run would)
    slot_seeds: tuple[int, ...] = ()

    def for_slot(self, slot: int) -> SamplingSpec:
        """These settings with the slot's own seed, when slot_seeds gives one."""
        import dataclasses

        return dataclasses.replace(self, seed=self.slot_seeds[slot], slot_seeds=()) if slot < len(self.slot_seeds) else self

    def __post_init__(self):
        if self.n < 1:
            raise EngineError(f"sampling.n: must be >= 1, got {self.n}")
        if self.max_new_tokens < 1:
            raise EngineError(f"sampling.max_new_tokens: must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise EngineError(f"sampling.temperature: must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"sampling.top_p: must be in (0, 1], got {self.top_p}")



@dataclass
class Completion:
    prompt_index: int  # position of its prompt in the list given to generate()
    token_ids: list[int]  # sampled tokens, including the stop token if one ended it
    text: str
    # log p(token | prefix) of each sampled token under the distribution it was sampled from (logits /
    # temperature; greedy: temperature 1), i.e. what the learner computes for the same tokens.
    logprobs: list[float]
    finish_reason: str  # "stop" | "length"


@dataclass
class AdapterReceipt:
    version: int
    digest: str
    probe_logprobs: list[float] = field(default_factory=list)
    seconds: float = 0.0  # wall time of the swap, probe included


def adapter_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, shapes and float32 values, so sender and engine agree whatever dtype travels."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)};".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _targeted(module: str, target_modules) -> bool:
    """PEFT's rule: a regex string must match the whole name, a list entry must match a name suffix."""
    import re

    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, module) is not None
    return any(module == t or module.endswith("." + t) for t in target_modules)


def check_adapter(
    tensors: dict[str, torch.Tensor], peft_config: dict, max_rank: int, linears: dict[str, tuple[int, int]]
) -> None:
    """Reject what the engine cannot serve exactly, naming the offending key, before touching the engine.

    `linears` maps the base model's linear layer names to (in_features, out_features). The tensors must
    be exactly the LoRA pairs of the targeted linears: a missing pair would leave the previous
    version's weights in place on the transformers backend, a stray key would be ignored by vLLM.
    """
    if not isinstance(peft_config, dict):
        raise AdapterError(f"peft_config: expected a dict (LoraConfig.to_dict()), got {type(peft_config).__name__}")
    missing = [k for k in ("r", "lora_alpha", "target_modules") if k not in peft_config]
    if missing:
        raise AdapterError(f"peft_config: missing {missing} (expected LoraConfig.to_dict() output)")
    r = peft_config["r"]
    if not isinstance(r, int) or not 1 <= r <= max_rank:
        raise AdapterError(f"peft_config['r']: {r!r} is not a rank this engine serves (1..{max_rank})")
    if not isinstance(tensors, dict) or not tensors:
        raise AdapterError("adapter tensors: expected a non-empty dict (get_peft_model_state_dict output)")
    expected: dict[str, tuple[int, int]] = {}
    for module, (n_in, n_out) in linears.items():
        if _targeted(module, peft_config["target_modules"]):
            expected[f"base_model.model.{module}.lora_A.weight"] = (r, n_in)
            expected[f"base_model.model.{module}.lora_B.weight"] = (n_out, r)
    for name, t in tensors.items():
        if name not in expected:
            raise AdapterError(
                f"adapter tensor {name}: not a LoRA weight of a targeted linear layer of this model "
                f"(expected keys like {next(iter(expected), 'none')})"
            )
        if not isinstance(t, torch.Tensor):
            raise AdapterError(f"adapter tensor {name}: expected a torch.Tensor, got {type(t).__name__}")
        if tuple(t.shape) != expected[name]:
            raise AdapterError(f"adapter tensor {name}: shape {tuple(t.shape)}, expected {expected[name]} (r={r})")
        if not torch.isfinite(t).all():
            raise AdapterError(f"adapter tensor {name}: contains NaN or inf")
    absent = sorted(set(expected) - set(tensors))
    if absent:
        raise AdapterError(f"adapter tensors: missing {absent[0]} (and {len(absent) - 1} more of {len(expected)})")


def probe_token_ids(tokenizer) -> list[int]:
    """The probe as token ids; the learner encodes it with the same tokenizer to compute its side."""
    return tokenizer.encode(PROBE_TEXT, add_special_tokens=False)


def logprob_of(logprob_entries: dict, token_id: int) -> float:
    entry = logprob_entries[token_id]
    return float(getattr(entry, "logprob", entry))


class RolloutEngine(ABC):
    """Base model + swappable adapters in `max_adapters` slots (one, except for `rank1 sweep`, which serves
    every run from its own slot). Subclasses implement the four backend hooks."""

    max_lora_rank: int = 1
    max_adapters: int = 1
    vocab_size: int
    tokenizer: object  # a transformers tokenizer

    def __init__(self, backend: str = "engine", dtype: str = "float32", adapter_mode: str = "lora", max_adapters: int = 1):
        import typing

        from rank1.core.adapter_io import DTYPES
        from rank1.core.config import RolloutConfig

        if dtype not in DTYPES:
            raise EngineError(f"{backend} dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
        modes = typing.get_args(typing.get_type_hints(RolloutConfig)["adapter_mode"])
        if adapter_mode not in modes:
            raise EngineError(f"adapter_mode: {adapter_mode!r} is not one of {', '.join(modes)}")
        if adapter_mode == "merged" and max_adapters > 1:
            raise EngineError("adapter_mode merged serves one adapter; several (rank1 sweep) need adapter_mode lora")
        self.dtype, self.adapter_mode, self.max_adapters = getattr(torch, DTYPES[dtype]), adapter_mode, max_adapters
        self._versions: dict[int, int] = {}  # slot -> served version; none yet: the engine serves the base model
        self._probe: list[int] | None = None
        self._linears: dict[str, tuple[int, int]] | None = None

    # ------------------------------------------------------------ backend hooks

    @abstractmethod
    def _generate(self, prompts: list[list[int]], sampling: SamplingSpec, slots: list[int]) -> list[Completion]: ...

    @abstractmethod
    def _score(self, sequences: list[list[int]], slot: int) -> list[list[float]]: ...

    @abstractmethod
    def _linear_shapes(self) -> dict[str, tuple[int, int]]: ...

    @abstractmethod
    def _swap_adapter(self, tensors: dict[str, torch.Tensor], peft_config: dict, version: int, slot: int) -> None: ...

    # ------------------------------------------------------------ public interface

    def generate(self, prompts: list[list[int]], sampling: SamplingSpec, slots: list[int] | None = None) -> list[Completion]:
        """Completions for every prompt, `sampling.n` each, ordered by prompt_index; prompt i from slots[i]'s adapter."""
        self._check_token_lists(prompts, "prompt")
        slots = [0] * len(prompts) if slots is None else list(slots)
        if len(slots) != len(prompts) or any(not 0 <= s < self.max_adapters for s in slots):
            raise EngineError(f"slots: expected one slot in 0..{self.max_adapters - 1} per prompt, got {slots[:8]}")
        return self._generate(prompts, sampling, slots) if prompts else []

    def score(self, sequences: list[list[int]], slot: int = 0) -> list[list[float]]:
        """log p(seq[t] | seq[:t]) for t = 1..len-1 of each sequence, under the adapter in `slot`."""
        self._check_token_lists(sequences, "sequence", min_len=2)
        return self._score(sequences, slot) if sequences else []

    def load_adapter(self, tensors: dict[str, torch.Tensor], peft_config: dict, version: int, slot: int = 0) -> AdapterReceipt:
        start = time.perf_counter()
        if not isinstance(version, int) or version < 0:
            raise AdapterError(f"adapter version: expected an int >= 0, got {version!r}")
        if not isinstance(slot, int) or not 0 <= slot < self.max_adapters:
            raise AdapterError(f"adapter slot: {slot!r} is not one of this engine's {self.max_adapters} (rollout.max_adapters)")
        if self._linears is None:
            self._linears = self._linear_shapes()
        check_adapter(tensors, peft_config, self.max_lora_rank, self._linears)
        self._swap_adapter(tensors, peft_config, version, slot)
        self._versions[slot] = version
        probe = self.score([self.probe_token_ids()], slot)[0]
        return AdapterReceipt(version, adapter_digest(tensors), probe, time.perf_counter() - start)

    def version(self, slot: int = 0) -> int:
        return self._versions.get(slot, -1)

    def probe_token_ids(self) -> list[int]:
        if self._probe is None:
            self._probe = probe_token_ids(self.tokenizer)
        return self._probe

    def _check_token_lists(self, items: list[list[int]], what: str, min_len: int = 1) -> None:
        if not isinstance(items, (list, tuple)):
            raise EngineError(f"{what}s: expected a list of token-id lists, got {type(items).__name__}")
        for i, ids in enumerate(items):
            if not isinstance(ids, (list, tuple)) or len(ids) < min_len:
                raise EngineError(f"{what} {i}: expected a list of at least {min_len} token id(s), got {ids!r:.80}")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise EngineError(f"{what} {i}: token ids {bad[:5]} are outside the vocabulary (0..{self.vocab_size - 1})")


def max_abs_diff(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) for x, y in zip(a, b)), default=0.0)
