"""Helpers shared by the top-level tests (a module of its own: `conftest` names collide across folders)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def run_rank1(*args: str, cwd: Path | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    """Run the real `rank1` CLI in a child process."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    return subprocess.run(
        [sys.executable, "-m", "rank1.cli", *args], cwd=cwd or REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


class HeadlessChromium:
    """A headless Chromium driven over the DevTools protocol: open a page, collect console errors and uncaught
    exceptions, evaluate expressions in it. Used as a context manager; skips the test where Chromium is absent."""

    def __init__(self, profile: Path):
        import shutil
        import socket

        import pytest

        browser = shutil.which("chromium") or shutil.which("chromium-browser")
        if browser is None:
            pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                        "--disable-background-networking", "--disable-component-update", "--disable-sync", f"--user-data-dir={profile}",
                        f"--remote-debugging-port={self.port}", "--remote-debugging-address=127.0.0.1", "about:blank"]

    def __enter__(self) -> "HeadlessChromium":
        import json
        import time
        import urllib.request

        self.proc = subprocess.Popen(self.command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.ws_url = None
        for _ in range(100):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2).read())
                self.ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                time.sleep(0.2)
        assert self.ws_url, "chromium did not open its DevTools endpoint"
        return self

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=20)

    def open(self, page: Path, expressions: list[str] = ()) -> tuple[list[str], list]:
        """(console errors and exceptions, the value of each expression evaluated in order once the page loaded)."""
        import asyncio

        return asyncio.run(self._open(page.as_uri(), list(expressions)))

    async def _open(self, url: str, expressions: list[str]) -> tuple[list[str], list]:
        import asyncio
        import json

        import websockets

        errors: list[str] = []
        async with websockets.connect(self.ws_url, max_size=50 * 2**20) as ws:
            counter = 0

            async def call(method: str, params: dict | None = None) -> dict:
                nonlocal counter
                counter += 1
                my_id = counter
                await ws.send(json.dumps({"id": my_id, "method": method, "params": params or {}}))
                while True:
                    message = json.loads(await asyncio.wait_for(ws.recv(), timeout=30))
                    if message.get("method") == "Runtime.exceptionThrown":
                        details = message["params"]["exceptionDetails"]
                        errors.append(details.get("exception", {}).get("description") or details["text"])
                    elif message.get("method") == "Runtime.consoleAPICalled" and message["params"]["type"] in ("error", "assert"):
                        errors.append(json.dumps(message["params"]["args"])[:300])
                    elif message.get("method") == "Log.entryAdded" and message["params"]["entry"]["level"] == "error":
                        errors.append(message["params"]["entry"]["text"][:300])
                    elif message.get("id") == my_id:
                        return message.get("result", {})

            for method in ("Runtime.enable", "Log.enable", "Page.enable"):
                await call(method)
            await call("Page.navigate", {"url": url})
            for _ in range(50):
                state = await call("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True})
                if state["result"]["value"] == "complete":
                    break
                await asyncio.sleep(0.1)
            values = []
            for expression in expressions:
                values.append((await call("Runtime.evaluate", {"expression": expression, "returnByValue": True}))["result"].get("value"))
        return errors, values


PAGE_TEXT = "document.body.innerText"
IMAGES_LOADED = "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)"


def wait_for_step(run: Path, step: int, proc: subprocess.Popen, timeout: float = 600) -> None:
    """Until run/metrics.jsonl holds `step` rows; fails if the run ends first (with its stderr tail when piped) or at the deadline."""
    deadline = time.time() + timeout
    while True:
        lines = (run / "metrics.jsonl").read_text().splitlines() if (run / "metrics.jsonl").exists() else []
        if len(lines) >= step:
            return
        if proc.poll() is not None:
            tail = proc.stderr.read()[-3000:] if proc.stderr else ""
            raise AssertionError(f"the run ended before step {step}: {tail}")
        assert time.time() < deadline, f"no step {step} within {timeout:.0f} s"
        time.sleep(0.05)  # a busy wait would take one of the two cores from the run it waits for


def tagged_env(tag: str) -> dict:
    """The environment for a run whose processes a test must find later: every process it starts (Ray's
    raylet and actors included) inherits RANK1_TEST_TAG, so another test's processes on the same machine
    (pytest runs two workers) are never mistaken for this run's."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    return env | {"PYTHONUNBUFFERED": "1", "RANK1_TEST_TAG": tag}


def tagged_pids(tag: str, cmdline_contains: str = "") -> list[int]:
    """The live processes started with RANK1_TEST_TAG=tag (whose command line contains cmdline_contains)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = next(line for line in (entry / "status").read_text().splitlines() if line.startswith("State:"))
        except (OSError, StopIteration):  # ended while we looked, or not ours to read
            continue
        if f"RANK1_TEST_TAG={tag}".encode() in environ and cmdline_contains in cmdline and "zombie" not in state:
            found.append(int(entry.name))
    return sorted(found)
