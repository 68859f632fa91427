"""Pushing to a local stand-in of the Hub (tests/export/hub_server.py) from the real CLI in a child process,
with the real huggingface_hub client: files arrive byte-identical (the safetensors through LFS), the token
travels only in the Authorization header of Hub calls (never to LFS storage), transient failures (429,
5xx, dropped connections) are retried until one commit lands, and every failure that stays is one clear
line with the local export kept."""

from __future__ import annotations

import hashlib
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
    # HF_HUB_DISABLE_XET: take the classic LFS path the fake Hub speaks (see hub_server.py). rank1's own
    # retries wait 10 ms, 20 ms, ... instead of 2 s, 4 s, ... (a Retry-After is still honoured).
    env = {"HF_ENDPOINT": endpoint, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_DISABLE_XET": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_IMPLICIT_TOKEN": "", "HF_TOKEN": token or "",
           "RANK1_HUB_RETRY_BASE_S": "0.01"}
    return env


def assert_token_only_in_auth_header(hub: FakeHub, proc, out_dir, tmp_path) -> None:
    assert hub.requests, "the client sent nothing"
    for r in hub.requests:
        # LFS objects go to a presigned storage URL (S3 on the Hub): the token has no business there.
        expected = None if r.route == "upload" else f"Bearer {TOKEN}"
        assert r.headers.get("authorization") == expected, (r.method, r.path)
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
    # The safetensors went the way the Hub sends them: LFS batch, PUT of the object, verify, then an lfsFile
    # line in the commit naming it by sha256; the small text files went inline.
    oid = hashlib.sha256(local["adapter_model.safetensors"]).hexdigest()
    assert commit["lfs"] == {"adapter_model.safetensors": oid} and hub.objects[oid] == local["adapter_model.safetensors"]
    (batch,) = hub.seen("batch")
    assert [o["oid"] for o in json.loads(batch.body)["objects"]] == [oid]
    assert [(r.method, r.status) for r in hub.seen("upload")] == [("PUT", 200)]
    assert [r.status for r in hub.seen("verify")] == [200]
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
    assert ", after 4 attempts;" in proc.stderr  # a refused connection may be a Hub restarting: retried
    assert "Traceback" not in proc.stderr and TOKEN not in proc.stderr
    assert (out / "adapter_model.safetensors").is_file()


def test_no_token_fails_before_any_work(hub, run_dir, tmp_path):
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--merge", "--push-to-hub", "alice/x",
                      env=hub_env(hub.endpoint, tmp_path, token=None))
    assert proc.returncode == 2
    assert "no Hugging Face token found; set HF_TOKEN or run `hf auth login`" in proc.stderr
    assert not out.exists() and not hub.requests  # no merge, no folder, no request


# ---------------------------------------------------------------- the Hub as it really answers: 429, 5xx, drops


def push(hub, run_dir, tmp_path, *flags, repo="alice/x"):
    out = tmp_path / "export"
    proc = run_export(str(run_dir["dir"]), "--out", str(out), "--push-to-hub", repo, *flags, env=hub_env(hub.endpoint, tmp_path))
    return proc, out


def assert_one_commit_of(hub, out, revision="main") -> None:
    (commit,) = hub.commits
    local = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert commit["files"] == local and commit["revision"] == revision
    assert set(commit["lfs"]) == {"adapter_model.safetensors"}


def assert_failed_keeping_the_export(proc, out, *expected) -> None:
    assert proc.returncode == 2, proc.stderr
    # One error line (after it only huggingface_hub's progress bar may be closed, at exit).
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("rank1 export: error:")]
    assert line.startswith("rank1 export: error: push to alice/x failed: "), proc.stderr
    assert all(e in line for e in expected), line
    assert line.endswith(f"; the local export in {out} is kept")
    assert "Traceback" not in proc.stderr and (out / "adapter_model.safetensors").is_file()


