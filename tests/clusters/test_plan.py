"""`rank1 plan`: memory per device from the model config alone, and refusal of what does not fit."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from rank1.core.flags import load_config
from rank1.driver.plan import GB, GPUS, main, model_shape, plan_memory, resolve_zero_stage

REPO = Path(__file__).resolve().parents[2]
SFT_RECIPE = "clusters/recipes/qwen2.5-32b-s1k-sft.yaml"
GRPO_RECIPE = "clusters/recipes/qwen2.5-32b-grpo.yaml"
QWEN_32B = "Qwen/Qwen2.5-32B-Instruct"
ADAPTER_PARAMS = 8_388_608  # 64 layers × (4 attention + 3 MLP projections), r × (in + out) each


@pytest.fixture(scope="module")
def shape():
    return model_shape(QWEN_32B)  # the config bundled in rank1/model_configs, offline


def sft(*flags: str):
    return load_config(["--config", str(REPO / SFT_RECIPE), *flags])


def run_plan(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "rank1.driver.plan", *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def row_gb(out: str, name: str) -> float:
    match = re.search(rf"^\s+{re.escape(name)}\s+(-?[\d.]+)", out, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{out}"
    return float(match.group(1))


def test_shape_of_qwen_32b(shape):
    assert shape.parameters == 32_763_876_352
    assert (shape.layers, shape.hidden, shape.intermediate, shape.kv_dim, shape.vocab) == (64, 5120, 27648, 1024, 152064)
    assert shape.largest_module == 152064 * 5120  # lm_head (untied) is bigger than a decoder layer


@pytest.mark.slow
def test_32b_sft_fits_8x_h200_per_gpu(shape):
    proc = run_plan(SFT_RECIPE, "--gpu", "h200")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "16 learner(s) on H200 (141 GB each; 2 node(s) of 8), ZeRO-3, bf16" in out
    assert row_gb(out, "base weights (ZeRO-3)") == pytest.approx(32.76e9 * 2 / 16 / GB, abs=0.01)
    assert f"{ADAPTER_PARAMS:,} trainable parameters" in out
    total = row_gb(out, "total per device")
    assert 20 < total < 141 and row_gb(out, "headroom") == pytest.approx(141 - total, abs=0.02)
    assert "fits:" in out


def test_plan_components_follow_the_formulas(shape):
    plan = plan_memory(sft(), shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    rows = {c.name: c.bytes for c in plan.components}
    assert plan.zero_stage == 3 and plan.world_size == 16 and plan.tokens == 20000
    assert rows["base weights (ZeRO-3)"] == shape.parameters * 2 / 16
    assert rows["adapter weights"] == ADAPTER_PARAMS * 2 / 16
    assert rows["optimizer (AdamW)"] == ADAPTER_PARAMS * 16 / 16
    assert rows["ZeRO-3 gather buffers"] == (5e7 + 152064 * 5120) * 2
    assert rows["activations: layer checkpoints"] == 65 * 20000 * 5120 * 2
    assert rows["activations: loss / layer peak"] >= 20000 * 152064 * 14  # fp32 logits for the loss
    assert plan.total == pytest.approx(sum(rows.values())) and plan.fits

    # Without ZeRO-3 each device holds the whole base and there is nothing to gather.
    whole = plan_memory(sft("--trainer.zero_stage", "0"), shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    assert {c.name: c.bytes for c in whole.components}["base weights (ZeRO-0)"] == shape.parameters * 2
    assert not any("gather" in c.name for c in whole.components)
    # Without gradient checkpointing every layer's activations stay: far more memory.
    no_gc = plan_memory(sft("--model.gradient_checkpointing", "false"), shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    assert no_gc.total > plan.total + 64 * 20000 * 5120 * 2
    # Activations scale with the tokens of a micro-batch.
    short = plan_memory(sft("--data.max_length", "4096"), shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    assert short.total < plan.total - 40 * GB


def test_auto_zero_stage_mirrors_the_learner(shape):
    cfg = sft("--trainer.zero_stage", "auto")
    base = shape.parameters * 2  # 65.5 GB
    assert resolve_zero_stage(cfg, base, GPUS["h100"] * GB) == 3  # over half of 80 GB
    assert resolve_zero_stage(cfg, base, GPUS["h200"] * GB) == 0  # under half of 141 GB


def test_zero0_on_l40s_is_refused(capsys):
    assert main([SFT_RECIPE, "--gpu", "l40s", "--trainer.zero_stage", "0"]) == 1
    captured = capsys.readouterr()
    assert "ZeRO-0" in captured.out
    err = captured.err
    assert "does not fit" in err and "L40S has 48 GB" in err and "base weights (ZeRO-0) 65.5 GB" in err
    over = float(re.search(r"\(([\d.]+) GB over\)", err).group(1))
    assert over == pytest.approx(row_gb(captured.out, "total per device") - 48, abs=0.1)


@pytest.mark.slow
def test_refusal_exits_nonzero_from_the_command_line():
    proc = run_plan(SFT_RECIPE, "--device-memory-gb", "24")
    assert proc.returncode == 1
    assert "does not fit" in proc.stderr and "a 24 GB device has 24 GB" in proc.stderr


def test_grpo_plan_uses_rollout_length_and_checks_engines(capsys, shape):
    assert main([GRPO_RECIPE, "--gpu", "h200"]) == 0
    out = capsys.readouterr().out
    assert "rollout.max_model_len 9,216" in out and "rollout engines: 4 × vLLM, tensor_parallel_size 2 (8 GPUs), bfloat16" in out
    # weights per tensor-parallel shard, and the KV cache the utilisation leaves: 2 × 64 layers × 1024 × 2 B / 2 ranks
    assert row_gb(out, "weights per GPU") == pytest.approx(shape.parameters * 2 / 2 / GB, abs=0.01)
    kv = row_gb(out, "KV cache per GPU")
    assert kv == pytest.approx(0.85 * 141 - shape.parameters / GB - 3.0, abs=0.02)
    tokens = int((0.85 * 141 * GB - shape.parameters - 3.0 * GB) // (2 * 64 * 1024 * 2 / 2))
    assert f"{tokens:,} tokens at 131 kB/token" in out
    assert main([GRPO_RECIPE, "--gpu", "a100-40g"]) == 1
    assert "a rollout engine needs 35.8 GB per GPU for the base weights (tensor_parallel_size 2)" in capsys.readouterr().err
    assert main([GRPO_RECIPE, "--gpu", "a100-40g", "--rollout.tensor_parallel_size", "4"]) == 0


@pytest.mark.parametrize(
    "argv, message",
    [
        (["clusters/recipes/nope.yaml"], "recipe clusters/recipes/nope.yaml: no such file"),
        ([SFT_RECIPE, "--gpu", "v100"], "flag --gpu: plan.gpu: 'v100' is not one of h100, h200"),
        ([SFT_RECIPE, "--gpu"], "flag --gpu needs a value"),
        ([SFT_RECIPE, "--device-memory-gb", "lots"], "--device-memory-gb: plan.device_memory_gb: expected a number, got 'lots'"),
        ([SFT_RECIPE, "--device-memory-gb", "-5"], "--device-memory-gb: plan.device_memory_gb: must be > 0"),
        ([SFT_RECIPE, "--gpus-per-node", "2.5"], "--gpus-per-node: plan.gpus_per_node: expected an integer"),
        ([SFT_RECIPE, "--trainer.zero_stage", "5"], "trainer.zero_stage: '5' is not one of"),
        ([SFT_RECIPE, "--trainer.global_batch_size", "20"], "trainer.global_batch_size: 20 is not a multiple"),
        ([SFT_RECIPE, "--model", "/nonexistent/config.json"], "--model /nonexistent/config.json: cannot read its config"),
        ([], "rank1 plan: RECIPE is required"),
    ],
    ids=["missing-file", "unknown-gpu", "gpu-no-value", "memory-nan", "memory-negative", "per-node-fraction",
         "bad-zero-stage", "bad-batch", "bad-model", "no-recipe"],
)
def test_bad_input_is_a_clear_error(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rank1 plan: error:") and message in err


def test_bad_yaml_recipe_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("trainer: [unclosed\n")
    assert main([str(bad)]) == 2
    assert f"--config {bad}: not valid YAML" in capsys.readouterr().err


def test_help(capsys):
    assert main(["--help"]) == 0
    assert "--device-memory-gb" in capsys.readouterr().out


def test_grpo_recipe_gets_every_other_check(capsys):
    assert main([GRPO_RECIPE, "--gpu", "h200", "--trainer.micro_batch_size", "3"]) == 2
    assert "grpo.prompts_per_step × grpo.num_generations: 64 is not a multiple" in capsys.readouterr().err


def test_model_config_without_model_type_is_a_clear_error(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text('{"hidden_size": 64}')
    assert main([SFT_RECIPE, "--model", str(config)]) == 2
    assert f"{config}: config.json has no model_type" in capsys.readouterr().err


def test_a_sweep_multiplies_adapter_state_only_and_counts_the_runs_that_fit(shape):
    one = plan_memory(sft(), shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    cfg = sft("--plan.runs", "8")
    eight = plan_memory(cfg, shape, ADAPTER_PARAMS, GPUS["h200"] * GB, "H200")
    by_name = lambda plan: {c.name.split(" (")[0]: c.bytes for c in plan.components}  # noqa: E731
    a, b = by_name(one), by_name(eight)
    for name in a:
        if name.startswith(("adapter", "optimizer")):
            assert b[name] == pytest.approx(8 * a[name]), name
        else:
            assert b[name] == a[name], name  # the base, gather buffers and activations are shared by every run
    per_run = sum(a[n] for n in a if n.startswith(("adapter", "optimizer")))
    assert eight.max_runs == 8 + int(eight.headroom // per_run)
    assert f"{eight.max_runs:,} runs fit beside this base" in " ".join(eight.notes)
