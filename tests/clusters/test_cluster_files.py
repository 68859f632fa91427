"""Every shipped cluster file and recipe parses and means what it says."""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from rank1.cli import main as rank1_main
from rank1.core.config import PAPER_TARGET_MODULES
from rank1.core.flags import load_config

REPO = Path(__file__).resolve().parents[2]
CLUSTERS = REPO / "clusters"
RECIPES = sorted((CLUSTERS / "recipes").glob("*.yaml"))
SFT_RECIPE = CLUSTERS / "recipes" / "qwen2.5-32b-s1k-sft.yaml"
GRPO_RECIPE = CLUSTERS / "recipes" / "qwen2.5-32b-grpo.yaml"
CPU_RECIPE = CLUSTERS / "recipes" / "smollm2-cpu-sft.yaml"
SECRET_KEY = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|KEY)(_|$)", re.IGNORECASE)  # HF_TOKEN, not TOKENIZERS_...
SECRET_VALUE = re.compile(r"hf_[A-Za-z0-9]{10,}|sk-[A-Za-z0-9]{10,}")


def secrets_in(env: dict) -> list[str]:
    return [k for k, v in env.items() if SECRET_KEY.search(k) or SECRET_VALUE.search(str(v))]


def ray_pin() -> str:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    (ray,) = [d for d in deps if d.startswith("ray")]
    return ray.split("==")[1]


def test_the_three_recipes_are_shipped():
    assert {p.name for p in RECIPES} >= {SFT_RECIPE.name, GRPO_RECIPE.name, CPU_RECIPE.name}


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipe_resolves(recipe: Path):
    yaml.safe_load(recipe.read_text())
    load_config(["--config", str(recipe)])  # full validation, as rank1 train does


@pytest.mark.parametrize("recipe", [SFT_RECIPE, CPU_RECIPE], ids=lambda p: p.name)
def test_sft_recipes_load_with_rank1_config_show(recipe: Path, capsys):
    assert rank1_main(["config", "show", "--config", str(recipe)]) == 0
    shown = yaml.safe_load(capsys.readouterr().out)
    assert shown["trainer"]["objective"] == "sft"


def test_sft_recipe_has_the_papers_settings():
    cfg = load_config(["--config", str(SFT_RECIPE)])
    a, t, d = cfg.adapter, cfg.trainer, cfg.data
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-32B-Instruct"
    assert (d.path, d.format, d.max_length) == ("simplescaling/s1K-1.1", "s1k", 20000)
    assert (a.r, a.alpha, a.use_rslora, a.dropout, a.target_modules) == (1, 16.0, True, 0.0, PAPER_TARGET_MODULES)
    assert (t.lr, t.lr_schedule, t.warmup_ratio, t.max_steps, t.epochs) == (1e-3, "cosine", 0.05, 0, 5.0)
    assert (t.global_batch_size, t.weight_decay, t.betas, t.precision) == (16, 1e-4, [0.9, 0.95], "bf16")
    assert cfg.model.gradient_checkpointing and t.zero_stage == "3"
    assert (t.num_learners, cfg.cluster.gpus_per_learner) == (16, 1.0)


def test_grpo_recipe():
    cfg = load_config(["--config", str(GRPO_RECIPE)])
    assert (cfg.trainer.objective, cfg.rollout.backend, cfg.rewards.functions) == ("grpo", "vllm", ["math"])
    assert cfg.rollout.max_model_len >= cfg.data.max_length + cfg.grpo.max_completion_length
    assert (cfg.grpo.num_generations, cfg.grpo.max_completion_length, cfg.rollout.async_generation) == (8, 8192, True)
    assert cfg.grpo.instruction.endswith("within \\boxed{}.")


