"""Shared fixtures: the real SmolLM2-135M folder, a learner (PEFT model with a random non-zero rank-1
adapter, as after some training), and one local Ray session for the module that needs it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]


class Learner:
    """The trainer's side of a sync: a PEFT model whose adapter we set, and a plain forward pass."""

    def __init__(self, path: str):
        from rank1.core.config import AdapterConfig, ModelConfig
        from rank1.core.model import attach_adapter, load_base, load_tokenizer

        self.model = attach_adapter(load_base(path, ModelConfig(), torch.float32), AdapterConfig(), "smollm2").eval()
        self.tokenizer = load_tokenizer(path, ModelConfig())

    def randomize(self, seed: int, scale: float = 0.02) -> None:
        # lora_B starts at zero (the adapter is a no-op); give both factors random values, like a trained adapter.
        g = torch.Generator().manual_seed(seed)
        for name, p in self.model.named_parameters():
            if "lora_A" in name:
                p.data = torch.randn(p.shape, generator=g) / p.shape[1] ** 0.5
            elif "lora_B" in name:
                p.data = torch.randn(p.shape, generator=g) * scale

    def adapter(self) -> tuple[dict[str, torch.Tensor], dict]:
        from peft import get_peft_model_state_dict

        tensors = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.model).items()}
        return tensors, self.model.peft_config["default"].to_dict()

    @torch.no_grad()
    def logprobs(self, ids: list[int], temperature: float = 1.0, top_p: float = 1.0) -> list[float]:
        """log p(ids[t] | ids[:t]) under softmax(logits / T) restricted to the top-p nucleus and renormalised:
        the distribution a sampler with these settings draws from (written out here as the reference)."""
        x = torch.tensor([ids])
        probs = (self.model(input_ids=x).logits[0, :-1] / temperature).softmax(-1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            outside = sorted_p.cumsum(-1) - sorted_p >= top_p  # tokens after the nucleus is complete
            sorted_p = sorted_p.masked_fill(outside, 0.0)
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
            probs = probs / probs.sum(-1, keepdim=True)
        return probs.gather(-1, x[0, 1:, None]).squeeze(-1).log().tolist()

    def chat_prompt(self, text: str) -> list[int]:
        ids = self.tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
        return list(ids if isinstance(ids, list) else ids["input_ids"])


@pytest.fixture(scope="session")
def learner(model_path) -> Learner:
    return Learner(model_path)


def max_diff(a: list[float], b: list[float]) -> float:
    assert len(a) == len(b), (len(a), len(b))
    return max(abs(x - y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.shutdown()  # one Ray per module: another folder's tests may have left theirs running
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


def run_sync_scenario(push, generate, score, learner: Learner, probe_ids: list[int], atol: float) -> dict:
    """The live-sync check both backends must pass; `push(tensors, config, version, expected_probe)`.

    After each push the engine's logprobs of a fixed prompt+completion must match the learner's plain
    forward pass with the adapter just sent, and differ from the previous adapter's by far more than
    the tolerance, so an engine that kept serving the old adapter fails here.
    """
    from rank1.rollout.engine import SamplingSpec

    learner.randomize(seed=1)
    tensors_v1, config = learner.adapter()
    push(tensors_v1, config, 1, learner.logprobs(probe_ids))

    prompt = learner.chat_prompt("What is 7 + 5? Answer with a number.")
    completions = generate([prompt], SamplingSpec(max_new_tokens=12, temperature=1.0, seed=3))
    assert len(completions) == 1 and completions[0].prompt_index == 0
    c = completions[0]
    assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
    seq = prompt + c.token_ids
    learner_v1 = learner.logprobs(seq)
    # Logprobs reported while sampling are the served model's, i.e. the learner's for the same tokens.
    assert max_diff(c.logprobs, learner_v1[len(prompt) - 1 :]) < atol
    assert max_diff(score([seq])[0], learner_v1) < atol

    learner.randomize(seed=2)
    tensors_v2, _ = learner.adapter()
    push(tensors_v2, config, 2, learner.logprobs(probe_ids))
    learner_v2 = learner.logprobs(seq)
    engine_v2 = score([seq])[0]
    assert max_diff(engine_v2, learner_v2) < atol
    assert max_diff(learner_v1, learner_v2) > 50 * atol  # the test can tell the versions apart
    assert max_diff(engine_v2, learner_v1) > 50 * atol  # ... and the engine no longer serves v1

    # Version 1's tensors again under a new version: served again, whatever the engine cached.
    push(tensors_v1, config, 3, None)
    assert max_diff(score([seq])[0], learner_v1) < atol
    return {"v1": tensors_v1, "v2": tensors_v2, "config": config, "seq": seq, "learner_v1": learner_v1}