def test_rate_limited_commit_waits_retry_after_then_lands_once(hub, run_dir, tmp_path):
    hub.fail("commit", 429, times=2, retry_after=1)
    proc, out = push(hub, run_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_one_commit_of(hub, out)
    commits = hub.seen("commit")
    assert [r.status for r in commits] == [429, 429, 200]
    assert all(b.t - a.t >= 0.95 for a, b in zip(commits, commits[1:]))  # Retry-After: 1 honoured (base wait is 10 ms)
    assert "answered 429" in proc.stderr and "attempt 2 of 4, retrying in 1s" in proc.stderr
    # The whole sequence ran again, but the stored LFS object was not sent again (the batch skipped it).
    assert len(hub.seen("create")) == 3 and len(hub.seen("batch")) == 3 and len(hub.seen("upload")) == 1
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


@pytest.mark.parametrize("route,status,times", [("create", 503, 3), ("branch", 502, 2), ("commit", 500, 1)])
def test_server_errors_of_unretried_calls_are_retried(hub, run_dir, tmp_path, route, status, times):
    """huggingface_hub sends create_repo, create_branch and the commit POST without retrying: rank1 does."""
    hub.fail(route, status, times=times)
    proc, out = push(hub, run_dir, tmp_path, "--revision", "r1")
    assert proc.returncode == 0, proc.stderr
    assert_one_commit_of(hub, out, revision="r1")
    assert [r.status for r in hub.seen(route)][:times] == [status] * times and len(hub.seen(route)) == times + 1
    assert proc.stderr.count(" of 4, retrying in ") == times
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


def test_commit_failing_every_time_gives_up_after_4_attempts(hub, run_dir, tmp_path):
    hub.fail("commit", 500, times=1000)
    proc, out = push(hub, run_dir, tmp_path)
    assert_failed_keeping_the_export(proc, out, "the Hub answered 500", ", after 4 attempts;")
    assert len(hub.seen("commit")) == 4 and not hub.commits
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


def test_connection_dropped_mid_lfs_upload_once(hub, run_dir, tmp_path):
    """huggingface_hub retries the object upload itself (rewinding the file); rank1 does not run the
    sequence again on top of it."""
    hub.drop("upload", times=1)
    proc, out = push(hub, run_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_one_commit_of(hub, out)
    first, second = hub.seen("upload")
    size = (out / "adapter_model.safetensors").stat().st_size
    assert first.status is None and 0 < len(first.body) < size  # the drop really was mid-body
    assert second.status == 200 and second.body == (out / "adapter_model.safetensors").read_bytes()
    assert len(hub.seen("create")) == 1 and " of 4, retrying in " not in proc.stderr
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


@pytest.mark.slow
def test_connection_dropped_on_every_lfs_upload(hub, run_dir, tmp_path):
    """Slow on purpose (~25 s): huggingface_hub's own backoff for the upload waits 1+2+4+8+8 s and has no knob."""
    hub.drop("upload", times=1000)
    proc, out = push(hub, run_dir, tmp_path)
    assert_failed_keeping_the_export(proc, out, "the connection to the Hub at", "was lost while uploading adapter_model.safetensors",
                                     ", after huggingface_hub's own retries of that call;")
    assert len(hub.seen("upload")) == 6 and not hub.commits  # 1 + huggingface_hub's 5 retries, not multiplied by ours
    assert not hub.objects and len(hub.seen("create")) == 1
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


def test_commit_landed_but_its_answer_was_lost(hub, run_dir, tmp_path):
    """The retry must not commit twice: preupload reports the files already there, create_commit drops
    them all and returns the commit that landed."""
    hub.drop("commit", times=1, when="answer")
    proc, out = push(hub, run_dir, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert_one_commit_of(hub, out)
    assert len(hub.seen("commit")) == 1 and "was lost" in proc.stderr
    assert proc.stderr.strip().endswith(f"/alice/x/commit/{hub.commits[0]['oid']}")
    assert_token_only_in_auth_header(hub, proc, out, tmp_path)


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
