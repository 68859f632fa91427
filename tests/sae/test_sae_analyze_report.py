"""`analyze` finds the true top examples; `report` renders a dashboard that opens in headless Chromium."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest
import torch

from rank1.sae.cli import main
from rank1.sae.saelens_format import load_sae
from rank1.sae.store import ActivationStore


@pytest.fixture(scope="module")
def analysis(collected: Path, tmp_path_factory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("analysis")
    assert main(["train", "--activations", str(collected), "--out", str(root / "sae"), "--k", "3", "--expansion", "2",
                 "--batch-size", "128", "--lr", "3e-3", "--no-effect", "--train-tokens", "20000"]) == 0
    assert main(["analyze", "--activations", str(collected), "--sae", str(root / "sae"), "--out", str(root / "analysis.json"),
                 "--top-k", "12", "--context", "6", "--random-examples", "60", "--bins", "10"]) == 0
    return root / "analysis.json", root / "sae", collected


def _all(store: ActivationStore, field: str) -> torch.Tensor:
    return torch.cat([shard[field] for _, shard in store.iter_shards((field,))])


def test_analysis_matches_brute_force(analysis):
    path, sae_dir, collected = analysis
    data = json.loads(path.read_text())
    store = ActivationStore(collected)
    adapter, neurons, tokens = _all(store, "adapter"), _all(store, "neurons"), _all(store, "token_ids")
    docs, kept = _all(store, "doc_ids"), _all(store, "positions") >= 1  # position 0, the attention sink, reads as 0
    feats = {f["id"]: f for f in data["features"]}
    assert len([f for f in data["features"] if f["source"] == "adapter"]) == 28  # 14 adapters x 2 sides
    assert len([f for f in data["features"] if f["source"] == "neuron"]) == 24
    assert len([f for f in data["features"] if f["source"] == "latent"]) == 28
    latents = load_sae(sae_dir)[0].encode(adapter)
    busiest = int((latents > 0).sum(0).argmax())
    checks = [("adapter:3:+", adapter[:, 3]), ("adapter:3:-", -adapter[:, 3]), ("neuron:5:+", neurons[:, 5]), (f"latent:{busiest}", latents[:, busiest])]
    pool = torch.tensor([e["index"] for e in data["random_pool"]])
    for fid, column in checks:
        f = feats[fid]
        values = column.relu() * kept
        # One example per document: the best token of each of the 12 best documents.
        per_doc = torch.zeros(int(docs.max()) + 1).scatter_reduce(0, docs, values, "amax")
        top = per_doc.topk(12).values
        got = torch.tensor([e["activation"] for e in f["examples"]])
        torch.testing.assert_close(got, top[: len(got)], rtol=1e-4, atol=1e-5)
        assert len({e["doc"] for e in f["examples"]}) == len(f["examples"]) == int((top > 0).sum())
        assert all(values[e["index"]] == per_doc[e["doc"]] for e in f["examples"])
        assert f["density"] == pytest.approx(float((values > 0).sum() / kept.sum()))
        assert sum(f["histogram"]["counts"]) == int((values > 0).sum())
        first = f["examples"][0]
        assert first["tokens"][first["center"]] == int(tokens[first["index"]])
        assert first["values"][first["center"]] == pytest.approx(first["activation"], abs=1e-4)
        assert len(first["tokens"]) <= 13
        # The random windows' maxima: ±6 tokens of the same document.
        for i, center in enumerate(pool.tolist()):
            lo, hi = max(0, center - 6), min(len(values), center + 7)
            same = docs[lo:hi] == docs[center]
            assert f["random_window_max"][i] == pytest.approx(float(values[lo:hi][same].max()), abs=1e-4)
    assert len(data["random_pool"]) == 60 and all(len(f["random_window_max"]) == 60 for f in data["features"])
    assert kept[pool].all() and all(str(t) in data["vocab"] for t in data["random_pool"][0]["tokens"])
    assert any(0 < f["random_window_max"].count(0) < 60 for f in data["features"])  # some windows are negatives, not all


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _open_in_chromium(ws_url: str, page_url: str) -> tuple[list[str], str]:
    """Navigate with the DevTools protocol; return console errors/exceptions and the page's text."""
    import websockets

    errors: list[str] = []
    async with websockets.connect(ws_url, max_size=50 * 2**20) as ws:
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

        await call("Runtime.enable")
        await call("Log.enable")
        await call("Page.enable")
        await call("Page.navigate", {"url": page_url})
        for _ in range(50):
            state = await call("Runtime.evaluate", {"expression": "document.readyState", "returnByValue": True})
            if state["result"]["value"] == "complete":
                break
            await asyncio.sleep(0.1)
        text = await call("Runtime.evaluate", {"expression": "document.body.innerText", "returnByValue": True})
        # Use the page as a person would: filter to SAE latents.
        await call("Runtime.evaluate", {"expression": "var s=document.getElementById('source-filter'); s.value='latent'; s.dispatchEvent(new Event('change'))"})
        visible = await call("Runtime.evaluate", {"expression": "Array.from(document.querySelectorAll('.feature')).filter(c => c.style.display !== 'none').map(c => c.dataset.source).join(',')", "returnByValue": True})
        images = await call("Runtime.evaluate", {"expression": "Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)", "returnByValue": True})
    return errors, text["result"]["value"], visible["result"]["value"], images["result"]["value"]


def test_dashboard_opens_in_headless_chromium(analysis, tmp_path):
    path, _, _ = analysis
    out = tmp_path / "dashboard"
    assert main(["report", "--analysis", str(path), "--out", str(out)]) == 0
    assert (out / "index.html").is_file() and (out / "density.png").stat().st_size > 1000
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium chromium-driver)")
    port = _free_port()
    proc = subprocess.Popen(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", f"--user-data-dir={tmp_path / 'profile'}", f"--remote-debugging-port={port}",
         "--remote-debugging-address=127.0.0.1", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        ws_url = None
        for _ in range(100):
            try:
                targets = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2).read())
                ws_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration, ValueError):
                time.sleep(0.2)
        assert ws_url, "chromium did not open its DevTools endpoint"
        errors, text, visible, images_ok = asyncio.run(_open_in_chromium(ws_url, (out / "index.html").as_uri()))
        # The error check itself works: a page with a broken script is reported.
        broken = tmp_path / "broken.html"
        broken.write_text("<!DOCTYPE html><html><body><select id='source-filter'></select><script>no_such_function()</script></body></html>")
        broken_errors = asyncio.run(_open_in_chromium(ws_url, broken.as_uri()))[0]
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    assert errors == []
    assert any("no_such_function" in e for e in broken_errors), broken_errors
    data = json.loads(path.read_text())
    top = next(f for f in data["features"] if f["id"] == "adapter:0:+")["examples"][0]
    center_text = data["vocab"][str(top["tokens"][top["center"]])].strip()
    assert "adapter:0:+" in text and "LoRA directions" in text and "SAE latents" in text and "MLP neurons" in text
    assert f"{top['activation']:.3g}" in text and center_text in text
    assert set(visible.split(",")) == {"latent"}
    assert images_ok is True
