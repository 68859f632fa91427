"""Masking: for every data format, only assistant tokens (and their end-of-turn token) carry labels."""

from __future__ import annotations

import json

import pytest

from rank1.core.config import DataConfig
from rank1.core.data import (
    IGNORE_INDEX,
    DataError,
    arithmetic_rows,
    global_batch,
    load_sft_data,
    to_messages,
    tokenize_messages,
)


def labelled_spans(ids, labels):
    """Contiguous runs of labelled positions, as token lists."""
    spans, current = [], []
    for tok, lab in zip(ids, labels):
        if lab == IGNORE_INDEX:
            if current:
                spans.append(current)
            current = []
        else:
            assert lab == tok, "a label must be the token at its own position"
            current.append(tok)
    return spans + ([current] if current else [])


def check_mask(tokenizer, messages, expected_replies):
    ids, labels = tokenize_messages(tokenizer, messages)
    spans = labelled_spans(ids, labels)
    assert [tokenizer.decode(s) for s in spans] == [r + "<|im_end|>" for r in expected_replies]
    # Token by token: every unlabelled token is outside an assistant reply.
    full = tokenizer.decode(ids)
    unlabelled = tokenizer.decode([t for t, l in zip(ids, labels) if l == IGNORE_INDEX])
    for reply in expected_replies:
        assert reply not in unlabelled
    assert "<|im_start|>assistant" in unlabelled and full.startswith("<|im_start|>system")


ROWS = {
    "messages": ({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                               {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, ["Hello!", "4"]),
    "prompt_completion": ({"prompt": "What is 3*3?", "completion": "9"}, ["9"]),
    "gsm8k": ({"question": "Tom has 2 apples and buys 3.", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"}, ["2 + 3 = 5\n#### 5"]),
    "math": ({"problem": "Compute $1+1$.", "solution": "It is $\\boxed{2}$."}, ["It is $\\boxed{2}$."]),
    "s1k": ({"question": "Q?", "deepseek_thinking_trajectory": "think hard", "deepseek_attempt": "Answer: 7"},
            ["<|im_start|>think\nthink hard\n<|im_start|>answer\nAnswer: 7"]),
}


@pytest.mark.parametrize("fmt", list(ROWS))
def test_only_completion_tokens_are_labelled(tokenizer, tmp_path, fmt):
    row, replies = ROWS[fmt]
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text(json.dumps(row) + "\n")
    data = load_sft_data(DataConfig(path=str(path)), tokenizer)
    assert data.format == fmt
    ids, labels = data.examples[0]
    spans = labelled_spans(ids, labels)
    assert [tokenizer.decode(s) for s in spans] == [r + "<|im_end|>" for r in replies]
    check_mask(tokenizer, to_messages(row, fmt, DataConfig(), "row"), replies)


def test_prompt_completion_as_messages_and_system_prompt(tokenizer):
    row = {"prompt": [{"role": "user", "content": "Say the first letter."}], "completion": [{"role": "assistant", "content": "A"}]}
    messages = to_messages(row, "prompt_completion", DataConfig(system_prompt="Be terse."), "row")
    assert messages[0] == {"role": "system", "content": "Be terse."}
    check_mask(tokenizer, messages, ["A"])


def test_parquet_and_json_files(tokenizer, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = arithmetic_rows(3)
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "d.parquet")
    (tmp_path / "d.json").write_text(json.dumps(rows))
    for name in ("d.parquet", "d.json"):
        data = load_sft_data(DataConfig(path=str(tmp_path / name)), tokenizer)
        assert len(data.examples) == 3 and data.format == "gsm8k"


def test_overlong_rows_truncated_or_dropped(tokenizer, tmp_path):
    path = tmp_path / "long.jsonl"
    rows = [{"prompt": "p", "completion": "word " * 200}, {"prompt": "p", "completion": "short"}, {"prompt": "x " * 300, "completion": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    truncated = load_sft_data(DataConfig(path=str(path), max_length=64), tokenizer)
    assert (truncated.truncated, truncated.dropped, len(truncated.examples)) == (1, 1, 2)  # row 3's completion is past 64
    assert all(len(ids) <= 64 for ids, _ in truncated.examples)
    dropped = load_sft_data(DataConfig(path=str(path), max_length=64, overlong="drop"), tokenizer)
    assert (dropped.truncated, dropped.dropped, len(dropped.examples)) == (0, 2, 1)
    assert "1 truncated, 1 dropped" in truncated.describe()


def test_embedded_task_is_deterministic_and_gradeable():
    rows = arithmetic_rows(50)
    assert rows == arithmetic_rows(50)
    for row in rows:
        steps = row["answer"].split("\n")
        assert steps[-1].startswith("#### ")
        assert int(steps[-1][5:]) == eval(row["question"][8:-1])  # our own generated text, not model output


def test_batches_walk_epochs_deterministically():
    first = [global_batch(10, 0, s, 4) for s in range(5)]
    assert first == [global_batch(10, 0, s, 4) for s in range(5)]
    flat = [i for b in first for i in b]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert first != [global_batch(10, 1, s, 4) for s in range(5)]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"question": "q", "answer": "a"}\n{"question": "q2", "answer"\n', r"bad.jsonl:2: not valid JSON"),
        ('{"question": "q"}\n', r"bad.jsonl:1: cannot tell the data format from fields \['question'\]"),
        ('[1, 2]\n', r"bad.jsonl:1: expected a JSON object"),
        ('{"question": "q", "answer": 5}\n', r"bad.jsonl:1: field 'answer' must be a string"),
        ('{"question": "q", "answer": ""}\n', r"bad.jsonl:1: missing field\(s\) \['answer'\]"),
        ('{"messages": [{"role": "user", "content": "hi"}]}\n', r"bad.jsonl:1: no assistant message"),
        ('{"messages": [{"role": "robot", "content": "hi"}]}\n', r"bad.jsonl:1: message 0 has unknown role"),
        ('\n\n', r"bad.jsonl: the data set is empty"),
    ],
)
def test_bad_rows_name_file_and_line(tokenizer, tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_sft_data(DataConfig(path=str(path)), tokenizer)


def test_missing_file_and_forced_format(tokenizer, tmp_path):
    with pytest.raises(DataError, match="no such data file"):
        load_sft_data(DataConfig(path=str(tmp_path / "none.jsonl")), tokenizer)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl:1: missing field\(s\) \['problem', 'solution'\] for format 'math'"):
        load_sft_data(DataConfig(path=str(path), format="math"), tokenizer)
