"""Pushing an export folder to the Hub: create the repo (or reuse it), create the branch, one commit.

The token comes from HF_TOKEN or the standard login (huggingface_hub.get_token) and is handed only to the
huggingface_hub client, which sends it in the Authorization header; it is never printed, stored or
written into the card (messages are scrubbed of it all the same). The whole folder goes in one
create_commit (not upload_folder, which with hf_xet installed may split a large folder into several
commits), so a repo never shows half an export.

Retries. huggingface_hub 2.4 already retries, by itself (utils/_http.py http_backoff: 5 retries, waits
1, 2, 4, 8, 8 s, or Retry-After + 1 s; on 408/429/500/502/503/504, timeouts, network and protocol
errors), the preupload call, the LFS batch call, the LFS object upload and its verify call. It does not
retry create_repo, create_branch, the README check, repo_info, nor the commit POST itself. Those are
retried here: the whole create_repo -> create_branch -> create_commit sequence is run again, up to
HUB_ATTEMPTS times, on 429, 5xx and transport errors (reset, dropped, refused, timed out) of those calls.
A failure in a step huggingface_hub has already retried is not retried again (that would multiply its
waits by ours). Running the sequence again is safe: create_repo and create_branch are exist_ok, LFS
objects are content-addressed (the batch answer skips what is stored), and a commit that landed although
its answer was lost is not made twice: preupload reports the oids already at the revision, create_commit
drops the unchanged files and, with nothing left, makes no commit and returns the existing one.

    RANK1_HUB_RETRY_BASE_S   first wait between attempts, doubled each time (default 2 s: 2, 4, 8)
    RANK1_HUB_RETRY_MAX_S    cap on one wait, a Retry-After included (default 60 s)
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from rank1.export.source import ExportError

REPO_ID_HELP = "expected OWNER/NAME, e.g. alice/smollm2-rank1-gsm8k"
HUB_ATTEMPTS = 4
RETRY_STATUSES = (408, 429, 500, 502, 503, 504)  # the ones huggingface_hub's own backoff retries
# The calls of the sequence huggingface_hub sends without its backoff (paths under the endpoint).
_UNRETRIED_BY_HF = re.compile(r"^/api/(repos/create|validate-yaml"
                              r"|(models|datasets|spaces)/[^/]+/[^/]+(/revision/.*|/(branch|commit)/.*)?)$")


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


def _seconds(name: str, default: float) -> float:
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:  # also refuses nan
        raise ExportError(f"{name}={value!r}: not a number of seconds >= 0")
    return seconds


@dataclass
class _Failure:
    reason: str  # for the final message: "the Hub answered 503: ..."
    retry: bool  # worth running the sequence again
    retry_after: float | None = None  # the server's Retry-After, in seconds
    retried_by_hf: bool = False  # huggingface_hub's own backoff already retried this call


def _push_once(api, folder: Path, repo_id: str, private: bool, revision: str | None, commit_message: str):
    from huggingface_hub import CommitOperationAdd

    # Fresh operations each attempt: huggingface_hub marks them with the upload mode and remote oid it was
    # told, and reusing them would skip the preupload that makes a repeated commit a no-op.
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    operations = [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files]
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    if revision and revision != "main":
        api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
    return api.create_commit(repo_id, operations, commit_message=commit_message, revision=revision, repo_type="model")


def _request_of(e: BaseException):
    """The httpx request an HTTP or transport error came from, or None."""
    response = getattr(e, "response", None)
    try:
        return response.request if response is not None else e.request  # httpx raises RuntimeError if unset
    except (AttributeError, RuntimeError):
        return None


def _classify(e: Exception, repo_id: str, endpoint: str) -> _Failure:
    try:
        import httpx2 as httpx  # the HTTP client of huggingface_hub 2.x
    except ImportError:  # huggingface_hub 1.x uses httpx
        import httpx
    from huggingface_hub.errors import HfHubHTTPError

    # huggingface_hub wraps an LFS upload failure in RuntimeError("Error while uploading 'X' to the Hub.")
    # from the HTTP error: the cause says what happened.
    chain, cause = [], e
    while cause is not None and len(chain) < 8:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    http = next((c for c in chain if isinstance(c, HfHubHTTPError)), None)
    transport = next((c for c in chain if isinstance(c, httpx.TransportError)), None)
    cause = http or transport
    request = _request_of(cause) if cause is not None else None
    url = str(request.url) if request is not None else None
    # Which call failed, by method and path only: the query of an LFS upload URL is a presigned signature.
    call = f"{request.method} {urlsplit(url).path}" if url else ""
    # Matched below the endpoint, so an HF_ENDPOINT with a path (a proxy) still matches.
    below = urlsplit(url[len(endpoint.rstrip("/")):]).path if url and url.startswith(endpoint.rstrip("/")) else None
    ours = url is None or (below is not None and bool(_UNRETRIED_BY_HF.match(below)))
    what = f" while uploading {m.group(1)}" if (m := re.match(r"Error while uploading '(.+)' to the Hub", str(e))) else ""
    if http is not None:
        status = http.response.status_code if http.response is not None else None
        if status == 401:
            return _Failure("the Hub rejected the token (401 Unauthorized); log in again with `hf auth login` or set a valid HF_TOKEN", False)
        if status == 403:
            return _Failure(f"the token may not write to {repo_id} (403 Forbidden); use a token with write access to that namespace", False)
        retry_after = None
        if http.response is not None and (value := http.response.headers.get("retry-after", "").strip()).isdigit():
            retry_after = float(value)  # seconds; the HTTP-date form is rare on the Hub and ignored
        said = (http.server_message or "").strip().splitlines()
        reason = f"the Hub answered {status}{what}" + (f" to {call}" if call else "") + (f": {said[0]}" if said else "")
        transient = status in RETRY_STATUSES
        return _Failure(reason, transient and ours, retry_after, transient and not ours)
    if transport is not None:
        if isinstance(transport, httpx.ConnectError):
            reason = f"cannot reach the Hub at {endpoint} ({type(transport).__name__})"
        else:
            reason = f"the connection to the Hub at {endpoint} was lost{what}" + (f" during {call}" if call else "") + f" ({type(transport).__name__})"
        return _Failure(reason, ours, None, not ours)
    first = (str(e).splitlines() or [""])[0]
    return _Failure(f"{type(e).__name__}{what}: {first}" if first else f"{type(e).__name__}{what}", False)


def push_folder(folder: Path, repo_id: str, *, token: str, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload rank1 export") -> str:
    """Upload every file of `folder` to `repo_id` at `revision` (created if needed); returns the commit URL.

    Raises ExportError, naming the repo and saying the local export is kept, once retries are spent."""
    from huggingface_hub import HfApi

    from rank1.export.cli import log

    base, cap = _seconds("RANK1_HUB_RETRY_BASE_S", 2.0), _seconds("RANK1_HUB_RETRY_MAX_S", 60.0)
    api = HfApi(token=token)
    where = f"{repo_id}" + (f"@{revision}" if revision else "")
    kept = f"the local export in {folder} is kept"

    def scrub(text: str) -> str:  # the token is never in these messages; make sure of it
        return text.replace(token, "<token>") if token else text

    for attempt in range(1, HUB_ATTEMPTS + 1):
        try:
            info = _push_once(api, folder, repo_id, private, revision, commit_message)
            return info.commit_url
        except Exception as e:  # every failure of the push ends in one ExportError: the export itself is done
            failure = _classify(e, repo_id, api.endpoint)
        if not failure.retry or attempt == HUB_ATTEMPTS:
            if failure.retry:
                tries = f", after {HUB_ATTEMPTS} attempts"
            elif failure.retried_by_hf:
                tries = ", after huggingface_hub's own retries of that call"
            else:
                tries = f", on attempt {attempt} of {HUB_ATTEMPTS}" if attempt > 1 else ""
            raise ExportError(scrub(f"push to {where} failed: {failure.reason}{tries}; {kept}")) from None
        wait = min(base * 2 ** (attempt - 1), cap)
        if failure.retry_after is not None:  # the server knows best when it will take us again
            wait = max(wait, min(failure.retry_after, cap))
        log(scrub(f"push to {where}: {failure.reason}; attempt {attempt} of {HUB_ATTEMPTS}, retrying in {wait:.2g}s"))
        time.sleep(wait)
    raise AssertionError("unreachable")
