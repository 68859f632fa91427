"""transformers rollout engine: the same interface as vLLM, for machines or models vLLM cannot run.

A PEFT model generates left-padded batches with `model.generate`; per-token logprobs come from the
processed scores (`output_scores`: after temperature and top-p, i.e. the distribution sampled from),
the same quantity vLLM's processed_logprobs mode reports and the GRPO learner computes. Adapter swaps copy the tensors into the existing LoRA modules with
`set_peft_model_state_dict`; the model is rebuilt only when the adapter's shape (r, targets) changes.
In merged mode (adapter_mode "merged", rank1.rollout.merge) there is no PEFT wrapper: each targeted
linear's weight is rewritten in place as W0 + s·b aᵀ, W0 read from the base's checkpoint.
"""

from __future__ import annotations

import torch

from rank1.core.config import ModelConfig
from rank1.core.logprobs import token_logprobs
from rank1.core.model import linear_shapes, load_base, load_tokenizer
from rank1.rollout.engine import Completion, EngineError, RolloutEngine, SamplingSpec
from rank1.rollout.merge import BaseWeights, merged_weights, parameters_to_send, rank1_deltas

# Fields of LoraConfig.to_dict() that change which modules exist; a change needs a new PEFT wrapper.
_SHAPE_KEYS = ("r", "target_modules", "lora_alpha", "use_rslora")


def _shape_of(peft_config: dict) -> tuple:
    return tuple(sorted(v) if isinstance(v, (set, list)) else v for v in (peft_config.get(k) for k in _SHAPE_KEYS))


