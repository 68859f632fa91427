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

from rank1_testing import REPO, run_rank1, tagged_env, tagged_pids

SMALL = ["--data.arithmetic_rows", "32", "--data.max_length", "96", "--trainer.global_batch_size", "4",
         "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--logging.progress", "false", "--eval.in_training", "false"]


def adapter(run: Path, sub: str = "adapter") -> dict:
    return load_file(str(run / sub / "adapter_model.safetensors"))


@pytest.mark.slow
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


@pytest.mark.slow
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


@pytest.mark.slow
def test_resume_without_checkpoint_is_refused(tmp_path):
    result = run_rank1("train", *SMALL, "--output-dir", str(tmp_path / "empty"), "--resume")
    assert result.returncode != 0 and "no complete checkpoint" in result.stderr


@pytest.mark.slow
def test_zero3_two_learners_over_gloo_equal_one_through_a_preemption(tmp_path):
    # 1 learner: 2 micro-batches of 2 rows; 2 learners (Ray actors, base sharded): 1 micro-batch of 2 rows each.
    # The 2-learner run is SIGTERM'd after its first step, checkpoints every rank's shard, stops its actors and resumes.
    common = [*SMALL, "--trainer.zero_stage", "3", "--max-steps", "3", "--trainer.checkpoint_every", "0",
              "--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "256", "--eval.in_training", "false"]
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_rank1("train", *common, "--trainer.num_learners", "1", "--output-dir", str(one))
    assert r1.returncode == 0, r1.stderr[-3000:]
    env = tagged_env(f"zero3-preempted-{os.getpid()}")
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *common, "--trainer.num_learners", "2", "--output-dir", str(two)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 900
    while not (two / "metrics.jsonl").exists() or not (two / "metrics.jsonl").read_text().strip():
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first step"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 75, stderr[-3000:]
    assert len(list((two / "checkpoints").glob("step-*/state/*"))) >= 2  # both ranks' ZeRO-3 shards
    assert tagged_pids(env["RANK1_TEST_TAG"], "ray::Learner") == []  # its actors stopped (another test's may be running)
    r2 = run_rank1("train", *common, "--trainer.num_learners", "2", "--output-dir", str(two), "--resume")
    assert r2.returncode == 0, r2.stderr[-3000:]
    a, b = adapter(one), adapter(two)
    assert sum(t.numel() for t in b.values()) == 305_280  # gathered from both shards, not empty
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    assert max((a[k] - b[k]).abs().max() for k in a) < 1e-5
    lora_b = [k for k in a if "lora_B" in k]
    assert any(a[k].abs().max() > 0 for k in lora_b)  # training moved B away from its zero init
    assert [json.loads(line)["step"] for line in (two / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]


@pytest.mark.slow
def test_continued_adapter_keeps_its_own_config(tmp_path, model_path):
    # An adapter.init folder built with other settings than the adapter section's defaults (2 targets, alpha 8):
    # the run trains, saves and syncs that adapter's own config, not one rebuilt from the section.
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    init = tmp_path / "init"
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_path),
                           LoraConfig(r=1, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(init)
    out = tmp_path / "run"
    result = run_rank1("train", *SMALL, "--max-steps", "1", "--adapter.init", str(init), "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert sorted(saved["target_modules"]) == ["q_proj", "v_proj"] and saved["lora_alpha"] == 8
    keys = adapter(out).keys()
    assert len(keys) == 2 * 2 * 30 and all(("q_proj" in k or "v_proj" in k) for k in keys)


@pytest.mark.slow
def test_held_out_accuracy_at_the_start_and_end_of_a_run(tmp_path):
    out = tmp_path / "run"
    result = run_rank1("train", *SMALL, "--eval.in_training", "true", "--max-steps", "4", "--eval.k", "2",
                       "--eval.heldout_rows", "12", "--eval.max_new_tokens", "24", "--rollout.backend", "transformers",
                       "--cluster.local_num_cpus", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [r for r in rows if "heldout_accuracy" in r]
    assert [r["step"] for r in evaluated] == [0, 4] and all(r["heldout_problems"] == 12 for r in evaluated)
    assert all(0 <= r["heldout_accuracy"] <= 1 and r["heldout_ci95"][0] <= r["heldout_accuracy"] <= r["heldout_ci95"][1]
               for r in evaluated)
    # eval.k 2: each evaluation also samples 2 completions a problem; the end's gain over the start is paired
    assert all(r["heldout_sampled_accuracy"] in {i / 24 for i in range(25)} for r in evaluated)
    start, end = evaluated
    assert "heldout_gain_pass@1" not in start and end["heldout_gain_since_step"] == 0
    for metric, key in (("pass@1", "heldout_accuracy"), ("sampled_pass@1", "heldout_sampled_accuracy")):
        assert end[f"heldout_gain_{metric}"] == pytest.approx(end[key] - start[key], abs=1e-9)
        low, high = end[f"heldout_gain_{metric}_ci95"]
        assert low <= end[f"heldout_gain_{metric}"] <= high
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["heldout_start"], summary["heldout_end"]) == (start["heldout_accuracy"], end["heldout_accuracy"])
    assert (summary["heldout_sampled_start"], summary["heldout_sampled_end"]) == (start["heldout_sampled_accuracy"],
                                                                                  end["heldout_sampled_accuracy"])
    assert summary["heldout_gain_pass@1"] == end["heldout_gain_pass@1"]
    low, high = end["heldout_gain_pass@1_ci95"]
    assert (f"held-out accuracy {100 * summary['heldout_start']:.1f} % -> {100 * summary['heldout_end']:.1f} % "
            f"({100 * end['heldout_gain_pass@1']:+.1f} points, paired 95 % interval {100 * low:+.1f} to {100 * high:+.1f}), "
            f"12 problems; sampled pass@1 {100 * summary['heldout_sampled_start']:.1f} % -> ") in result.stderr
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]
