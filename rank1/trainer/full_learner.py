"""The full fine-tune baseline (adapter.full_finetune): the same learner, data, loss and steps, every base
weight trained, no adapter. It exists to measure what share of a full fine-tune's gain rank 1 recovers
(rank1 study accuracy) on small models; it is not built to scale (ZeRO-0 only, SFT only, the whole model
written at the end instead of an adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from rank1.trainer.learner import Learner

# What a plain HF model folder needs besides the weights the learner writes (copied from the base folder).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "generation_config.json", "chat_template.jinja")


class FullLearner(Learner):
    def __init__(self, *args, **kwargs):
        self.model_path = args[4] if len(args) > 4 else kwargs["model_path"]
        super().__init__(*args, **kwargs)
        if self.zero_stage != 0:
            raise ValueError("adapter.full_finetune is a small-model baseline: it runs at trainer.zero_stage 0 only")

    def build_model(self, base):
        for p in base.parameters():
            p.requires_grad_(True)
        return base

    def peft_config(self) -> dict:
        raise ValueError("adapter.full_finetune trains no adapter: there is no adapter config to serve")

    def adapter_tensors(self, *_) -> dict[str, torch.Tensor]:
        """Every weight (this is what the checkpoint's finiteness check reads)."""
        return {k: v.detach().to("cpu", torch.float32) for k, v in self.model.state_dict().items()}

    def save_adapter(self, folder: str) -> None:
        """The whole fine-tuned model as a plain HF folder (weights, config, tokenizer): `rank1 eval --model FOLDER`."""
        folder_path = Path(folder)
        self.model.save_pretrained(folder_path, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (Path(self.model_path) / name).is_file():
                shutil.copy2(Path(self.model_path) / name, folder_path / name)
