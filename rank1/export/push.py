"""Pushing an export folder to the Hub: create the repo (or reuse it), create the branch, one commit.

The token comes from HF_TOKEN or the standard login (huggingface_hub.get_token) and is handed only to the
huggingface_hub client, which sends it in the Authorization header; it is never printed, stored or
written into the card. The whole folder goes in one create_commit (not upload_folder, which with hf_xet
installed may split a large folder into several commits), so a repo never shows half an export.
"""

from __future__ import annotations

from pathlib import Path

from rank1.export.source import ExportError

REPO_ID_HELP = "expected OWNER/NAME, e.g. alice/smollm2-rank1-gsm8k"


def check_repo_id(repo_id: str) -> None:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise ExportError(f"--push-to-hub {repo_id!r}: not a Hub repo id ({REPO_ID_HELP})")


def require_token() -> str:
    """The user's Hub token, or an ExportError saying how to provide one (checked before any work)."""
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise ExportError("--push-to-hub: no Hugging Face token found; set HF_TOKEN or run `hf auth login` (nothing was exported)")
    return token


def push_folder(folder: Path, repo_id: str, *, token: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload rank1 export") -> str:
    """Upload every file of `folder` to `repo_id` at `revision` (created if needed); returns the commit URL."""
    try:
        import httpx2 as httpx  # the HTTP client of huggingface_hub 2.x
    except ImportError:  # huggingface_hub 1.x uses httpx
        import httpx
    from huggingface_hub import CommitOperationAdd, HfApi
    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(token=token)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    kept = f"the local export in {folder} is kept"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model")
    except HfHubHTTPError as e:
        status = e.response.status_code if e.response is not None else None
        if status == 401:
            reason = "the Hub rejected the token (401 Unauthorized); log in again with `hf auth login` or set a valid HF_TOKEN"
        elif status == 403:
            reason = f"the token may not write to {repo_id} (403 Forbidden); use a token with write access to that namespace"
        else:
            reason = f"the Hub answered {status}: {str(e).splitlines()[0]}"
        raise ExportError(f"push to {where} failed: {reason}; {kept}") from None
    except (httpx.TransportError, OSError) as e:
        raise ExportError(f"push to {where} failed: cannot reach the Hub at {api.endpoint} ({type(e).__name__}); {kept}") from None
    return info.commit_url
