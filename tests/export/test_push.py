"""Pushing to a local stand-in of the Hub (tests/export/hub_server.py) from the real CLI in a child process,
with the real huggingface_hub client: files arrive byte-identical, the token travels only in the
Authorization header, and every failure is one clear line with the local export kept."""

from __future__ import annotations

import json

import pytest

from tests.export.conftest import run_export
from tests.export.hub_server import FakeHub

TOKEN = "hf_rank1TestToken0123456789abcdefSECRET"


@pytest.fixture
def hub():
    server = FakeHub().start()
    yield server
    server.stop()


def hub_env(endpoint: str, tmp_path, token: str | None = TOKEN) -> dict:
    # HF_HOME empty so no saved login leaks in; the token, when any, comes from HF_TOKEN.
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "", "HF_TOKEN": token or ""}
    return env


def assert_token_only_in_auth_header(hub: FakeHub, proc, out_dir, tmp_path) -> None:
    assert hub.requests, "the client sent nothing"
    for r in hub.requests:
        assert r.headers.get("authorization") == f"Bearer {TOKEN}", (r.method, r.path)
        assert TOKEN not in r.path and TOKEN.encode() not in r.body
        assert not any(TOKEN in v for k, v in r.headers.items() if k != "authorization")
    assert TOKEN not in proc.stdout + proc.stderr
    for f in [*out_dir.rglob("*"), *(tmp_path / "hf-home").rglob("*")]:
        if f.is_file():
            assert TOKEN.encode() not in f.read_bytes(), f


def test_push_sends_the_export_byte_identical(hub, run_dir, tmp_path):
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--push-to-hub", "alice/rank1-smollm2", "--private",
                      env=hub_env(hub.endpoint, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert "pushed to alice/rank1-smollm2" in proc.stderr
    create = next(r for r in hub.requests if r.path == "/api/repos/create")
    assert json.loads(create.body)["visibility"] == "private"
    (commit,) = hub.commits  # one commit holds the whole folder
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert set(commit["files"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"} == set(local)
    assert all(commit["files"][k] == local[k] for k in local)
    assert commit["revision"] == "main"
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in local["README.md"].decode()
    assert 'PeftModel.from_pretrained(base, "alice/rank1-smollm2")' in local["README.md"].decode()
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


def test_checkpoint_pushed_as_a_revision_into_an_existing_repo(hub, run_dir, tmp_path):
    hub.repos.add("alice/rank1-smollm2")  # already exists: reused, not an error
    hub.branches["alice/rank1-smollm2"] = {"main"}
    out = tmp_path / "step2"
    proc = run_export(str(run_dir["dir"] / "checkpoints" / "step-000002"), "--out", str(out), "--push-to-hub",
                      "alice/rank1-smollm2", "--revision", "step-000002", env=hub_env(hub.endpoint, tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert any(r.path == "/api/repos/create" for r in hub.requests)  # asked, got 409, went on
    assert "step-000002" in hub.branches["alice/rank1-smollm2"]
    (commit,) = hub.commits
    assert commit["revision"] == "step-000002"
    assert commit["files"]["adapter_model.safetensors"] == (out / "adapter_model.safetensors").read_bytes()
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


@pytest.mark.parametrize("mode,expected", [("401", "rejected the token (401"), ("403", "may not write to alice/x (403")])
def test_auth_failures_keep_the_local_export(hub, run_dir, tmp_path, mode, expected):
    hub.mode = mode
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--push-to-hub", "alice/x", env=hub_env(hub.endpoint, tmp_path))
    assert proc.returncode == 2
    assert expected in proc.stderr and f"the local export in {out} is kept" in proc.stderr
    assert "Traceback" not in proc.stderr and (out / "adapter_model.safetensors").is_file()
    assert not hub.commits
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


def test_unreachable_hub_keeps_the_local_export(run_dir, tmp_path):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--push-to-hub", "alice/x",
                      env=hub_env(f"http://127.0.0.1:{port}", tmp_path), timeout=300)
    assert proc.returncode == 2
    assert f"cannot reach the Hub at http://127.0.0.1:{port}" in proc.stderr and "is kept" in proc.stderr
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    assert (out / "adapter_model.safetensors").is_file()


def test_no_token_fails_before_any_work(hub, run_dir, tmp_path):
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--merge", "--push-to-hub", "alice/x",
                      env=hub_env(hub.endpoint, tmp_path, token=None))
    assert proc.returncode == 2
    assert "no Hugging Face token found; set HF_TOKEN or run `hf auth login`" in proc.stderr
    assert not out.exists() and not hub.requests  # no merge, no folder, no request


PUSH_RUN = r"""
import sys
from rank1.core.flags import load_config
from rank1.export import check_push_ready, push_run

run_dir, *flags = sys.argv[1:]
cfg = load_config(["--output-dir", run_dir, *flags])
check_push_ready(cfg)
print("EXPORTED", push_run(run_dir, cfg))
"""


def run_push_run(run_dir, env, *flags):
    import os
    import subprocess
    import sys

    from tests.export.conftest import REPO

    return subprocess.run([sys.executable, "-c", PUSH_RUN, str(run_dir), *flags], cwd=REPO, env={**os.environ, **env},
                          capture_output=True, text=True, timeout=300)


def test_push_run_at_the_end_of_training(hub, run_dir, tmp_path):
    """What the driver calls when a run with --export.push_to_hub ends."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir["dir"], run)
    flags = ("--export.push_to_hub", "alice/run", "--export.revision", "final", "--export.dtype", "bf16")
    proc = run_push_run(run, hub_env(hub.endpoint, tmp_path), *flags)
    assert proc.returncode == 0, proc.stderr
    assert f"EXPORTED {run / 'export'}" in proc.stdout
    (commit,) = hub.commits
    assert commit["repo"] == "alice/run" and commit["revision"] == "final"
    assert commit["files"]["adapter_model.safetensors"] == (run / "export" / "adapter_model.safetensors").read_bytes()
    assert_token_only_in_auth_header(hub, proc, run, tmp_path)
    # Without a token check_push_ready fails first (the driver calls it before training).
    proc = run_push_run(run, hub_env(hub.endpoint, tmp_path, token=None), *flags)
    assert proc.returncode != 0 and "no Hugging Face token found" in proc.stderr and len(hub.commits) == 1
