"""Adapter effect recovered: how much of the adapter's change in held-out loss survives the SAE.

    recovered = (loss_base - loss_spliced) / (loss_base - loss_adapter)

loss_base runs with the adapter disabled, loss_adapter with it, and loss_spliced with every lora_A
output replaced by the SAE reconstruction of the adapter activation vector. That vector spans all
layers, so it is read in a first (adapter) pass and spliced in a second pass; the first pass is cached.
1.0 means the SAE keeps the whole effect; 0 means it is no better than dropping the adapter.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rank1.sae.capture import ActivationCapture, SpliceAdapters
from rank1.sae.documents import Document, padded_batch
from rank1.sae.errors import SAEError
from rank1.sae.trainer import evaluate_reconstruction


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    shifted, targets = logits[:, :-1].float(), labels[:, 1:]
    loss = F.cross_entropy(shifted.reshape(-1, shifted.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum")
    return float(loss), int((targets != -100).sum())


class AdapterEffect:
    """Held-out documents with cached base/adapter losses and adapter activations."""

    def __init__(self, model, docs: list[Document], pad_id: int, batch_docs: int = 4, skip_positions: int = 0):
        self.model, self.skip = model, skip_positions  # positions the collection left out keep their own activations
        self.batches = [padded_batch(docs[i : i + batch_docs], pad_id) for i in range(0, len(docs), batch_docs)]
        if not self.batches:
            raise SAEError("adapter effect: no held-out documents")
        base = adapter = 0.0
        tokens = 0
        self.activations = []
        with torch.inference_mode():
            for ids, mask, labels in self.batches:
                with model.disable_adapter():
                    loss, n = _loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
                base += loss
                with ActivationCapture(model) as cap:
                    loss, _ = _loss_sum(model(input_ids=ids, attention_mask=mask).logits, labels)
                    self.activations.append(cap.adapter_activations())
                adapter += loss
                tokens += n
        if tokens == 0:
            raise SAEError("adapter effect: the held-out documents have no labelled tokens")
        self.tokens = tokens
        self.loss_base = base / tokens
        self.loss_adapter = adapter / tokens

    @torch.no_grad()
    def __call__(self, sae) -> dict:
        spliced = 0.0
        held_out = [s[:, self.skip :][mask[:, self.skip :].bool()] for (_, mask, _), s in zip(self.batches, self.activations)]
        reconstruction = evaluate_reconstruction(sae, held_out)
        with torch.inference_mode():
            for (ids, mask, labels), s in zip(self.batches, self.activations):
                flat = s.reshape(-1, s.shape[-1])
                recon = sae(flat).reshape(s.shape)
                recon[:, : self.skip] = s[:, : self.skip]
                with SpliceAdapters(self.model, recon):
                    loss, _ = _loss_sum(self.model(input_ids=ids, attention_mask=mask).logits, labels)
                spliced += loss
        loss_spliced = spliced / self.tokens
        gap = self.loss_base - self.loss_adapter
        recovered = (self.loss_base - loss_spliced) / gap if abs(gap) > 1e-9 else float("nan")
        return {
            "loss_base": self.loss_base,
            "loss_adapter": self.loss_adapter,
            "loss_spliced": loss_spliced,
            "effect_recovered": recovered,
            "heldout_fvu": reconstruction["fvu"],
            "heldout_l0": reconstruction["l0"],
        }
