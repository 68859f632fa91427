"""Push a new adapter version to every rollout engine and check that each one serves it.

The tensors go into the Ray object store once (`put_adapter`); every engine actor receives the same
ref, so N engines cost one serialization, not N. Each engine answers with an AdapterReceipt, and
`push_adapter` accepts the version only if, for every engine:
  * it reports the version that was sent,
  * the sha256 of the tensors it received equals the sender's (`adapter_digest`),
  * its probe logprobs agree with the other engines' and, when the sender passes `expected_probe`
    (the learner's logprobs of `probe_token_ids`, a ~15-token forward pass), with the learner's, and
  * when the sender also passes `previous_probe` (the learner's probe of the version before), they
    are closer to the new version's than to the previous one's, whenever the two versions are
    farther apart than the tolerance (in bf16 the tolerance alone could pass an engine a version or
    more behind).
The probe checks are what catch an engine that received the right bytes but still serves the old
adapter (stale LoRA cache, prefix cache, wrong scaling, a merged weight not rewritten).
"""

from __future__ import annotations

from dataclasses import dataclass

import ray
import torch

from rank1.rollout.engine import AdapterReceipt, adapter_digest, max_abs_diff

# How far an engine's probe logprobs may be from the learner's: fp32 engines agree to ~1e-5, bf16 weights
# or a bf16 learner move SmolLM2's probe logprobs by up to ~0.2. The tolerance of a sync is the sum of
# both sides' (rank1.driver.rollouts.probe_tolerance).
PROBE_NOISE = {"float32": 5e-4, "bfloat16": 0.3}


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
    previous_probe: list[float] | None = None,
) -> list[AdapterReceipt]:
    """Load `refs` on every actor (in parallel) and verify the receipts; returns them in actor order."""
    receipts: list[AdapterReceipt] = ray.get([a.load_adapter.remote(refs.tensors, refs.peft_config, refs.version) for a in actors])
    check_receipts(receipts, refs.version, refs.digest, expected_probe, atol, previous_probe)
    return receipts


def _distance(a: list[float], b: list[float]) -> float:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 if len(a) == len(b) else float("inf")


def check_receipts(
    receipts: list[AdapterReceipt],
    version: int,
    digest: str,
    expected_probe: list[float] | None = None,
    atol: float = 1e-3,
    previous_probe: list[float] | None = None,
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
        if expected_probe is not None and previous_probe is not None and max_abs_diff(expected_probe, previous_probe) > atol:
            to_new, to_old = _distance(r.probe_logprobs, expected_probe), _distance(r.probe_logprobs, previous_probe)
            if to_new >= to_old:
                raise AdapterSyncError(
                    f"engine {i}: after loading version {version} its probe logprobs are closer to the previous version's "
                    f"(distance {to_old:.3g}) than to this one's ({to_new:.3g}); it is serving a stale adapter"
                )
