"""`rank1 sweep`: N rank-1 runs over one base. The batched layer equals N separate PEFT models; each swept
adapter equals its solo `rank1 train`; runs with other learning rates really differ; a killed sweep resumes."""

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
         "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--logging.progress", "false",
         "--eval.in_training", "false", "--trainer.warmup_ratio", "0"]


def adapter(folder: Path) -> dict:
    return load_file(str(folder / "adapter" / "adapter_model.safetensors"))


def metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def assert_same_training_up_to_reassociation(run: Path, reference: Path) -> None:
    """The same losses step by step, and adapters within 1e-3 of what training moved them plus a few lr.
    Summation order is the only difference: ~1e-7 at step 1, before any update; then Adam's first steps, near sign(gradient),
    turn the float noise of an element whose gradient is near 0 into up to ~lr, so later losses drift with
    the learning rate (a local run saw 1.7e-5 relative at step 3 with lr 4e-3; 1e-4 leaves room). A lost or
    repeated step moves the adapter by ~lr on every element, far past the adapter bound."""
    reference_rows = metrics(reference)
    losses, expected = [r["loss"] for r in metrics(run)], [r["loss"] for r in reference_rows]
    assert losses[0] == pytest.approx(expected[0], rel=1e-5), run.name
    assert losses == pytest.approx(expected, rel=1e-4), run.name
    a, b = adapter(run), adapter(reference)
    assert a.keys() == b.keys()
    diff = torch.sqrt(sum(((a[k] - b[k]) ** 2).sum() for k in a))
    moved = torch.sqrt(sum((b[k] ** 2).sum() for k in b if "lora_B" in k))  # B starts at 0
    # A few flipped elements cost ~lr each (a local run: 0.0042 at lr 4e-3, over 1e-3 of the 2.68 moved);
    # a lost or repeated step costs ~lr on each of the 305,280 elements, ~550 lr in norm.
    lr = max(r["lr"] for r in reference_rows)
    assert diff < 1e-3 * moved + 10 * lr, (run.name, float(diff), float(moved), lr)


def test_mixed_batch_forward_and_gradients_equal_separate_peft_models(model_path, tokenizer):
    from peft import PeftModel

    from rank1.core.adapter_io import write_adapter
    from rank1.core.config import AdapterConfig, ModelConfig
    from rank1.core.model import load_base, lora_config
    from rank1.trainer.batched_rank1 import attach_runs, run_state_dict

    cfgs = [AdapterConfig(), AdapterConfig(alpha=8.0), AdapterConfig(alpha=32.0)]
    model = attach_runs(load_base(model_path, ModelConfig(), torch.float32), cfgs, seeds=[0, 1, 2])
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, layer in model.layers():
            for b in layer.lora_B:
                b.copy_(torch.randn(b.shape, generator=g) * 0.02)
    texts = ["What is 2 + 3?", "Name a prime.", "Count to four.", "What is 7 * 6?", "Spell cat.", "Hello!"]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    runs = torch.tensor([0, 1, 2, 2, 0, 1])
    model.index.rows = runs
    mixed = model(**batch).logits
    mixed[..., :50].sum().backward()
    for run, cfg in enumerate(cfgs):
        folder = Path(f"/tmp/rank1-sweep-test-run{run}-{os.getpid()}")
        write_adapter(folder, run_state_dict(model, run), lora_config(cfg), "smollm2-135m-instruct")
        solo = PeftModel.from_pretrained(load_base(model_path, ModelConfig(), torch.float32), str(folder), is_trainable=True)
        rows = (runs == run).nonzero().squeeze(1)
        logits = solo(input_ids=batch["input_ids"][rows], attention_mask=batch["attention_mask"][rows]).logits
        torch.testing.assert_close(mixed[rows], logits, atol=1e-4, rtol=1e-4)  # logits of ~10: float reassociation
        logits[..., :50].sum().backward()
        name, layer = model.layers()[5]
        peft_a = dict(solo.named_parameters())[f"base_model.model.{name}.lora_A.default.weight"]
        torch.testing.assert_close(layer.lora_A[run].grad, peft_a.grad, atol=1e-4, rtol=1e-3)  # per run too (sums over other batch shapes)


