"""The Ray runtime: learners spread over a simulated 2-node cluster, `ray job submit`, a learner killed
mid-run, and clear errors for an unreachable cluster or one too small."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rank1_testing import REPO, run_rank1, tagged_env, tagged_pids

SMALL = ["--data.arithmetic_rows", "16", "--data.max_length", "96", "--trainer.global_batch_size", "4",
         "--trainer.micro_batch_size", "2", "--trainer.zero_stage", "0", "--logging.progress", "false", "--eval.in_training", "false"]
RAY_BIN = str(Path(sys.executable).with_name("ray"))


def adapter(run: Path) -> dict:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def assert_same_adapter(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_node_reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    result = run_rank1("train", *SMALL, "--max-steps", "2", "--trainer.checkpoint_every", "0", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return adapter(out)


@pytest.mark.slow
def test_learners_spread_over_two_nodes(tmp_path, one_node_reference):
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": 150 << 20})
    cluster.add_node(num_cpus=1, object_store_memory=150 << 20)
    try:
        cluster.wait_for_nodes()
        out = tmp_path / "run"
        result = run_rank1("train", *SMALL, "--max-steps", "2", "--trainer.checkpoint_every", "0", "--trainer.num_learners", "2",
                           "--cluster.placement", "SPREAD", "--cluster.address", cluster.address, "--output-dir", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
        placed = [line for line in result.stderr.splitlines() if "learners placed" in line]
        assert placed, result.stderr[-2000:]
        nodes = [part.split("on node ")[1] for part in placed[0].split(", ")]
        assert len(nodes) == 2 and nodes[0] != nodes[1], placed[0]
        assert_same_adapter(adapter(out), one_node_reference)
    finally:
        cluster.shutdown()


@pytest.mark.slow
def test_killed_learner_restarts_the_group_from_the_checkpoint(tmp_path, one_node_reference):
    args = [*SMALL, "--max-steps", "6", "--trainer.checkpoint_every", "2", "--trainer.num_learners", "2",
            "--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "200"]
    straight = tmp_path / "straight"
    assert run_rank1("train", *args, "--output-dir", str(straight)).returncode == 0
    out = tmp_path / "killed"
    env = tagged_env(f"killed-learner-{os.getpid()}")
    proc = subprocess.Popen([sys.executable, "-m", "rank1.cli", "train", *args, "--output-dir", str(out)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not (out / "checkpoints" / "step-000002").exists():
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.1)
    pids = tagged_pids(env["RANK1_TEST_TAG"], "ray::Learner")  # this run's actors, not another test's
    assert pids, "no learner actor processes found"
    os.kill(pids[-1], signal.SIGKILL)
    _, stderr = proc.communicate(timeout=900)
    assert proc.returncode == 0, stderr[-3000:]
    restored = re.search(r"restarting the learner group from step (\d+)", stderr)
    assert restored and int(restored.group(1)) in (2, 4), stderr[-3000:]  # the newest checkpoint at the kill
    assert f"resumed from {out / 'checkpoints'}/step-{int(restored.group(1)):06d} at step {restored.group(1)}" in stderr
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))  # the replayed steps replaced their rows: no gap, no duplicate
    assert_same_adapter(adapter(out), adapter(straight))


@pytest.mark.slow
def test_ray_job_submit_runs_rank1_train(tmp_path):
    gcs, dashboard = free_port(), free_port()
    # Ray's token authentication, as on a real cluster: head and client share a secret token.
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # A cluster node runs rank1's environment: `python` in the job's entrypoint is this venv's python,
    # whatever the shell that launched pytest has first on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths live under it
    head = subprocess.Popen([RAY_BIN, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs}", "--num-cpus=2",
                             "--object-store-memory=200000000", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                             f"--dashboard-port={dashboard}", "--disable-usage-stats"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{dashboard}"
        deadline = time.time() + 180
        while True:
            try:
                urllib.request.urlopen(f"{url}/api/version", timeout=2)
                break
            except urllib.error.HTTPError:  # it answers (401 where Ray's token auth is on): the job server is up
                break
            except OSError:
                assert time.time() < deadline and head.poll() is None, "the Ray head did not start"
                time.sleep(1)
        out = tmp_path / "job-run"
        for _ in range(30):  # the job server answers before its job agent is up: "No available agent"
            submit = subprocess.run([RAY_BIN, "job", "submit", "--address", url, "--working-dir", str(REPO), "--",
                                     "python", "-m", "rank1.cli", "train", *SMALL, "--max-steps", "2", "--output-dir", str(out)],
                                    env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in submit.stdout + submit.stderr:
                break
            time.sleep(2)
        assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-2000:]
        plain = re.sub(r"\x1b\[[0-9;]*m", "", submit.stdout)
        assert re.search(r"Job 'raysubmit_\w+' succeeded", plain), plain[-2000:]
        assert sum(t.numel() for t in adapter(out).values()) == 305_280
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        head.wait(timeout=60)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_unreachable_cluster_and_too_small_cluster(tmp_path):
    result = run_rank1("train", *SMALL, "--max-steps", "1", "--trainer.num_learners", "2",
                       "--cluster.address", f"127.0.0.1:{free_port()}", "--output-dir", str(tmp_path / "a"), timeout=300)
    assert result.returncode == 2 and "cannot reach the Ray cluster" in result.stderr, result.stderr[-2000:]
    result = run_rank1("train", *SMALL, "--max-steps", "1", "--trainer.num_learners", "2", "--cluster.cpus_per_learner", "4",
                       "--cluster.local_num_cpus", "2", "--cluster.local_object_store_mb", "200",
                       "--output-dir", str(tmp_path / "b"), timeout=300)
    assert result.returncode == 2 and "cannot place 2 learner bundle(s) of 4 CPU each: they need 8 CPUs" in result.stderr \
        and "2 CPUs" in result.stderr, result.stderr[-2000:]
