"""`rank1 generate PROMPT --adapter DIR`: sample from a base model plus a saved rank-1 adapter (transformers + PEFT)."""

from __future__ import annotations

from rank1.core.commands import GENERATE, command_main
from rank1.core.config import Config


def generate(cfg: Config) -> str:
    import torch

    from rank1.core.adapter_io import load_adapted_model

    g = cfg.generate
    model, tokenizer, _ = load_adapted_model(g.adapter, cfg.model)
    ids = tokenizer.apply_chat_template([{"role": "user", "content": g.prompt}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    torch.manual_seed(cfg.seed)
    sampling = {"do_sample": True, "temperature": g.temperature} if g.temperature > 0 else {"do_sample": False}
    with torch.no_grad():
        out = model.generate(**ids, max_new_tokens=g.max_new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


def main(argv: list[str]) -> int:
    return command_main(GENERATE, argv, lambda cfg: print(generate(cfg)))