class HFEngine(RolloutEngine):
    def __init__(self, model_path: str, *, dtype: str = "float32", batch_size: int = 16, max_lora_rank: int = 1, seed: int = 0,
                 revision: str | None = None, trust_remote_code: bool = False, device: str = "auto", adapter_mode: str = "lora",
                 max_adapters: int = 1):
        super().__init__("transformers", dtype, adapter_mode, max_adapters)
        self._merged: set[str] = set()  # modules whose weights hold a merged adapter
        self._base_weights = BaseWeights(model_path, revision) if adapter_mode == "merged" else None
        cfg = ModelConfig(name_or_path=model_path, revision=revision, trust_remote_code=trust_remote_code)
        self.device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
        self.tokenizer = load_tokenizer(model_path, cfg)
        self.base = load_base(model_path, cfg, self.dtype).to(self.device).eval()
        self.model = self.base  # becomes a PeftModel at the first load_adapter
        self.batch_size = batch_size
        self.max_lora_rank = max_lora_rank
        self.vocab_size = self.base.config.vocab_size
        self.seed = seed
        self._shape: tuple | None = None
        gen = self.base.generation_config
        eos = gen.eos_token_id if gen.eos_token_id is not None else self.tokenizer.eos_token_id
        self.eos_ids = [eos] if isinstance(eos, int) else list(eos or [])
        self.pad_id = self.tokenizer.pad_token_id

    # ------------------------------------------------------------ adapter swap

    def _linear_shapes(self):
        return linear_shapes(self.base)

    def _swap_adapter(self, tensors, peft_config, version, slot):
        if self.adapter_mode == "merged":
            return self._merge(tensors, peft_config)
        from peft import get_peft_config, get_peft_model, set_peft_model_state_dict

        shape = _shape_of(peft_config)
        if slot > 0:  # another run of a sweep: one more PEFT adapter of the same shape beside slot 0's
            if shape != self._shape:
                raise EngineError(f"adapter slot {slot}: its shape {shape} differs from slot 0's {self._shape} (load slot 0 first)")
            config = dict(peft_config, peft_type="LORA", inference_mode=True)
            if _slot_name(slot) not in self.model.peft_config:
                self.model.add_adapter(_slot_name(slot), get_peft_config(config))
            set_peft_model_state_dict(self.model, tensors, adapter_name=_slot_name(slot))
            return
        if shape != self._shape:
            config = dict(peft_config)
            config.setdefault("peft_type", "LORA")
            config["inference_mode"] = True
            if self._shape is not None:
                self.base = self.model.unload()  # drop the old LoRA layers, keep the base weights
            self.model = get_peft_model(self.base, get_peft_config(config)).eval()
            self._shape = shape
        set_peft_model_state_dict(self.model, tensors)

    @torch.no_grad()
    def _merge(self, tensors, peft_config) -> None:
        """Every module of this version or the last rebuilt from W0: W0 + s·baᵀ where targeted, W0 where no longer."""
        deltas = rank1_deltas(tensors, peft_config)
        names = parameters_to_send(self._base_weights, set(deltas) | self._merged, packed=False)
        for name, w in merged_weights(self._base_weights, names, deltas, self.dtype):
            module, _, kind = name.rpartition(".")
            getattr(self.base.get_submodule(module), kind).copy_(w)
        self._merged = set(deltas)

    # ------------------------------------------------------------ generation and scoring

    def _left_pad(self, batch: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(p) for p in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for row, p in enumerate(batch):
            ids[row, width - len(p) :] = torch.tensor(p)
            mask[row, width - len(p) :] = 1
        return ids, mask

    def _use(self, slot: int) -> None:
        from peft import PeftModel

        if isinstance(self.model, PeftModel):  # LoRA mode, after the first load
            self.model.set_adapter(_slot_name(slot))

    def _generate(self, prompts, sampling: SamplingSpec, slots):
        """Each slot's prompts through its own adapter (PEFT serves mixed-adapter batches only one adapter per call)."""
        out = []
        for slot in sorted(set(slots)):
            mine = [i for i, s in enumerate(slots) if s == slot]
            self._use(slot)
            for c in self._generate_one([prompts[i] for i in mine], sampling.for_slot(slot)):
                c.prompt_index = mine[c.prompt_index]
                out.append(c)
        return sorted(out, key=lambda c: c.prompt_index)  # stable: a prompt's n samples keep their order

    @torch.no_grad()
    def _generate_one(self, prompts, sampling: SamplingSpec):
        stop = set() if sampling.ignore_eos else set(self.eos_ids) | set(sampling.stop_token_ids)
        torch.manual_seed(self.seed if sampling.seed is None else sampling.seed)
        completions = []
        for start in range(0, len(prompts), self.batch_size):
            batch = prompts[start : start + self.batch_size]
            ids, mask = (t.to(self.device) for t in self._left_pad(batch))
            sample = sampling.temperature > 0
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                max_new_tokens=sampling.max_new_tokens,
                do_sample=sample,
                temperature=sampling.temperature if sample else None,
                top_p=sampling.top_p if sample else None,
                top_k=0 if sample else None,  # transformers defaults to top_k=50; vLLM samples without top-k
                num_return_sequences=sampling.n,
                eos_token_id=sorted(stop or self.eos_ids),
                min_new_tokens=sampling.max_new_tokens if sampling.ignore_eos else None,  # EOS suppressed until the end
                pad_token_id=self.pad_id,
                output_scores=True,
                return_dict_in_generate=True,
            )
            new = out.sequences[:, ids.shape[1] :]
            logprobs = token_logprobs(torch.stack(out.scores, dim=1), new).cpu()
            for row in range(new.shape[0]):  # rows are prompt-major: n samples of prompt 0, then prompt 1, ...
                tokens = new[row].cpu().tolist()
                end = next((i + 1 for i, t in enumerate(tokens) if t in stop), None)
                tokens = tokens[:end] if end else tokens
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                completions.append(
                    Completion(start + row // sampling.n, tokens, text, logprobs[row, : len(tokens)].tolist(), "stop" if end else "length")
                )
        return completions

    @torch.no_grad()
    def _score(self, sequences, slot):
        self._use(slot)
        scores = []
        for start in range(0, len(sequences), self.batch_size):
            batch = sequences[start : start + self.batch_size]
            width = max(len(s) for s in batch)
            ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros_like(ids)
            for row, s in enumerate(batch):  # right padding: positions stay 0..len-1, as in training
                ids[row, : len(s)] = torch.tensor(s)
                mask[row, : len(s)] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            lp = token_logprobs(logits[:, :-1], ids[:, 1:].to(self.device)).cpu()
            scores += [lp[row, : len(s) - 1].tolist() for row, s in enumerate(batch)]
        return scores


def _slot_name(slot: int) -> str:
    return "default" if slot == 0 else f"slot{slot}"
