"""The sync proof in bf16: the tolerance follows both sides' precision, and an engine that kept the
previous adapter is caught even where that tolerance alone would let it pass."""

from __future__ import annotations

import pytest
from peft import set_peft_model_state_dict

from rank1.core.flags import load_config
from rank1.driver.rollouts import probe_tolerance
from rank1.rollout.engine import AdapterReceipt, adapter_digest, max_abs_diff
from rank1.rollout.sync import PROBE_NOISE, AdapterSyncError, check_receipts, distance
from rank1_testing import REPO


def test_tolerance_follows_the_learner_and_the_engine():
    fp32 = PROBE_NOISE["float32"]
    assert probe_tolerance(load_config([])) == pytest.approx(2 * fp32)  # CPU: fp32 learner, fp32 engine
    assert probe_tolerance(load_config(["--rollout.dtype", "bfloat16"])) == pytest.approx(fp32 + PROBE_NOISE["bfloat16"])
    # The 32B GRPO recipe: learners bf16 on GPUs; with fp32 engines the first sync used to raise (fp32 tolerance only).
    recipe = ["--config", str(REPO / "clusters/recipes/qwen2.5-32b-grpo.yaml")]
    assert probe_tolerance(load_config(recipe + ["--rollout.dtype", "float32"])) >= PROBE_NOISE["bfloat16"]


@pytest.fixture(scope="module")
def bf16_engine(model_path):
    from rank1.rollout.hf_engine import HFEngine

    return HFEngine(model_path, dtype="bfloat16", batch_size=4)


def test_stale_bf16_engine_is_caught(bf16_engine, learner):
    engine, atol = bf16_engine, PROBE_NOISE["float32"] + PROBE_NOISE["bfloat16"]
    probe = engine.probe_token_ids()
    learner.randomize(seed=31)
    v1, config = learner.adapter()
    expected_v1 = learner.logprobs(probe)
    r1 = engine.load_adapter(v1, config, 1)
    noise = check_receipts([r1], 1, adapter_digest(v1), expected_v1, atol)
    assert 0 < noise and max_abs_diff(r1.probe_logprobs, expected_v1) <= atol  # bf16: near the fp32 learner's, not equal

    # Version 2 moves every logprob by less than the bf16 tolerance, but the versions are farther apart
    # than the engine's noise: the tolerance alone cannot see a stale engine, the distance to both can.
    for scale in [1 + i / 100 for i in range(2, 40, 2)]:
        v2 = {k: v * scale if "lora_B" in k else v for k, v in v1.items()}
        set_peft_model_state_dict(learner.model, v2)
        expected_v2 = learner.logprobs(probe)
        if max_abs_diff(expected_v2, expected_v1) < atol and distance(expected_v2, expected_v1) > 2 * noise:
            break
    else:
        pytest.fail("no version 2 between the engine's noise and the bf16 tolerance")
    stale = AdapterReceipt(2, adapter_digest(v2), r1.probe_logprobs)  # received version 2's bytes, serves version 1
    assert max_abs_diff(stale.probe_logprobs, expected_v2) <= atol  # what the tolerance-only check accepted
    with pytest.raises(AdapterSyncError, match="closer to the previous version's .* stale adapter"):
        check_receipts([stale], 2, adapter_digest(v2), expected_v2, atol, previous_probe=expected_v1, noise=noise)
    # The engine that really loads version 2 passes the same check.
    r2 = engine.load_adapter(v2, config, 2)
    check_receipts([r2], 2, adapter_digest(v2), expected_v2, atol, previous_probe=expected_v1, noise=noise)
