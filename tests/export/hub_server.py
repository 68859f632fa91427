"""A local stand-in for the Hugging Face Hub at the network edge: the endpoints huggingface_hub 2.4's
create_repo, create_branch and create_commit call, answered as the Hub answers them, with every request
recorded so tests can check what was sent (files byte for byte, and where the token went).

    POST /api/repos/create                          -> 200 {url} | 409 exists | 401 | 403   (per `mode`)
    GET  /api/models/{owner}/{name}[/revision/{r}]  -> repo_info (after a 401/403 on create; after a no-op commit)
    POST /api/validate-yaml                         -> README front matter check
    POST /api/models/{owner}/{name}/branch/{b}      -> create_branch (a copy of main's tree)
    POST /api/models/{owner}/{name}/preupload/{r}   -> per file "lfs" (*.safetensors, ... or > 10 MiB) or "regular",
                                                       with the oid of the file already at that path, if any
    POST /{owner}/{name}.git/info/lfs/objects/batch -> git-lfs batch API: an upload + verify action per object not
                                                       yet stored, no actions for one already stored
    PUT  /lfs-storage/{oid}?X-Amz-Signature=...     -> the object ("S3": a presigned URL, no Authorization expected);
                                                       stored only if its sha256 and size match the oid
    POST /{owner}/{name}.git/info/lfs/objects/verify -> 200 if the object is stored with that size, else 404
    POST /api/models/{owner}/{name}/commit/{r}      -> ndjson commit: header + `file` (base64) / `lfsFile` (oid) lines;
                                                       an lfsFile whose object was not uploaded is refused (422)

No xet: huggingface_hub 2.4 picks xet on the client side alone (hf_xet installed and HF_HUB_DISABLE_XET unset;
the server advertises nothing it could turn off), and then asks /api/models/{repo}/xet-write-token/{rev}.
The tests set HF_HUB_DISABLE_XET=1 so the classic LFS path is taken; that route is deliberately missing here,
so a client that took the xet path anyway gets a 404 and fails loudly instead of testing something else.

Faults (`fail`, `drop`) hit one route a bounded number of times and are then spent, so every test ends.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

# What the Hub's default .gitattributes sends through LFS (a subset), and its size threshold for any file.
LFS_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf", "*.h5", "*.onnx", "*.msgpack", "*.zip")
LFS_SIZE = 10 * 1024 * 1024
ROUTES = ("create", "info", "validate", "branch", "preupload", "batch", "upload", "verify", "commit")


@dataclass
class Request:
    method: str
    path: str  # with the query string
    headers: dict[str, str]  # names lower-cased
    body: bytes  # for a dropped upload: the part read before the drop
    route: str = ""  # one of ROUTES, or "" for an unknown path
    status: int | None = None  # what was answered; None when the connection was dropped instead
    t: float = 0.0  # time.monotonic() when the request arrived


@dataclass
class Fault:
    route: str
    times: int  # requests it still hits; 0 = spent
    status: int | None = None  # answer this instead of handling the request...
    retry_after: int | None = None
    drop: str | None = None  # ... or drop the connection: "body" (halfway through the request body) | "answer"
    # ("answer": handle the request, e.g. record the commit, then close without answering: a lost response)


def git_blob_sha1(data: bytes) -> str:
    """The oid the Hub reports for a regular (non-LFS) file: git's blob hash."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeHub:
    mode: str = "ok"  # ok | exists | 401 | 403
    requests: list[Request] = field(default_factory=list)
    repos: set[str] = field(default_factory=set)
    branches: dict[str, set[str]] = field(default_factory=dict)
    commits: list[dict] = field(default_factory=list)  # {"repo", "revision", "summary", "oid", "files": {path: bytes}, "lfs": {path: oid}}
    objects: dict[str, bytes] = field(default_factory=dict)  # LFS storage, by sha256
    trees: dict[tuple[str, str], dict[str, bytes]] = field(default_factory=dict)  # (repo, branch) -> files at its head
    lfs_paths: dict[tuple[str, str], set[str]] = field(default_factory=dict)  # which of those are LFS files
    heads: dict[tuple[str, str], str] = field(default_factory=dict)  # (repo, branch) -> commit oid
    faults: list[Fault] = field(default_factory=list)

    def __post_init__(self):
        self.lock = threading.Lock()

    # ------------------------------------------------------------ fault injection (per test)

    def fail(self, route: str, status: int, times: int = 1, retry_after: int | None = None) -> None:
        """Answer `status` (429 with Retry-After when given, 500/502/503 ...) to the next `times` requests of `route`."""
        assert route in ROUTES, route
        self.faults.append(Fault(route, times, status=status, retry_after=retry_after))

    def drop(self, route: str, times: int = 1, when: str = "body") -> None:
        """Close the connection on the next `times` requests of `route`: halfway through reading the body
        ("body", e.g. mid LFS upload) or after handling it without answering ("answer", a lost response)."""
        assert route in ROUTES and when in ("body", "answer"), (route, when)
        self.faults.append(Fault(route, times, drop=when))

    def _take_fault(self, route: str) -> Fault | None:
        for f in self.faults:
            if f.route == route and f.times > 0:
                f.times -= 1
                return f
        return None

    def seen(self, route: str) -> list[Request]:
        return [r for r in self.requests if r.route == route]

    # ------------------------------------------------------------ server

    def start(self) -> "FakeHub":
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _answer(self, status: int, payload: dict, headers: dict[str, str]) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _read_body(self) -> bytes:
                if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
                    out = bytearray()
                    while size := int(self.rfile.readline().split(b";")[0], 16):
                        out += self.rfile.read(size)
                        self.rfile.readline()
                    self.rfile.readline()
                    return bytes(out)
                length = int(self.headers.get("Content-Length") or 0)
                return self.rfile.read(length) if length else b""

            def _drop(self) -> None:
                # SO_LINGER 0: close() sends a RST, as a proxy or a dying server does; the client sees a reset
                # (or "server disconnected") while it is still sending or waiting, never a half response.
                self.close_connection = True
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.rfile.close()  # the makefile holds a reference: without this, close() would not close
                self.connection.close()
                self.wfile = io.BytesIO()  # handle_one_request flushes wfile after us

            def _handle(self) -> None:
                path = urlsplit(self.path).path
                route = hub.route_of(self.command, path)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with hub.lock:
                    fault = hub._take_fault(route)
                record = Request(self.command, self.path, headers, b"", route, None, time.monotonic())
                hub.requests.append(record)
                if fault and fault.drop == "body":
                    length = int(self.headers.get("Content-Length") or 0)  # read half of it, then hang up
                    record.body = self.rfile.read(length // 2) if length else self.rfile.read1(65536)
                    return self._drop()
                record.body = self._read_body()
                if fault and fault.status:
                    extra = {"Retry-After": str(fault.retry_after)} if fault.retry_after is not None else {}
                    record.status = fault.status
                    return self._answer(fault.status, {"error": f"fake hub: injected {fault.status}"}, extra)
                with hub.lock:
                    status, payload, extra = hub.handle(self.command, path, record.body)
                if fault and fault.drop == "answer":
                    return self._drop()
                record.status = status
                self._answer(status, payload, extra)

            do_GET = do_POST = do_PUT = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    # ------------------------------------------------------------ routes

    @staticmethod
    def route_of(method: str, path: str) -> str:
        parts = path.split("/")
        if path == "/api/repos/create":
            return "create"
        if path == "/api/validate-yaml":
            return "validate"
        if path.startswith("/lfs-storage/"):
            return "upload"
        if path.endswith(".git/info/lfs/objects/batch"):
            return "batch"
        if path.endswith(".git/info/lfs/objects/verify"):
            return "verify"
        if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
            if len(parts) == 5 or parts[5] == "revision":
                return "info"
            return parts[5] if parts[5] in ROUTES else ""
        return ""

    def _tree(self, repo: str, branch: str) -> dict[str, bytes]:
        return self.trees.setdefault((repo, branch), {})

    def _lfs(self, repo: str, branch: str) -> set[str]:
        return self.lfs_paths.setdefault((repo, branch), set())

    def handle(self, method: str, path: str, body: bytes) -> tuple[int, dict, dict[str, str]]:
        status, payload = self._route(method, path, body)
        headers = {"Content-Type": "application/vnd.git-lfs+json"} if self.route_of(method, path) in ("batch", "verify") else {}
        return status, payload, headers

    def _route(self, method: str, path: str, body: bytes) -> tuple[int, dict]:
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
        if path.startswith("/lfs-storage/"):
            return self._store_object(path.rsplit("/", 1)[1], body)
        if path.endswith((".git/info/lfs/objects/batch", ".git/info/lfs/objects/verify")):
            repo = path[1:].split(".git/")[0]
            if repo not in self.repos:
                return 404, {"message": "Repository not found"}
            return self._lfs_batch(repo, json.loads(body)) if path.endswith("batch") else self._lfs_verify(json.loads(body))
        parts = path.split("/")  # ['', 'api', 'models', owner, name, action, rev...]
        if len(parts) >= 5 and parts[1:3] == ["api", "models"]:
            repo = f"{parts[3]}/{parts[4]}"
            if repo not in self.repos:
                return 404, {"error": "Repository not found"}
            if len(parts) == 5 or parts[5] == "revision":
                branch = unquote("/".join(parts[6:])) or "main"
                return 200, {"id": repo, "sha": self.heads.get((repo, branch), "0" * 40), "private": False}
            if self.mode == "403":
                return 403, {"error": "Forbidden"}
            action, revision = parts[5], unquote("/".join(parts[6:]))
            if action == "branch":
                if revision in self.branches[repo]:
                    return 409, {"error": "Reference already exists"}
                self.branches[repo].add(revision)
                self.trees[(repo, revision)] = dict(self._tree(repo, "main"))
                self.lfs_paths[(repo, revision)] = set(self._lfs(repo, "main"))
                if (repo, "main") in self.heads:
                    self.heads[(repo, revision)] = self.heads[(repo, "main")]
                return 200, {}
            if revision not in self.branches[repo]:
                return 404, {"error": f"Invalid rev id: {revision}"}
            if action == "preupload":
                return 200, {"files": [self._preupload(repo, revision, f) for f in json.loads(body)["files"]]}
            if action == "commit":
                return self._commit(repo, revision, body)
        return 404, {"error": f"fake hub: no route for {method} {path}"}

    def _preupload(self, repo: str, revision: str, f: dict) -> dict:
        lfs = f["size"] > LFS_SIZE or any(fnmatch.fnmatch(f["path"].rsplit("/", 1)[-1], p) for p in LFS_PATTERNS)
        answer = {"path": f["path"], "uploadMode": "lfs" if lfs else "regular", "shouldIgnore": False}
        current = self._tree(repo, revision).get(f["path"])
        if current is not None:  # what the client compares with its local oid to drop unchanged files
            lfs_now = f["path"] in self._lfs(repo, revision)
            answer["oid"] = hashlib.sha256(current).hexdigest() if lfs_now else git_blob_sha1(current)
        return answer

    def _lfs_batch(self, repo: str, spec: dict) -> tuple[int, dict]:
        if spec.get("operation") != "upload" or "basic" not in spec.get("transfers", ["basic"]):
            return 422, {"message": f"fake hub: unsupported batch request {spec.get('operation')} {spec.get('transfers')}"}
        objects = []
        for obj in spec["objects"]:
            oid, size = obj["oid"], obj["size"]
            entry = {"oid": oid, "size": size, "authenticated": True}
            if oid not in self.objects:  # content-addressed: an object already stored needs no upload
                entry["actions"] = {
                    "upload": {"href": f"{self.endpoint}/lfs-storage/{oid}?X-Amz-Signature=fake", "expires_at": "2099-01-01T00:00:00Z"},
                    "verify": {"href": f"{self.endpoint}/{repo}.git/info/lfs/objects/verify"},
                }
            objects.append(entry)
        return 200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}

    def _store_object(self, oid: str, body: bytes) -> tuple[int, dict]:
        # Like S3 with a Content-SHA256 condition: a body that is not the announced object is refused.
        if hashlib.sha256(body).hexdigest() != oid:
            return 400, {"error": f"BadDigest: the body's sha256 is not {oid} ({len(body)} bytes received)"}
        self.objects[oid] = body
        return 200, {}

    def _lfs_verify(self, spec: dict) -> tuple[int, dict]:
        stored = self.objects.get(spec["oid"])
        if stored is None or len(stored) != spec["size"]:
            return 404, {"message": f"Object {spec['oid']} not found or of another size"}
        return 200, {}

    def _commit(self, repo: str, revision: str, body: bytes) -> tuple[int, dict]:
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"}
        lfs = {}
        for line in (x["value"] for x in lines if x["key"] == "lfsFile"):
            stored = self.objects.get(line["oid"])
            if stored is None or len(stored) != line.get("size", len(stored)):
                return 422, {"error": f"Your push was rejected because an LFS pointer ({line['path']}) points to a file that does not exist"}
            files[line["path"]] = stored
            lfs[line["path"]] = line["oid"]
        tree, lfs_now = self._tree(repo, revision), self._lfs(repo, revision)
        tree.update(files)
        lfs_now.difference_update(files)
        lfs_now.update(lfs)
        oid = f"{len(self.commits) + 1:040x}"
        self.heads[(repo, revision)] = oid
        self.commits.append({"repo": repo, "revision": revision, "summary": header["summary"], "oid": oid, "files": files, "lfs": lfs})
        return 200, {"commitUrl": f"{self.endpoint}/{repo}/commit/{oid}", "commitOid": oid, "success": True}
