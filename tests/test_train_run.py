"""`rank1 train` end to end in child processes: run outputs, kill -9 + --resume bit-identical, and
ZeRO-3 over gloo with 2 learners (Ray actors) equal to 1 learner on the same global batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1_testing import REPO, run_rank1

SMALL = ["--data.arithmetic_rows", "32", "--data.max_length", "96", "--trainer.global_batch_size", "4",
         "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--logging.progress", "false"]


def adapter(run: Path, sub: str = "adapter") -> dict:
    return load_file(str(run / sub / "adapter_model.safetensors"))


def test_run_directory_holds_everything(tmp_path):
    out = tmp_path / "run"
    result = run_rank1("train", *SMALL, "--max-steps", "3", "--trainer.checkpoint_every", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "210 rank-1 adapters" in result.stderr and "305,280 trainable parameters" in result.stderr
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(r["loss"] > 0 and r["tokens_per_s"] > 0 and r["lr"] > 0 for r in rows)
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert "max_steps: 3" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]
    assert set(os.listdir(out / "adapter")) == {"adapter_config.json", "adapter_model.safetensors"}
    assert sum(t.numel() for t in adapter(out).values()) == 305_280
    # `rank1 generate` samples from base + this adapter: the same greedy text PEFT gives in this process.
    generated = run_rank1("generate", "--adapter", str(out / "adapter"), "--max-new-tokens", "12", "What is 2 + 3 * 4?")
    assert generated.returncode == 0, generated.stderr[-2000:]
    from rank1.core.adapter_io import load_adapted_model
    from rank1.core.config import ModelConfig

    model, tokenizer, _ = load_adapted_model(str(out / "adapter"), ModelConfig())
    ids = tokenizer.apply_chat_template([{"role": "user", "content": "What is 2 + 3 * 4?"}], add_generation_prompt=True,
                                        return_tensors="pt", return_dict=True)
    with torch.no_grad():
        greedy = model.generate(**ids, max_new_tokens=12, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected = tokenizer.decode(greedy[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
    assert expected.strip() and generated.stdout.strip() == expected.strip()
    # A second run into the same directory is refused without --resume.
    again = run_rank1("train", *SMALL, "--max-steps", "3", "--output-dir", str(out))
    assert again.returncode != 0 and "already holds a run" in again.stderr


def test_kill_then_resume_is_bit_identical(tmp_path):
    args = [*SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5"]
    straight = tmp_path / "straight"
    assert run_rank1("train", *args, "--output-dir", str(straight)).returncode == 0

    killed = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args, "--output-dir", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists(), "the run finished before it was killed"
    resumed = run_rank1("train", *args, "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    a, b = adapter(straight), adapter(killed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (straight / "adapter" / "adapter_model.safetensors").read_bytes() == (killed / "adapter" / "adapter_model.safetensors").read_bytes()
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


def test_resume_without_checkpoint_is_refused(tmp_path):
    result = run_rank1("train", *SMALL, "--output-dir", str(tmp_path / "empty"), "--resume")
    assert result.returncode != 0 and "no complete checkpoint" in result.stderr


@pytest.mark.slow
def test_zero3_two_learners_over_gloo_equal_one(tmp_path):
    # 1 learner: 2 micro-batches of 2 rows; 2 learners: 1 micro-batch of 2 rows each.
    common = [*SMALL, "--trainer.zero_stage", "3", "--max-steps", "2", "--trainer.checkpoint_every", "0",
              "--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "256"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_rank1("train", *common, "--trainer.num_learners", "1", "--output-dir", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    r2 = run_rank1("train", *common, "--trainer.num_learners", "2", "--output-dir", str(two))
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = adapter(one), adapter(two)
    assert sum(t.numel() for t in b.values()) == 305_280  # gathered from both shards, not empty
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-5
    lora_b = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in lora_b)  # training moved B away from its zero init