def test_kuberay_rayjob():
    job = yaml.safe_load((CLUSTERS / "kuberay-rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"].endswith("rank1 train --config clusters/recipes/qwen2.5-32b-s1k-sft.yaml")
    assert (REPO / spec["entrypoint"].split("--config ")[1]).is_file()
    cluster = spec["rayClusterSpec"]
    assert cluster["rayVersion"] == ray_pin()
    assert "containers" in cluster["headGroupSpec"]["template"]["spec"]
    (workers,) = cluster["workerGroupSpecs"]
    (container,) = workers["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert workers["replicas"] * 8 == load_config(["--config", str(SFT_RECIPE)]).trainer.num_learners
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["HF_HOME"].startswith("/mnt/shared")
    # Pre-emption: `ray job stop` and a deleted pod give the driver time to finish its step and checkpoint.
    assert int(env["RAY_JOB_STOP_WAIT_TIME_S"]) >= 600
    assert cluster["headGroupSpec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 600
    assert workers["template"]["spec"]["terminationGracePeriodSeconds"] >= 600
    assert not secrets_in(env)
    assert secrets_in({'HF_TOKEN': 'x'}) and not secrets_in({'TOKENIZERS_PARALLELISM': 'false'})


def test_ray_cluster_launcher_has_head_and_8_gpu_workers():
    launcher = yaml.safe_load((CLUSTERS / "ray-cluster-gpu.yaml").read_text())
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    gpu_types = [t for t in types.values() if t.get("resources", {}).get("GPU") == 8]
    assert gpu_types and all(t["min_workers"] >= 1 for t in gpu_types)
    assert f"rayproject/ray:{ray_pin()}-" in launcher["docker"]["image"] and "gpu" in launcher["docker"]["image"]
    assert any("pip install" in c and ".[gpu]" in c for c in launcher["setup_commands"])
    assert launcher["max_workers"] >= sum(t["min_workers"] for t in gpu_types)


def test_dockerfile_uses_the_pinned_ray():
    text = (CLUSTERS / "Dockerfile").read_text()
    assert f"FROM rayproject/ray:{ray_pin()}-" in text and '.[gpu]' in text


def test_runtime_env_has_env_vars_and_no_secrets():
    env = yaml.safe_load((CLUSTERS / "runtime_env.yaml").read_text())
    assert env["working_dir"] == "."
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray wants string values
    assert "HF_HOME" in env["env_vars"] and any(k.startswith("NCCL_") for k in env["env_vars"])
    assert int(env["env_vars"]["RAY_JOB_STOP_WAIT_TIME_S"]) >= 600  # Ray's default 3 s kills a checkpoint mid-write
    assert not secrets_in(env["env_vars"])
    assert not SECRET_VALUE.search((CLUSTERS / "runtime_env.yaml").read_text())


# ---------------------------------------------------------------- submit.sh

SUBMIT = CLUSTERS / "submit.sh"


def run_submit(*args: str, ray_address: str | None, tmp_path: Path) -> subprocess.CompletedProcess:
    # `ray job submit` needs a cluster with a job server; a `ray` on PATH that records its arguments
    # stands in for it, so this checks exactly what the script hands to Ray.
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir(exist_ok=True)
    (fake_bin / "ray").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$RAY_ARGS_OUT"\n')
    (fake_bin / "ray").chmod(0o755)
    env = {**os.environ, "PATH": f"{fake_bin}:{os.environ['PATH']}", "RAY_ARGS_OUT": str(tmp_path / "args")}
    env.pop("RAY_ADDRESS", None)
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return subprocess.run(["bash", str(SUBMIT), *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=30)


def test_submit_sh_is_valid_bash():
    assert subprocess.run(["bash", "-n", str(SUBMIT)], capture_output=True).returncode == 0


def test_submit_sh_hands_the_recipe_and_flags_to_ray_job_submit(tmp_path):
    recipe = "clusters/recipes/qwen2.5-32b-s1k-sft.yaml"
    proc = run_submit(recipe, "--trainer.lr", "5e-4", ray_address="http://127.0.0.1:8265", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "args").read_text().splitlines() == [
        "job", "submit", "--address", "http://127.0.0.1:8265", "--runtime-env", "clusters/runtime_env.yaml",
        "--working-dir", ".", "--", "rank1", "train", "--config", recipe, "--trainer.lr", "5e-4",
    ]


@pytest.mark.parametrize(
    "args, address, message",
    [
        ((), "http://127.0.0.1:8265", "usage"),
        (("clusters/recipes/missing.yaml",), "http://127.0.0.1:8265", "recipe clusters/recipes/missing.yaml: no such file"),
        (("clusters/recipes/qwen2.5-32b-s1k-sft.yaml",), None, "set RAY_ADDRESS"),
    ],
    ids=["no-recipe", "missing-recipe", "no-address"],
)
def test_submit_sh_bad_input(args, address, message, tmp_path):
    proc = run_submit(*args, ray_address=address, tmp_path=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
    assert not (tmp_path / "args").exists()  # ray was never called


def test_the_32b_study_recipe_layers_on_the_sft_recipe():
    from rank1.driver.study.arms import parse_arms

    study = CLUSTERS / "recipes" / "qwen2.5-32b-study.yaml"
    cfg = load_config(["--config", str(SFT_RECIPE), "--config", str(study)])
    assert [a.name for a in parse_arms(cfg.study)] == ["base", "rank1-sft"]
    assert cfg.study.eval_sets == ["aime24", "math500"] and cfg.eval.max_new_tokens == 32768 and cfg.eval.k == 1
    assert (cfg.study.reference_for("aime24"), cfg.study.reference_for("math500")) == (0.567, 0.93)  # s1-32B, published
    assert cfg.model.name_or_path == "Qwen/Qwen2.5-32B-Instruct" and cfg.data.format == "s1k" and cfg.adapter.r == 1


def test_recovery_against_a_published_full_fine_tune():
    from rank1.driver.study.recovery import recovery

    base, rank1 = [1, 0, 0, 0, 0, 0, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0, 0, 0, 0]  # 10 % -> 30 %
    r = recovery(base, rank1, 0.5)  # the reference gained 40 points: 20 / 40
    assert r.value == pytest.approx(0.5) and r.low < 0.5 < r.high
