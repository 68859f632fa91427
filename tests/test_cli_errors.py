"""Bad input through the real CLI: a clear one-line error, a non-zero exit, and no run directory."""

from __future__ import annotations

import json

import pytest

from rank1_testing import run_rank1


def write(path, text):
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda d: ["--trainer.learning_rate", "1"], "unknown config key 'trainer.learning_rate'"),
        (lambda d: ["--max-steps", "ten"], "flag --max-steps: trainer.max_steps: expected an integer, got 'ten'"),
        (lambda d: ["--config", write(d / "c.yaml", "trainer:\n  lr: fast\n")], "c.yaml: trainer.lr: expected a number"),
        (lambda d: ["--data", write(d / "m.jsonl", '{"question": "q", "answer": "a"}\n{oops\n')], "m.jsonl:2: not valid JSON"),
        (lambda d: ["--data", write(d / "f.jsonl", '{"question": "q", "answer": "a"}\n{"question": "q"}\n')], "f.jsonl:2"),
        (lambda d: ["--data", write(d / "e.jsonl", "")], "e.jsonl: the data set is empty"),
        (lambda d: ["--model", str(d / "no-such-model")], "--model " + "{d}/no-such-model: no such file or folder"),
        (lambda d: ["--adapter.target_modules", "q_proj,qkv_proj"], "has no linear layer named ['qkv_proj']"),
    ],
)
def test_bad_input_fails_cleanly(tmp_path, make_args, message):
    out = tmp_path / "run"
    result = run_rank1("train", *make_args(tmp_path), "--output-dir", str(out), "--max-steps", "1")
    assert result.returncode == 2, result.stderr[-2000:]
    assert message.format(d=tmp_path) in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists(), "a failed start must not leave a run directory"


@pytest.mark.slow
def test_generate_and_config_show(tmp_path, model_path):
    shown = run_rank1("config", "show", "--objective", "sft", "--trainer.lr", "3e-3", "--output-dir", "o")
    assert shown.returncode == 0 and "lr: 0.003" in shown.stdout and "objective: sft" in shown.stdout
    missing = run_rank1("generate", "--adapter", str(tmp_path), "Hi")
    assert missing.returncode == 2 and "no adapter_config.json" in missing.stderr


@pytest.mark.slow
def test_adapter_of_another_model_is_refused(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=49152))
    peft_model = get_peft_model(tiny, LoraConfig(r=1, target_modules=["q_proj"]))
    peft_model.save_pretrained(tmp_path / "tiny")
    config = json.loads((tmp_path / "tiny" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "smollm2-135m-instruct"
    (tmp_path / "tiny" / "adapter_config.json").write_text(json.dumps(config))
    result = run_rank1("generate", "--adapter", str(tmp_path / "tiny"), "Hi")
    assert result.returncode == 2 and "does not fit base model smollm2-135m-instruct" in result.stderr


@pytest.mark.slow
def test_push_without_token_fails_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # no stored login either
    out = tmp_path / "run"
    result = run_rank1("train", "--export.push_to_hub", "someone/rank1-test", "--max-steps", "1", "--output-dir", str(out))
    assert result.returncode == 2 and "token" in result.stderr.lower(), result.stderr[-2000:]
    assert not out.exists()
