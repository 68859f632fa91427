"""Push a new adapter version to every rollout engine and check that each one serves it.

The tensors go into the Ray object store once (`put_adapter`); every engine actor receives the same
ref, so N engines cost one serialization, not N. Each engine answers with an AdapterReceipt, and
`check_receipts` (called by the engine group's push_adapter) accepts the version only if, for every engine:
  * it reports the version that was sent,
  * the sha256 of the tensors it received equals the sender's (`adapter_digest`),
  * its probe logprobs agree with the other engines' and, when the sender passes `expected_probe`
    (the learner's logprobs of `probe_token_ids`, a ~15-token forward pass), with the learner's, and
  * when the sender also passes `previous_probe` (the learner's probe of the version before) and the
    engines' measured noise at the last sync (`noise`, their distance from the learner's probe then),
    they are closer to the new version's probe than to the previous one's, whenever the two versions
    are more than twice that noise apart. In bf16 the tolerance alone (0.3 per token) passes an engine
    a version or more behind; the distance to both versions tells them apart as soon as the versions
    differ by more than the engines' own numerical noise, which is all a probe can resolve.
The probe checks are what catch an engine that received the right bytes but still serves the old
adapter (stale LoRA cache, prefix cache, wrong scaling, a merged weight not rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rank1.rollout.engine import AdapterReceipt, adapter_digest, max_abs_diff

# How far an engine's probe logprobs may be from the learner's: fp32 engines agree to ~1e-5; bf16 weights
# (or a bf16 learner) move SmolLM2's 26 probe logprobs by up to 0.32 per token on a CPU with native bf16
# and up to 0.52 on one without it (AMD EPYC, emulated bf16 matmuls), over random adapters. The bf16 bound
# is loose on purpose: the distance-to-both-versions check below is what tells versions apart in bf16.
# The tolerance of a sync is the sum of both sides' (rank1.driver.rollouts.probe_tolerance).
PROBE_NOISE = {"float32": 5e-4, "bfloat16": 1.0}


class AdapterSyncError(RuntimeError):
    """An engine does not serve the adapter version it was sent; the message names the engine."""


@dataclass
class AdapterRefs:
    tensors: object  # ray.ObjectRef (ray is imported only where it is used: the GPU check runs without it)
    peft_config: dict
    version: int
    digest: str
    nbytes: int


def put_adapter(tensors: dict[str, torch.Tensor], peft_config: dict, version: int) -> AdapterRefs:
    import ray

    # Detach and copy to CPU so the object store holds plain tensors, not views of training state.
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    nbytes = sum(t.numel() * t.element_size() for t in cpu.values())
    return AdapterRefs(ray.put(cpu), dict(peft_config), version, adapter_digest(cpu), nbytes)


def distance(a: list[float], b: list[float]) -> float:
    """Euclidean distance between two probe vectors (inf when their lengths differ)."""
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 if len(a) == len(b) else float("inf")


def check_receipts(
    receipts: list[AdapterReceipt],
    version: int,
    digest: str,
    expected_probe: list[float] | None = None,
    atol: float = 1e-3,
    previous_probe: list[float] | None = None,
    noise: float | None = None,
) -> float:
    """Raise AdapterSyncError naming the first engine that does not serve `version`; returns the engines'
    noise: the largest distance between an engine's probe and the reference."""
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
        versions_apart = distance(expected_probe, previous_probe) if expected_probe and previous_probe else 0.0
        if noise is not None and versions_apart > 2 * noise:
            to_new, to_old = distance(r.probe_logprobs, expected_probe), distance(r.probe_logprobs, previous_probe)
            if to_new >= to_old:
                raise AdapterSyncError(
                    f"engine {i}: after loading version {version} its probe logprobs are closer to the previous version's "
                    f"(distance {to_old:.3g}) than to this one's ({to_new:.3g}); it is serving a stale adapter"
                )
    return max(distance(r.probe_logprobs, reference) for r in receipts)
