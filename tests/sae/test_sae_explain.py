"""`explain` end to end against a local server speaking the OpenAI chat-completions protocol."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from rank1.sae.cli import main

API_KEY = "sk-test-secret-do-not-leak"


class ChatCompletions(BaseHTTPRequestHandler):
    """POST /v1/chat/completions with the real request and response JSON shapes."""

    requests: list[dict] = []

    def do_POST(self):  # noqa: N802 (http.server's naming)
        if self.path != "/v1/chat/completions":
            self.send_error(404)
            return
        if self.headers.get("Authorization") != f"Bearer {API_KEY}":
            self._reply(401, {"error": {"message": "invalid api key", "type": "invalid_request_error"}})
            return
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert isinstance(body["model"], str) and isinstance(body["max_tokens"], int)
        assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user") for m in body["messages"])
        type(self).requests.append(body)
        prompt = body["messages"][-1]["content"]
        if "EXPLANATION:" in prompt:
            marked = re.findall(r"<<(.*?)>>\(\d", prompt)  # the examples' marked tokens, not the instructions'
            content = f"EXPLANATION: fires on the token '{marked[0] if marked else ''}'\nRATING: 4"
        else:  # detection: answer yes for every excerpt
            n = int(re.search(r"JSON list of (\d+) numbers", prompt).group(1))
            content = json.dumps([1] * n)
        self._reply(200, {
            "id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
        })

    def _reply(self, code: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    ChatCompletions.requests = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), ChatCompletions)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def analysis_file(collected: Path, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("explain") / "analysis.json"
    assert main(["analyze", "--activations", str(collected), "--out", str(out), "--top-k", "10", "--context", "4", "--random-examples", "80"]) == 0
    return out


def test_explain_end_to_end(server, analysis_file: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK1_TEST_KEY", API_KEY)
    out = tmp_path / "explanations.json"
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(out), "--base-url", server, "--llm", "test-model",
                 "--api-key-env", "RANK1_TEST_KEY", "--max-features", "3", "--n-explain", "3", "--n-score", "4"]) == 0
    result = json.loads(out.read_text())
    explained = result["explanations"]
    assert [e["id"] for e in explained] == ["adapter:0:+", "adapter:1:+", "adapter:2:+", "neuron:0:+", "neuron:1:+", "neuron:2:+"]
    data = json.loads(analysis_file.read_text())
    feats = {f["id"]: f for f in data["features"]}
    for e in explained:
        f = feats[e["id"]]
        positives = len(f["examples"][1::2][:4])
        negatives = min(positives, sum(v == 0 for v in f["random_values"]))
        assert e["self_rating"] == 4 and e["explanation"].startswith("fires on the token")
        # The server says yes to everything: accuracy is exactly the share of positives.
        assert e["detection_accuracy"] == pytest.approx(positives / (positives + negatives))
    assert len(ChatCompletions.requests) == 2 * len(explained)
    assert ChatCompletions.requests[0]["model"] == "test-model"
    shown = ChatCompletions.requests[0]["messages"][-1]["content"]
    assert "<<" in shown  # the activating tokens are marked for the explainer
    assert API_KEY not in out.read_text() and result["client"]["api_key_env"] == "RANK1_TEST_KEY"

    # The report shows explanations and scores, and never the key.
    report = tmp_path / "report"
    assert main(["report", "--analysis", str(analysis_file), "--explanations", str(out), "--out", str(report)]) == 0
    page = (report / "index.html").read_text()
    assert "fires on the token" in page and API_KEY not in page
    assert (report / "comparison.png").is_file()
    rows = json.loads((report / "comparison.json").read_text())
    assert {r["source"] for r in rows} == {"adapter", "neuron"} and all(r["explained"] == 3 for r in rows)


def test_explain_reports_endpoint_errors(server, analysis_file: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK1_TEST_KEY", "wrong")
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(tmp_path / "e.json"), "--base-url", server, "--llm", "m",
                 "--api-key-env", "RANK1_TEST_KEY", "--max-features", "1"]) == 2
    err = capsys.readouterr().err
    assert "HTTP 401" in err and "wrong" not in err.replace("wrong", "", 0)
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(tmp_path / "e.json"), "--base-url", "http://127.0.0.1:9/v1",
                 "--llm", "m", "--max-features", "1"]) == 2
    assert "cannot reach the chat endpoint" in capsys.readouterr().err
    assert main(["explain", "--analysis", str(tmp_path / "missing.json"), "--out", str(tmp_path / "e.json"), "--base-url", server, "--llm", "m"]) == 2
    assert "no such file" in capsys.readouterr().err


def test_explain_with_a_local_transformers_model(analysis_file: Path, tiny_model, tmp_path):
    # A random tiny model writes nonsense; the run must still finish and record what it could parse.
    out = tmp_path / "local.json"
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(out), "--local", "--llm", tiny_model,
                 "--max-features", "1", "--n-explain", "2", "--n-score", "2", "--max-tokens", "12"]) == 0
    result = json.loads(out.read_text())
    assert result["client"] == {"kind": "transformers", "model": tiny_model}
    assert len(result["explanations"]) == 2
    for e in result["explanations"]:
        assert isinstance(e["explanation"], str)
        assert e["detection_accuracy"] is None or 0 <= e["detection_accuracy"] <= 1
