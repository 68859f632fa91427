"""Data: read rows, turn each into a conversation, tokenize it with a completion-only label mask.

Every supported format becomes a list of chat messages; assistant messages are what the model learns,
everything else (system, user, and the chat template's own tokens around them) gets label -100.

Formats (detected from the fields of the first row unless `data.format` names one):
    messages            {"messages": [{"role": ..., "content": ...}, ...]}
    prompt_completion   {"prompt": str | messages, "completion": str | messages}
    s1k                 {"question", "deepseek_thinking_trajectory", "deepseek_attempt"}  (s1K-1.1)
    gsm8k               {"question", "answer"}   answer ends with '#### n'
    math                {"problem", "solution"}
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from rank1.core.config import EMBEDDED_DATA, DataConfig

IGNORE_INDEX = -100
FORMAT_FIELDS = {
    "messages": ("messages",),
    "prompt_completion": ("prompt", "completion"),
    "s1k": ("question", "deepseek_thinking_trajectory", "deepseek_attempt"),
    "gsm8k": ("question", "answer"),
    "math": ("problem", "solution"),
}
DETECTION_ORDER = ("messages", "prompt_completion", "s1k", "gsm8k", "math")
_CALCULATOR = re.compile(r"<<[^<>]*>>")  # GSM8K's calculator annotations, e.g. <<48/2=24>>


class DataError(ValueError):
    """Bad input data; the message names the file and row."""


# ---------------------------------------------------------------- the embedded task


def arithmetic_rows(n: int, seed: int = 1234) -> list[dict]:
    """A small generated task with worked solutions in GSM8K's '#### n' format.

    Two-operation integer problems: learnable by a 135M model on a CPU in minutes, and gradeable
    exactly. The generator seed is fixed so the task is the same for every run.
    """
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        a, b, c = rng.randint(2, 50), rng.randint(2, 50), rng.randint(2, 9)
        kind = rng.randrange(3)
        if kind == 0:
            question, steps, result = f"What is {a} + {b} * {c}?", [f"{b} * {c} = {b * c}", f"{a} + {b * c} = {a + b * c}"], a + b * c
        elif kind == 1:
            question, steps, result = f"What is ({a} + {b}) * {c}?", [f"{a} + {b} = {a + b}", f"{a + b} * {c} = {(a + b) * c}"], (a + b) * c
        else:
            question, steps, result = f"What is {a} * {c} - {b}?", [f"{a} * {c} = {a * c}", f"{a * c} - {b} = {a * c - b}"], a * c - b
        rows.append({"question": question, "answer": "\n".join(steps) + f"\n#### {result}"})
    return rows


HELDOUT_DATA = "arithmetic-heldout"  # data.path of the held-out problems (SAE effect and ablation text)
HELDOUT_SEED = 4321  # the held-out arithmetic problems: another generator seed
HELDOUT_EXCLUDES = 10_000  # ... minus every question of the first 10,000 training rows (any data.arithmetic_rows up to that)


def heldout_arithmetic_rows(n: int, training_rows: int = 0) -> list[dict]:
    """`n` distinct arithmetic problems none of which is among the first max(training_rows, 10,000) training rows.

    The training set is a prefix of one generated sequence (seed 1234), so excluding its first rows
    excludes every training set of that size or smaller; the held-out sequence (seed 4321) is fixed too,
    so every run and `rank1 eval` see the same problems, and fewer of them are a prefix of more."""
    seen = {r["question"] for r in arithmetic_rows(max(training_rows, HELDOUT_EXCLUDES))}
    rows: list[dict] = []
    for r in arithmetic_rows(20 * n, seed=HELDOUT_SEED):  # ~30 % of draws are excluded or repeated
        if r["question"] not in seen:
            seen.add(r["question"])
            rows.append(r)
            if len(rows) == n:
                return rows
    raise DataError(f"eval.heldout_rows: cannot draw {n} distinct held-out arithmetic problems")


# ---------------------------------------------------------------- reading rows


def read_rows(cfg: DataConfig) -> tuple[list[dict], str]:
    """Return (rows, source name). Local files are parsed here so errors can name file and line."""
    if cfg.path == EMBEDDED_DATA:
        rows, source = arithmetic_rows(cfg.arithmetic_rows), "arithmetic (embedded)"
    elif cfg.path == HELDOUT_DATA:  # the held-out problems `rank1 eval --data arithmetic` scores, as documents
        rows, source = heldout_arithmetic_rows(1000, cfg.arithmetic_rows), "arithmetic (held out)"
    else:
        path = Path(cfg.path).expanduser()
        if path.suffix in (".jsonl", ".json", ".parquet") or path.exists():
            rows, source = _read_file(path), str(path)
        else:
            rows, source = _read_hub(cfg), cfg.path
    if cfg.max_rows is not None:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise DataError(f"{source}: the data set is empty")
    return rows, source


def _read_file(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            return pq.read_table(path).to_pylist()
        except Exception as e:  # pyarrow raises several types for a broken file
            raise DataError(f"{path}: cannot read as Parquet ({e})") from None
    if path.suffix == ".json" and path.read_bytes().lstrip().startswith(b"["):
        try:
            rows = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: not valid JSON ({e})") from None
        for i, row in enumerate(rows):
            if not isinstance(row, dict):
                raise DataError(f"{path} row {i + 1}: expected a JSON object, got {type(row).__name__}")
            row.setdefault("__where__", f"{path} row {i + 1}")
        return rows
    rows = []
    for lineno, row in read_jsonl(path, DataError):
        row.setdefault("__where__", f"{path}:{lineno}")
        rows.append(row)
    return rows


def read_jsonl(path: Path, error: type[Exception] = None) -> list[tuple[int, dict]]:
    """(line number, object) of every non-blank line; a line that is not UTF-8 JSON of an object raises
    `error` naming file and line (also used by `rank1 grade`)."""
    error = error or DataError
    try:
        data = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    rows = []
    for number, raw in enumerate(data.splitlines(), start=1):
        where = f"{path}:{number}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise error(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as e:
            raise error(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object, got {type(row).__name__}")
        rows.append((number, row))
    return rows


def _read_hub(cfg: DataConfig) -> list[dict]:
    import datasets

    try:
        ds = datasets.load_dataset(cfg.path, cfg.name, split=cfg.split)
    except Exception as e:  # datasets raises many types: offline, missing, bad config
        raise DataError(f"--data {cfg.path}: not a local file and not loadable from the Hub ({type(e).__name__}: {e})") from None
    return [dict(row) for row in ds]


# ---------------------------------------------------------------- rows -> conversations


def detect_format(row: dict, where: str) -> str:
    for fmt in DETECTION_ORDER:
        if all(k in row for k in FORMAT_FIELDS[fmt]):
            return fmt
    fields = sorted(k for k in row if k != "__where__")
    expected = "; ".join(f"{f}: {', '.join(FORMAT_FIELDS[f])}" for f in DETECTION_ORDER)
    raise DataError(f"{where}: cannot tell the data format from fields {fields} (expected one of — {expected})")


def to_messages(row: dict, fmt: str, cfg: DataConfig, where: str) -> list[dict]:
    """One row as chat messages; assistant messages are the completion."""
    missing = [k for k in FORMAT_FIELDS[fmt] if row.get(k) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field(s) {missing} for format '{fmt}'")
    system = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    if fmt == "messages":
        messages = row["messages"]
    elif fmt == "prompt_completion":
        messages = _as_messages(row["prompt"], "user", where) + _as_messages(row["completion"], "assistant", where)
    elif fmt == "s1k":
        reply = cfg.think_open + _text(row, "deepseek_thinking_trajectory", where) + cfg.think_close + _text(row, "deepseek_attempt", where)
        messages = [{"role": "user", "content": _text(row, "question", where)}, {"role": "assistant", "content": reply}]
    elif fmt == "gsm8k":
        answer = _CALCULATOR.sub("", _text(row, "answer", where))
        messages = [{"role": "user", "content": _text(row, "question", where)}, {"role": "assistant", "content": answer}]
    else:  # math
        messages = [{"role": "user", "content": _text(row, "problem", where)}, {"role": "assistant", "content": _text(row, "solution", where)}]
    _check_messages(messages, where)
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: no assistant message to learn from")
    return system + messages if messages[0]["role"] != "system" else messages


def _text(row: dict, key: str, where: str) -> str:
    value = row[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _as_messages(value, role: str, where: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


def _check_messages(messages, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}: message {i} must be an object with string 'role' and 'content'")
        if m["role"] not in ("system", "user", "assistant", "tool"):
            raise DataError(f"{where}: message {i} has unknown role '{m['role']}'")


# ---------------------------------------------------------------- tokenization with the label mask


def tokenize_messages(tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    """Token ids and labels; labels are -100 except on assistant turns.

    Each assistant turn's span is what the chat template adds between the conversation up to it
    (with the generation prompt, i.e. the assistant header) and the conversation including it. The
    end-of-turn token is kept in the span, so the model learns to stop; trailing whitespace the
    template puts after it is masked.
    """
    ids = _template(tokenizer, messages, add_generation_prompt=False)
    labels = [IGNORE_INDEX] * len(ids)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _template(tokenizer, messages[:i], add_generation_prompt=True)
        through = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if through[: len(before)] != before or ids[: len(through)] != through:
            raise DataError("the chat template does not render conversations as prefixes of each other; cannot mask the prompt")
        end = len(through)
        while end > len(before) and not tokenizer.decode(through[end - 1 : end]).strip():
            end -= 1
        labels[len(before) : end] = through[len(before) : end]
    return ids, labels


def _template(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    if not messages:
        return []
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt, return_dict=False)
    return list(out["input_ids"] if isinstance(out, dict) else out)


@dataclass
class SFTData:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels)
    source: str
    format: str
    truncated: int
    dropped: int

    def describe(self) -> str:
        tokens = sum(len(ids) for ids, _ in self.examples)
        return (
            f"{self.source}: {len(self.examples)} rows ({self.format}), {tokens:,} tokens; "
            f"over max_length: {self.truncated} truncated, {self.dropped} dropped"
        )


def load_sft_data(cfg: DataConfig, tokenizer) -> SFTData:
    rows, source = read_rows(cfg)
    fmt = cfg.format
    examples, truncated, dropped = [], 0, 0
    for index, row in enumerate(rows):
        where = row.pop("__where__", f"{source} row {index + 1}")
        row_fmt = detect_format(row, where) if fmt == "auto" else fmt
        fmt = row_fmt if cfg.format == "auto" and index == 0 else fmt
        ids, labels = tokenize_messages(tokenizer, to_messages(row, row_fmt, cfg, where))
        if len(ids) > cfg.max_length:
            if cfg.overlong == "drop" or all(x == IGNORE_INDEX for x in labels[: cfg.max_length]):
                dropped += 1  # truncation would leave nothing to learn from
                continue
            ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
            truncated += 1
        examples.append((ids, labels))
    if not examples:
        raise DataError(f"{source}: every row is longer than data.max_length={cfg.max_length}; nothing left to train on")
    return SFTData(examples, source, fmt, truncated, dropped)


# ---------------------------------------------------------------- prompts and golds (GRPO)


@dataclass
class PromptRow:
    prompt_ids: list[int]  # the conversation up to the assistant's turn, with the generation prompt
    gold: str  # the reference answer the reward functions grade against
    where: str  # file:line, for messages about this row


@dataclass
class PromptData:
    rows: list[PromptRow]
    source: str
    format: str
    dropped: int

    def describe(self) -> str:
        longest = max(len(r.prompt_ids) for r in self.rows)
        return f"{self.source}: {len(self.rows)} prompts ({self.format}), longest {longest} tokens; over the limit: {self.dropped} dropped"


def load_prompt_data(cfg: DataConfig, tokenizer, max_prompt_tokens: int, instruction: str | None = None) -> PromptData:
    """Every row as (prompt token ids, gold answer), for rollouts.

    The same formats as SFT: the prompt is the conversation before the last assistant message and the
    gold is that message (a GSM8K answer, a MATH solution, an s1K attempt: the graders extract the final
    answer), unless the row has a `gold` field. `instruction` is appended to the last user message.
    A prompt longer than `max_prompt_tokens` cannot be truncated meaningfully: it is dropped with
    data.overlong=drop, and is an error naming the row otherwise.
    """
    rows, source = read_rows(cfg)
    fmt = cfg.format
    out, dropped = [], 0
    for index, row in enumerate(rows):
        where = row.pop("__where__", f"{source} row {index + 1}")
        row_fmt = detect_format(row, where) if fmt == "auto" else fmt
        fmt = row_fmt if cfg.format == "auto" and index == 0 else fmt
        messages = to_messages(row, row_fmt, cfg, where)
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt, gold = [dict(m) for m in messages[:last]], messages[last]["content"]
        if "gold" in row:
            gold = row["gold"]
            if not isinstance(gold, (str, int, float)) or isinstance(gold, bool):
                raise DataError(f"{where}: field 'gold' must be a string or a number, got {type(gold).__name__}")
            gold = str(gold)
        users = [m for m in prompt if m["role"] == "user"]
        if not users:
            raise DataError(f"{where}: no user message before the assistant's answer; nothing to prompt with")
        if instruction:
            users[-1]["content"] = f"{users[-1]['content']} {instruction}"
        ids = _template(tokenizer, prompt, add_generation_prompt=True)
        if len(ids) > max_prompt_tokens:
            if cfg.overlong == "drop":
                dropped += 1
                continue
            raise DataError(
                f"{where}: the prompt has {len(ids)} tokens, over the limit of {max_prompt_tokens} "
                "(data.max_length, and rollout.max_model_len - grpo.max_completion_length for the engines); "
                "raise them or pass --data.overlong drop"
            )
        out.append(PromptRow(ids, gold, where))
    if not out:
        raise DataError(f"{source}: every prompt is longer than {max_prompt_tokens} tokens; nothing left to train on")
    return PromptData(out, source, fmt, dropped)


# ---------------------------------------------------------------- order and batches


def epoch_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch: a pure function of (seed, epoch), so a resumed run sees the same."""
    order = list(range(num_examples))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return order


def global_batch(num_examples: int, seed: int, step: int, batch_size: int) -> list[int]:
    """Indices of the rows of optimizer step `step` (0-based), walking epochs back to back."""
    start = step * batch_size
    indices = []
    while len(indices) < batch_size:
        epoch, offset = divmod(start + len(indices), num_examples)
        order = epoch_order(num_examples, seed, epoch)
        indices.extend(order[offset : offset + batch_size - len(indices)])
    return indices
