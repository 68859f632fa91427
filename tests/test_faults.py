"""Faults a long job meets, through the real CLI in child processes: pre-emption (SIGTERM), a changed
config on --resume, a damaged checkpoint, a full disk, NaN steps — each with its figure checked."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1_testing import REPO, run_rank1, wait_for_step

pytestmark = pytest.mark.slow  # each test runs the real CLI several times

SMALL = ["--data.arithmetic_rows", "32", "--data.max_length", "96", "--trainer.global_batch_size", "4",
         "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--logging.progress", "false",
         "--eval.in_training", "false"]


def adapter_bytes(run: Path, sub: str = "adapter") -> bytes:
    return (run / sub / "adapter_model.safetensors").read_bytes()


def start(*args: str, env: dict | None = None, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> Path:
    """The fault-free reference: 8 steps, checkpoints every 2."""
    out = tmp_path_factory.mktemp("straight") / "run"
    result = run_rank1("train", *SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5",
                       "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_sigterm_checkpoints_stops_and_resume_is_bit_identical(straight, tmp_path):
    out = tmp_path / "run"
    args = [*SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5", "--output-dir", str(out)]
    proc = start(*args)
    wait_for_step(out, 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 75, stderr[-3000:]  # the documented pre-emption exit code
    stopped = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"]
    assert f"stopped by a signal after step {stopped}" in stderr and "continue with --resume" in stderr
    assert (out / "checkpoints" / f"step-{stopped:06d}").is_dir() and not (out / "adapter").exists()
    resumed = run_rank1("train", *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert adapter_bytes(out) == adapter_bytes(straight)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == list(range(1, 9))


def test_a_second_signal_stops_at_once(tmp_path):
    # SIGINT (Ctrl-C) is handled as SIGTERM is: the first is acknowledged, a second one stops at once.
    out = tmp_path / "run"
    proc = start(*SMALL, "--max-steps", "200", "--trainer.checkpoint_every", "0", "--output-dir", str(out))
    wait_for_step(out, 1, proc)
    proc.send_signal(signal.SIGINT)
    for line in proc.stderr:  # the first signal is acknowledged (two sent at once would merge into one)
        if "SIGINT: finishing the step in flight" in line:
            break
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGINT
    assert not (out / "adapter").exists()


def test_resume_with_a_changed_config_is_refused_naming_the_fields(straight, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "adapter")
    base = [*SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5", "--output-dir", str(out), "--resume"]
    refused = run_rank1("train", *[a if a != "96" else "128" for a in base])  # data.max_length changes what is trained on
    assert refused.returncode == 2 and "the config differs from the run's in data.max_length" in refused.stderr
    asked = run_rank1("train", *base, "--logging.log_every", "2")  # harmless, but only when asked for
    assert asked.returncode == 2 and "--trainer.resume_allow_changes logging.log_every" in asked.stderr
    allowed = run_rank1("train", *base, "--logging.log_every", "2", "--trainer.resume_allow_changes", "logging.log_every")
    assert allowed.returncode == 0, allowed.stderr[-3000:]
    assert adapter_bytes(out) == adapter_bytes(straight)


def test_a_damaged_checkpoint_is_reported_and_the_previous_one_used(straight, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "adapter")
    state = next((out / "checkpoints" / "step-000006").rglob("*model_states.pt"))
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # as a kill during the write would leave it
    resumed = run_rank1("train", *SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.keep_checkpoints", "5",
                        "--output-dir", str(out), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step-000006 is damaged" in resumed.stderr and "resumed from" in resumed.stderr and "step-000004 at step 4" in resumed.stderr
    assert adapter_bytes(out) == adapter_bytes(straight)


def test_a_full_disk_during_a_checkpoint_is_a_clear_error_and_keeps_the_earlier_ones(straight, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(straight, out)
    shutil.rmtree(out / "adapter")
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    limit = 2 << 20  # files over 2 MB cannot be written: the optimizer state is about 3.7 MB, metrics lines are small

    def small_disk():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    result = subprocess.run([sys.executable, "-m", "rank1.cli", "train", *SMALL, "--max-steps", "12", "--trainer.checkpoint_every", "2",
                             "--trainer.keep_checkpoints", "5", "--output-dir", str(out), "--resume",
                             "--trainer.resume_allow_changes", "trainer.max_steps"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=600, preexec_fn=small_disk)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "step-000008 was not saved: the disk is full or a file size limit was reached" in result.stderr
    assert "earlier checkpoints are intact" in result.stderr and "Traceback" not in result.stderr
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before  # nothing half-written, nothing removed
    for name in before:
        assert json.loads((out / "checkpoints" / name / "trainer_state.json").read_text())["step"] == int(name[5:])


def test_nan_steps_are_skipped_counted_and_never_saved(tmp_path):
    out = tmp_path / "run"
    env = {"RANK1_FAULT_NAN_STEPS": "2"}
    proc = start(*SMALL, "--max-steps", "4", "--trainer.checkpoint_every", "1", "--trainer.keep_checkpoints", "5",
                 "--output-dir", str(out), env=env)
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 0, stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite"] for r in rows] == [False, True, False, False]
    assert [r["nonfinite_total"] for r in rows] == [0, 1, 1, 1]  # a running count in metrics.jsonl
    assert "step 2: the loss or a gradient is NaN or inf; the update was skipped" in stderr
    first, second, third = (load_file(str(out / "checkpoints" / f"step-00000{i}" / "adapter" / "adapter_model.safetensors"))
                            for i in (1, 2, 3))
    assert all(torch.equal(first[k], second[k]) for k in first)  # step 2 changed nothing
    assert any(not torch.equal(second[k], third[k]) for k in first)  # step 3 trained again
    assert all(torch.isfinite(t).all() for t in load_file(str(out / "adapter" / "adapter_model.safetensors")).values())

    stopped = tmp_path / "stopped"
    proc = start(*SMALL, "--max-steps", "8", "--trainer.checkpoint_every", "2", "--trainer.max_nonfinite_steps", "3",
                 "--output-dir", str(stopped), env={"RANK1_FAULT_NAN_STEPS": "3,4,5,6"})
    _, stderr = proc.communicate(timeout=600)
    assert proc.returncode == 2 and "3 consecutive steps had a NaN or inf loss or gradient (last at step 5)" in stderr
    assert "the last good checkpoint is" in stderr and "step-000004" in stderr and "Traceback" not in stderr
    assert not (stopped / "adapter").exists()
