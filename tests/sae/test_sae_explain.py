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
        elif "Are the marked tokens" in prompt:  # fuzzing: a scripted judge, yes / no alternately
            n = int(re.search(r"JSON list of (\d+) numbers", prompt).group(1))
            content = json.dumps([1 - i % 2 for i in range(n)])
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


def _asked(kind: str) -> list[str]:
    """The excerpt lines of every detection or fuzzing request the server received, in order."""
    marker = "Are the marked tokens" if kind == "fuzzing" else "would the feature be active"
    prompts = [r["messages"][-1]["content"] for r in ChatCompletions.requests if marker in r["messages"][-1]["content"]]
    return [re.findall(r"^\d+\. (.*)$", p, flags=re.M) for p in prompts]


def test_explain_end_to_end(server, analysis_file: Path, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RANK1_TEST_KEY", API_KEY)
    out = tmp_path / "explanations.json"
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(out), "--base-url", server, "--llm", "test-model",
                 "--api-key-env", "RANK1_TEST_KEY", "--max-features", "3", "--n-explain", "3", "--n-score", "4"]) == 0
    result = json.loads(out.read_text())
    explained = result["explanations"]
    assert [e["id"] for e in explained] == ["adapter:0:+", "adapter:1:+", "adapter:2:+", "neuron:0:+", "neuron:1:+", "neuron:2:+"]
    asked = 0
    for e in explained:
        assert e["self_rating"] == 4 and e["explanation"].startswith("fires on the token")
        # The detection judge says yes to everything: balanced accuracy is exactly chance.
        assert e["detection_accuracy"] is None or e["detection_accuracy"] == 0.5
        asked += 1 + bool(e["detection"]) + bool(e["fuzzing"])
    assert any(e["detection"] for e in explained) and any(e["fuzzing"] for e in explained)
    assert len(ChatCompletions.requests) == asked
    assert ChatCompletions.requests[0]["model"] == "test-model"
    shown = ChatCompletions.requests[0]["messages"][-1]["content"]
    assert "<<" in shown  # the activating tokens are marked for the explainer
    assert API_KEY not in out.read_text() and result["client"]["api_key_env"] == "RANK1_TEST_KEY"

    # The report shows explanations and scores, and never the key.
    report = tmp_path / "report"
    assert main(["report", "--analysis", str(analysis_file), "--explanations", str(out), "--out", str(report)]) == 0
    page = (report / "index.html").read_text()
    assert "fires on the token" in page and API_KEY not in page and "fuzzing accuracy" in page
    assert (report / "comparison.png").is_file()
    rows = json.loads((report / "comparison.json").read_text())
    assert {r["source"] for r in rows} == {"adapter", "neuron"} and all(r["explained"] == 3 for r in rows)


def _feature_values(store, fid: str):
    """A feature's values on every stored token, computed from the shards (sink positions read as 0)."""
    import torch

    source, index, sign = fid.split(":")
    field = "adapter" if source == "adapter" else "neurons"
    rows = torch.cat([s[field] for _, s in store.iter_shards((field,))])[:, int(index)]
    kept = torch.cat([s["positions"] for _, s in store.iter_shards(("positions",))]) >= store.skip_positions
    return (rows if sign == "+" else -rows).relu() * kept


def test_scorer_negatives_are_silent_and_documents_do_not_leak(server, analysis_file: Path, collected: Path, tmp_path, monkeypatch):
    import torch

    from rank1.sae.store import ActivationStore

    monkeypatch.setenv("RANK1_TEST_KEY", API_KEY)
    out = tmp_path / "explanations.json"
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(out), "--base-url", server, "--llm", "m",
                 "--api-key-env", "RANK1_TEST_KEY", "--n-explain", "3", "--n-score", "4"]) == 0
    explained = json.loads(out.read_text())["explanations"]
    data = json.loads(analysis_file.read_text())
    store = ActivationStore(collected)
    docs = torch.cat([s["doc_ids"] for _, s in store.iter_shards(("doc_ids",))])
    pool = {e["index"]: e for e in data["random_pool"]}
    negatives = 0
    for e in explained:
        scored = [t["doc"] for t in e["detection"] + e["fuzzing"]]
        assert not set(e["explain_docs"]) & set(scored), e["id"]  # no document on both sides
        assert len(set(e["explain_docs"])) == len(e["explain_docs"])  # one example per document
        values = _feature_values(store, e["id"])
        for trial in e["detection"]:
            if trial["label"] == 0:  # every token of the window (±4 in the same document) is silent
                c = trial["index"]
                window = torch.arange(max(0, c - 4), min(len(docs), c + 5))
                window = window[docs[window] == docs[c]]
                assert trial["index"] in pool and float(values[window].max()) == 0.0, (e["id"], c)
                negatives += 1
            else:
                assert float(values[trial["index"]]) > 0
    assert negatives >= 20  # the check above ran on real negatives


def test_fuzzing_score_against_a_scripted_judge(server, analysis_file: Path, tmp_path, monkeypatch):
    monkeypatch.setenv("RANK1_TEST_KEY", API_KEY)
    out = tmp_path / "explanations.json"
    assert main(["explain", "--analysis", str(analysis_file), "--out", str(out), "--base-url", server, "--llm", "m",
                 "--api-key-env", "RANK1_TEST_KEY", "--max-features", "4", "--n-explain", "2", "--n-score", "6"]) == 0
    explained = [e for e in json.loads(out.read_text())["explanations"] if e["fuzzing"]]
    data = json.loads(analysis_file.read_text())
    examples = {(f["id"], x["index"]): x for f in data["features"] for x in f["examples"]}
    asked = iter(_asked("fuzzing"))
    assert len(explained) >= 4
    for e in explained:
        lines = next(asked)
        assert len(lines) == len(e["fuzzing"])
        for line, trial in zip(lines, e["fuzzing"]):
            values = examples[(e["id"], trial["index"])]["values"]
            peak = max(values)
            active = [i for i, v in enumerate(values) if v > 0 and v >= 0.3 * peak]
            if trial["label"] == 1:
                assert trial["marked"] == active
            else:
                assert len(trial["marked"]) == len(active) and not set(trial["marked"]) & set(active)
            assert line.count("<<") == len(trial["marked"]) and not re.search(r">>\(\d+\.\d\d\)", line)  # no values shown
        # The judge answered 1, 0, 1, 0, ... in prompt order; the score is the balanced accuracy of that.
        answers = [1 - i % 2 for i in range(len(e["fuzzing"]))]
        labels = [t["label"] for t in e["fuzzing"]]
        assert [t["prediction"] for t in e["fuzzing"]] == answers
        recall = lambda y: sum(a == y for a, l in zip(answers, labels) if l == y) / labels.count(y)  # noqa: E731, E741
        assert e["fuzzing_accuracy"] == pytest.approx((recall(1) + recall(0)) / 2)
        assert labels.count(1) - labels.count(0) in (0, 1)  # half correctly marked, half at random


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