@pytest.mark.slow
def test_each_swept_adapter_equals_its_solo_run_and_a_killed_sweep_resumes(tmp_path):
    sweep_args = [*SMALL, "--trainer.lr", "1e-3,4e-3", "--seed", "0,1", "--max-steps", "4", "--trainer.checkpoint_every", "2"]
    out = tmp_path / "sweep"
    result = run_rank1("sweep", *sweep_args, "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in out.iterdir() if p.name.startswith("run-"))
    assert [p.name for p in runs] == ["run-00-lr1e-3-seed0", "run-01-lr1e-3-seed1", "run-02-lr4e-3-seed0", "run-03-lr4e-3-seed1"]
    for run in runs:
        assert json.loads((run / "adapter" / "adapter_config.json").read_text())["r"] == 1
        assert [r["step"] for r in metrics(run)] == [1, 2, 3, 4]
    assert (out / "curves.png").stat().st_size > 0 and "run-03-lr4e-3-seed1" in (out / "summary.md").read_text()
    # Each run equals `rank1 train` with its settings (float reassociation only: rows share micro-batches with other runs).
    # One solo run: the last, whose learning rate and seed both differ from the defaults, so both flags reach it.
    solo = tmp_path / "solo"
    result = run_rank1("train", *SMALL, "--lr", "4e-3", "--seed", "1", "--max-steps", "4", "--trainer.checkpoint_every", "0",
                       "--output-dir", str(solo))
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_training_up_to_reassociation(runs[3], solo)
    # Runs with other learning rates (or seeds) really differ.
    first, other = adapter(runs[0]), adapter(runs[2])
    assert max(float((first[k] - other[k]).abs().max()) for k in first) > 1e-3

    # Each run keeps its own checkpoints: the adapter at every checkpoint, in its own folder (what `rank1 export` takes).
    for run in runs:
        assert json.loads((run / "checkpoints" / "step-000002" / "adapter" / "adapter_config.json").read_text())["r"] == 1

    # The same sweep on 2 learners (Ray actors) with the base sharded by ZeRO-3, SIGKILLed after its first
    # checkpoint and resumed: the same four adapters, up to the float reassociation of the 2-rank reduction.
    killed = tmp_path / "killed"
    sharded = [*sweep_args, "--trainer.num_learners", "2", "--trainer.zero_stage", "3", "--cluster.local_num_cpus", "2",
               "--cluster.local_object_store_mb", "256"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "sweep", *sharded, "--output-dir", str(killed)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 600
    while not (killed / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "the sweep ended before its first checkpoint"
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver and the learner actors it started
    proc.wait()
    resumed = run_rank1("sweep", *sharded, "--output-dir", str(killed), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    # Against the 1-learner sweep the only difference is the 2-rank reduction's summation order (CI saw 7e-4
    # at lr 1e-3 on single elements): the same bounds as sweep vs solo. A resume that lost or repeated anything
    # (optimizer moments, data position, a step) moves the adapter by ~lr on every element.
    for run in runs:
        assert sum(t.numel() for t in adapter(killed / run.name).values()) == 305_280  # gathered from both shards
        assert [r["step"] for r in metrics(killed / run.name)] == [1, 2, 3, 4], run.name  # no gap, no duplicate across the kill
        assert_same_training_up_to_reassociation(killed / run.name, run)


@pytest.mark.parametrize("flags, message", [
    (["--data.max_length", "64,96"], "data.max_length cannot vary across runs that share a base"),
    (["--trainer.lr", "1e-3,"], "has an empty value in its list"),
    (["--seed", "0,1,2", "--sweep.max_runs", "2"], "3 runs, over sweep.max_runs=2"),
    (["--trainer.lr", "fast,1e-3"], "trainer.lr: expected a number"),
    (["--objective", "grpo", "--seed", "0,1,2", "--rollout.max_adapters", "2"], "3 runs need 3 adapter slots per engine"),
])
def test_bad_sweeps_are_refused_naming_the_field(tmp_path, flags, message):
    result = run_rank1("sweep", *SMALL, *flags, "--max-steps", "1", "--output-dir", str(tmp_path / "s"))
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and not (tmp_path / "s").exists()


@pytest.mark.slow
def test_grpo_sweep_serves_each_run_from_its_own_vllm_adapter(tmp_path, model_path, tokenizer):
    # Two runs far apart in learning rate on one vLLM engine (one LoRA slot each): every completion the
    # learners train on must come from its own run's adapter, i.e. the engine's token logprobs equal that
    # run's learner's; the per-slot sync proofs run every step; held-out accuracy is taken per run.
    from peft import PeftModel

    from rank1.core.config import ModelConfig
    from rank1.core.model import load_base

    out = tmp_path / "grpo-sweep"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "rewards"), str(REPO)])}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run(
        [sys.executable, "-m", "rank1.cli", "sweep", "--objective", "grpo", "--rollout.backend", "vllm", "--data.arithmetic_rows", "32",
         "--data.max_length", "96", "--trainer.zero_stage", "0", "--logging.progress", "false", "--trainer.micro_batch_size", "8",
         "--grpo.prompts_per_step", "2", "--grpo.num_generations", "4", "--grpo.max_completion_length", "6",
         "--rewards.functions", "user_rewards:opens_with_to", "--trainer.lr", "3e-2,1e-6", "--trainer.warmup_ratio", "0",
         "--trainer.lr_schedule", "constant", "--max-steps", "3", "--trainer.checkpoint_every", "0", "--cluster.local_num_cpus", "2",
         "--eval.heldout_rows", "8", "--eval.max_new_tokens", "12", "--output-dir", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = sorted(p for p in out.iterdir() if p.name.startswith("run-"))
    assert [p.name for p in runs] == ["run-00-lr3e-2", "run-01-lr1e-6"]
    gaps = []
    for run in runs:
        rows = metrics(run)
        assert [r["step"] for r in rows] == [0, 1, 2, 3]
        assert "heldout_accuracy" in rows[0] and "heldout_accuracy" in rows[-1]
        gaps += [r["engine_logprob_gap_max"] for r in rows[1:] if not r["skipped"]]
    assert gaps and max(gaps) < 1e-3, gaps  # vLLM fp32 and the learner's fp32 forward agree per token (measured ~3e-6)
    summary = json.loads((out / "summary.json").read_text())["runs"]
    assert [set(r) >= {"heldout_start", "heldout_end", "final_reward_mean"} for r in summary] == [True, True]
    # The runs' policies are far apart (so a completion served by the other run's adapter would show a gap
    # well above the bound): mean |Δ logprob| per token between the two final adapters on a probe text.
    text = tokenizer.apply_chat_template([{"role": "user", "content": "What is 12 + 30?"}], add_generation_prompt=True, tokenize=False)
    ids = tokenizer(text + "To find the sum, add 12 and 30 to get 42.", return_tensors="pt")["input_ids"]
    logprobs = []
    for run in runs:
        model = PeftModel.from_pretrained(load_base(model_path, ModelConfig(), torch.float32), str(run / "adapter"))
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, :-1].log_softmax(-1)
        logprobs.append(logits.gather(-1, ids[0, 1:, None]).squeeze(-1))
    apart = float((logprobs[0] - logprobs[1]).abs().mean())
    assert apart > 0.05, (apart, gaps)


def test_runs_from_a_yaml_list(tmp_path):
    from rank1.core.flags import load_config
    from rank1.driver.sweep import run_configs, run_overrides

    listed = tmp_path / "runs.yaml"
    listed.write_text("- {trainer.lr: 1.0e-4, seed: 1}\n- {trainer.lr: 3.0e-4}\n")
    cfg = load_config(["--output-dir", str(tmp_path / "s"), "--sweep.runs", str(listed)])
    runs = run_configs(cfg, run_overrides(cfg, {}))
    assert [(r.trainer.lr, r.seed) for r in runs] == [(1e-4, 1), (3e-4, 0)]
    assert [Path(r.logging.output_dir).name for r in runs] == ["run-00-lr0.0001-seed1", "run-01-lr0.0003"]
    from rank1.core.config import ConfigError

    for text, message in (("{trainer.lr: 1e-4}", "expected a YAML list of mappings"), ("[{model.name_or_path: x}]", "cannot vary")):
        listed.write_text(text)
        with pytest.raises(ConfigError, match=message):
            run_overrides(cfg, {})
    with pytest.raises(ConfigError, match="no such file"):
        run_overrides(load_config(["--sweep.runs", str(tmp_path / "missing.yaml")]), {})
