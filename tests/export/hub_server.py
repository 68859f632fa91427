"""A local stand-in for the Hugging Face Hub at the network edge: the endpoints huggingface_hub 2.4's
create_repo, create_branch and create_commit call, answered as the Hub answers them, with every request
recorded so tests can check what was sent (files byte for byte, and where the token went).

    POST /api/repos/create                         -> 200 {url} | 409 exists | 401 | 403   (per `mode`)
    GET  /api/models/{owner}/{name}                -> repo_info, asked after a 401/403 on create
    POST /api/validate-yaml                        -> README front matter check
    POST /api/models/{owner}/{name}/branch/{b}     -> create_branch
    POST /api/models/{owner}/{name}/preupload/{r}  -> every file "regular" (base64 in the commit, no LFS/xet)
    POST /api/models/{owner}/{name}/commit/{r}     -> ndjson commit: header + one line per file
"""

from __future__ import annotations

import base64
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class FakeHub:
    mode: str = "ok"  # ok | exists | 401 | 403
    requests: list[Request] = field(default_factory=list)
    repos: set[str] = field(default_factory=set)
    branches: dict[str, set[str]] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"repo", "revision", "summary", "files": {path: bytes}}

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                hub.requests.append(Request(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                status, payload = hub.route(self.command, urlsplit(self.path).path, body)
                self._answer(status, payload)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
        if self.mode == "401":
            return 401, {"error": "Invalid credentials in Authorization header"}
        if path == "/api/repos/create":
            spec = json.loads(body)
            repo = f"{spec['organization']}/{spec['name']}"
            if self.mode == "403":
                return 403, {"error": f"You don't have the rights to create a model under the namespace \"{spec['organization']}\""}
            if repo in self.repos:
                return 409, {"error": "You already created this model repo", "url": f"{self.endpoint}/{repo}"}
            self.repos.add(repo)
            self.branches[repo] = {"main"}
            return 200, {"url": f"{self.endpoint}/{repo}", "name": repo}
        if path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        parts = path.split("/")  # ['', 'api', 'models', owner, name, action, rev...]
        if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
            repo = f"{parts[3]}/{parts[4]}"
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if len(parts) == 5:
                return 200, {"id": repo, "sha": "0" * 40, "private": False}
            if self.mode == "403":
                return 403, {"error": "Forbidden"}
            action, revision = parts[5], unquote("/".join(parts[6:]))
            if action == "branch":
                if revision in self.branches[repo]:
                    return 409, {"error": "Reference already exists"}
                self.branches[repo].add(revision)
                return 200, {}
            if revision not in self.branches[repo]:
                return 404, {"error": f"Invalid rev id: {revision}"}
            if action == "preupload":
                files = json.loads(body)["files"]
                return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
            if action == "commit":
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                header = next(line["value"] for line in lines if line["key"] == "header")
                files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
                self.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "files": files})
                oid = f"{len(self.commits):040x}"
                return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
        return 404, {"error": f"fake hub: no route for {method} {path}"}
