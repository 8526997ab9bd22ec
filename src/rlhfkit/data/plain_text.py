"""Plain pretraining text (for the PTX loss): a ``.txt`` file, or records ``{"text": ...}``.

    docs = load_plain_text("data/books.txt")        # None when the source is chat-formatted
    features = tokenize_plain_text(tok, docs, 512)  # {"input_ids", "labels"}: every token trained

A ``.txt`` file holds documents separated by blank lines; a JSONL/JSON/Parquet/CSV/hub source is
plain text when its records have a "text" field and no "messages" or "prompt". Each document is
tokenized as is (with the tokenizer's BOS if it adds one) and ends with EOS; a document longer
than max_length becomes several windows that overlap by one token, so every token but the
document's first is predicted exactly once.
"""

from __future__ import annotations

from pathlib import Path

from rlhfkit.data.errors import DataError, Origin
from rlhfkit.data.messages import check_text
from rlhfkit.data.records import load_records

Document = tuple[str, Origin]


def load_plain_text(source) -> list[Document] | None:
    """The documents of a plain-text source, or None when its records are chat-formatted (SFT)."""
    if isinstance(source, (str, Path)) and str(source).lower().endswith(".txt"):
        return _read_txt(Path(source))
    records = load_records(source)
    first = records[0].data
    if "text" not in first or "messages" in first or "prompt" in first:
        return None
    docs = []
    for rec in records:
        if "messages" in rec.data or "prompt" in rec.data:
            raise DataError.at(rec.origin, "text", "mixes plain text and conversations: the first record "
                                                   "is plain {\"text\"}, this one is a conversation")
        docs.append((check_text(rec.data.get("text"), rec.origin, "text"), rec.origin))
    return docs


def _read_txt(path: Path) -> list[Document]:
    if path.is_dir():
        raise ValueError(f"{path}: a directory, not a data file")
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"not valid UTF-8 ({e.reason} at byte {e.start})", source=str(path)) from None
    docs, block, start = [], [], 1
    for lineno, line in enumerate([*lines, ""], start=1):
        if line.strip():
            if not block:
                start = lineno
            block.append(line)
        elif block:
            docs.append(("\n".join(block), Origin(str(path), start)))
            block = []
    if not docs:
        raise DataError("no text (empty file)", source=str(path))
    return docs


def tokenize_plain_text(tokenizer, docs: list[Document], max_length: int) -> list[dict]:
    """{"input_ids", "labels"} windows of at most max_length tokens, labels = input_ids."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    features = []
    for text, _ in docs:
        ids = list(tokenizer(text)["input_ids"])
        if tokenizer.eos_token_id is not None and (not ids or ids[-1] != tokenizer.eos_token_id):
            ids.append(tokenizer.eos_token_id)
        for start in range(0, max(len(ids) - 1, 1), max_length - 1):
            window = ids[start:start + max_length]
            if len(window) >= 2:
                features.append({"input_ids": window, "labels": list(window)})
    return features
