"""Documents to run the model on: any data set rank1.core.data reads, or rows with a plain text field."""

from __future__ import annotations

from dataclasses import dataclass

from rank1.core.config import DataConfig
from rank1.core.data import IGNORE_INDEX, detect_format, read_rows, to_messages, tokenize_messages
from rank1.sae.errors import SAEError


@dataclass
class Document:
    ids: list[int]
    labels: list[int]  # -100 where no loss is taken (prompts of chat rows); all ids for plain text


def load_documents(cfg: DataConfig, tokenizer, text_field: str | None = None) -> list[Document]:
    """Tokenize every row; chat formats use the chat template, `text_field` (or a 'text' field) plain text."""
    rows, source = read_rows(cfg)
    docs = []
    for index, row in enumerate(rows):
        where = row.pop("__where__", f"{source} row {index + 1}")
        field = text_field or ("text" if "text" in row and cfg.format == "auto" else None)
        if field is not None:
            text = row.get(field)
            if not isinstance(text, str) or not text:
                raise SAEError(f"{where}: no text in field '{field}'")
            ids = tokenizer(text, add_special_tokens=True)["input_ids"]
            labels = list(ids)
        else:
            fmt = detect_format(row, where) if cfg.format == "auto" else cfg.format
            ids, labels = tokenize_messages(tokenizer, to_messages(row, fmt, cfg, where))
        ids, labels = ids[: cfg.max_length], labels[: cfg.max_length]
        if len(ids) < 2:
            continue
        docs.append(Document(ids, labels))
    if not docs:
        raise SAEError(f"{source}: no document with at least 2 tokens")
    return docs


def padded_batch(docs: list[Document], pad_id: int):
    import torch

    width = max(len(d.ids) for d in docs)
    ids = torch.full((len(docs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(docs), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(docs), width), dtype=torch.long)
    for row, d in enumerate(docs):
        ids[row, : len(d.ids)] = torch.tensor(d.ids)
        labels[row, : len(d.labels)] = torch.tensor(d.labels)
        mask[row, : len(d.ids)] = 1
    return ids, mask, labels
