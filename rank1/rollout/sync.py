"""Push a new adapter version to every rollout engine and check that each one serves it.

The tensors go into the Ray object store once (`put_adapter`); every engine actor receives the same
ref, so N engines cost one serialization, not N. Each engine answers with an AdapterReceipt, and
`push_adapter` accepts the version only if, for every engine:
  * it reports the version that was sent,
  * the sha256 of the tensors it received equals the sender's (`adapter_digest`),
  * its probe logprobs agree with the other engines' and, when the sender passes `expected_probe`
    (the learner's logprobs of `probe_token_ids`, a ~15-token forward pass), with the learner's.
The last check is the one that catches an engine that received the right bytes but still serves
the old adapter (stale LoRA cache, prefix cache, wrong scaling).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from rank1.rollout.engine import AdapterReceipt, adapter_digest, max_abs_diff


class AdapterSyncError(RuntimeError):
    """An engine does not serve the adapter version it was sent; the message names the engine."""


@dataclass
class AdapterRefs:
    tensors: ray.ObjectRef
    peft_config: dict
    version: int
    digest: str
    nbytes: int


def put_adapter(tensors: dict[str, torch.Tensor], peft_config: dict, version: int) -> AdapterRefs:
    # Detach and copy to CPU so the object store holds plain tensors, not views of training state.
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    nbytes = sum(t.numel() * t.element_size() for t in cpu.values())
    return AdapterRefs(ray.put(cpu), dict(peft_config), version, adapter_digest(cpu), nbytes)


def push_adapter(
    actors: list,
    refs: AdapterRefs,
    expected_probe: list[float] | None = None,
    atol: float = 1e-3,
) -> list[AdapterReceipt]:
    """Load `refs` on every actor (in parallel) and verify the receipts; returns them in actor order."""
    receipts: list[AdapterReceipt] = ray.get([a.load_adapter.remote(refs.tensors, refs.peft_config, refs.version) for a in actors])
    check_receipts(receipts, refs.version, refs.digest, expected_probe, atol)
    return receipts


def check_receipts(
    receipts: list[AdapterReceipt],
    version: int,
    digest: str,
    expected_probe: list[float] | None = None,
    atol: float = 1e-3,
) -> None:
    reference = expected_probe if expected_probe is not None else receipts[0].probe_logprobs
    for i, r in enumerate(receipts):
        if r.version != version:
            raise AdapterSyncError(f"engine {i}: serves adapter version {r.version}, expected {version}")
        if r.digest != digest:
            raise AdapterSyncError(f"engine {i}: received adapter tensors that differ from the sender's (digest {r.digest[:12]} != {digest[:12]})")
        diff = max_abs_diff(r.probe_logprobs, reference)
        if diff > atol:
            whose = "the learner's" if expected_probe is not None else "engine 0's"
            raise AdapterSyncError(
                f"engine {i}: probe logprobs differ from {whose} by {diff:.3g} (> {atol}) after loading version "
                f"{version}; it is not serving the adapter it was sent"
            )
