"""Read JSONL training files and detect their format: text, completions, chat or tools.

Every problem is reported as `file:line: what is wrong`, so a user with a 50,000-line file can
jump straight to it. A file is one format; the format is detected from its first record's keys.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from liandan.errors import LiandanError

FORMATS = ("text", "completions", "chat", "tools")
ROLES = ("system", "user", "assistant", "tool")


@dataclass
class FieldNames:
    """Key names, configurable like mlx_lm's `prompt_feature` / `completion_feature` / ..."""

    text: str = "text"
    prompt: str = "prompt"
    completion: str = "completion"
    chat: str = "messages"
    tools: str = "tools"


@dataclass
class Example:
    """One record, normalised: `text` for the text format, `messages` for all the others."""

    line: int
    text: str | None = None
    messages: list[dict] | None = None
    tools: list[dict] | None = None


@dataclass
class DataFile:
    path: Path
    format: str
    examples: list[Example] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)


def detect_format(record: dict, names: FieldNames) -> str | None:
    if names.chat in record:
        return "tools" if names.tools in record else "chat"
    if names.prompt in record and names.completion in record:
        return "completions"
    if names.text in record:
        return "text"
    return None


def record_format(record: dict, names: FieldNames, where: str, started_as: str | None = None,
                  unit: tuple[str, str] = ("line", "file")) -> str:
    """The record's format; an error when it has no known keys or differs from the format the
    file (or dataset split) started with. `unit`: what a record and its container are called."""
    fmt = detect_format(record, names)
    if fmt is None:
        raise LiandanError(
            f"{where}: no known keys; expected '{names.text}', '{names.prompt}'+'{names.completion}', "
            f"or '{names.chat}' (found: {', '.join(sorted(record)) or 'none'})"
        )
    if started_as is not None and fmt != started_as:
        raise LiandanError(f"{where}: this {unit[0]} is in the {fmt} format but the {unit[1]} started as {started_as}")
    return fmt


def scan_jsonl(path: str | Path, names: FieldNames | None = None):
    """Stream a JSONL file: yield (format, Example) or (None, LiandanError) per non-empty line.

    Used by read_jsonl (which stops at the first error) and by `liandan data check` (which
    collects them all); memory stays bounded whatever the file size.
    """
    names = names or FieldNames()
    path = Path(path)
    if not path.is_file():
        raise LiandanError(f"{path}: file not found")
    file_format = None
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, start=1):
            where = f"{path}:{line_no}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield None, LiandanError(f"{where}: not valid UTF-8 (byte {exc.start + 1} of the line)")
                continue
            if line_no == 1:
                line = line.lstrip("\ufeff")  # a UTF-8 BOM, as Windows editors write it
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise LiandanError(f"{where}: expected a JSON object, got {type(record).__name__}")
                fmt = file_format = record_format(record, names, where, file_format)
                yield fmt, _normalise(record, fmt, names, where, line_no)
            except json.JSONDecodeError as exc:
                yield None, LiandanError(f"{where}: invalid JSON: {exc.msg} (column {exc.colno})")
            except LiandanError as exc:
                yield None, exc


def read_jsonl(path: str | Path, names: FieldNames | None = None) -> DataFile:
    """Parse and validate a whole JSONL file; raise LiandanError at the first bad line."""
    path = Path(path)
    data: DataFile | None = None
    for fmt, item in scan_jsonl(path, names):
        if fmt is None:
            raise item
        if data is None:
            data = DataFile(path, fmt)
        data.examples.append(item)
    if data is None or not data.examples:
        raise LiandanError(f"{path}: the file is empty")
    return data


def _normalise(record: dict, fmt: str, names: FieldNames, where: str, line_no: int) -> Example:
    if fmt == "text":
        text = record[names.text]
        _require_string(text, names.text, where)
        if not text.strip():
            raise LiandanError(f"{where}: '{names.text}' is empty")
        return Example(line_no, text=text)
    if fmt == "completions":
        prompt, completion = record[names.prompt], record[names.completion]
        _require_string(prompt, names.prompt, where)
        _require_string(completion, names.completion, where)
        if not completion.strip():
            raise LiandanError(f"{where}: '{names.completion}' is empty; there is nothing to learn from this line")
        return Example(line_no, messages=[{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}])
    messages = record[names.chat]
    if not isinstance(messages, list) or not messages:
        raise LiandanError(f"{where}: '{names.chat}' must be a non-empty list of messages")
    for i, message in enumerate(messages):
        _check_message(message, i, where, allow_tools=fmt == "tools")
    if not any(m["role"] == "assistant" for m in messages):
        raise LiandanError(f"{where}: the chat has no assistant turn; there is nothing to learn from this line")
    tools = None
    if fmt == "tools":
        tools = record[names.tools]
        if not isinstance(tools, list):
            raise LiandanError(f"{where}: '{names.tools}' must be a list of function definitions")
    return Example(line_no, messages=messages, tools=tools)


def _check_message(message, i: int, where: str, allow_tools: bool) -> None:
    if not isinstance(message, dict):
        raise LiandanError(f"{where}: message {i} is not an object")
    role = message.get("role")
    if role not in ROLES:
        raise LiandanError(f"{where}: message {i} has role {role!r}; expected one of {', '.join(ROLES)}")
    content = message.get("content")
    if role == "assistant" and allow_tools and content is None and message.get("tool_calls"):
        return
    if not isinstance(content, str):
        raise LiandanError(f"{where}: message {i} ({role}) needs a string 'content'")


def _require_string(value, key: str, where: str) -> None:
    if not isinstance(value, str):
        raise LiandanError(f"{where}: '{key}' must be a string, got {type(value).__name__}")


def load_splits(data: str | Path, names: FieldNames | None = None, splits=("train", "valid", "test")) -> dict:
    """Read the splits behind --data: a directory of {split}.jsonl files, a dataset saved with the
    `datasets` library (save_to_disk), or a Hugging Face dataset name (downloaded when online).
    Missing optional splits map to None."""
    names = names or FieldNames()
    data_dir = Path(data)
    if data_dir.is_dir() and any((data_dir / f).is_file() for f in ("dataset_dict.json", "dataset_info.json")):
        return _from_datasets(str(data_dir), names, splits, on_disk=True)
    if not data_dir.exists() and re.match(r"^[\w.-]+/[\w.-]+$", str(data)):
        return _from_datasets(str(data), names, splits, on_disk=False)
    if not data_dir.is_dir():
        raise LiandanError(f"--data {data_dir}: not a directory (expected one holding train.jsonl, valid.jsonl, test.jsonl)")
    out = {}
    for split in splits:
        path = data_dir / f"{split}.jsonl"
        out[split] = read_jsonl(path, names) if path.is_file() else None
    return out


_DATASET_SPLIT_NAMES = {"train": ("train",), "valid": ("validation", "valid", "dev"), "test": ("test",)}


def _from_datasets(source: str, names: FieldNames, splits, on_disk: bool) -> dict:
    try:
        import datasets
    except ImportError:
        raise LiandanError(f"--data {source}: reading datasets needs the `datasets` package: pip install datasets") from None
    try:
        loaded = datasets.load_from_disk(source) if on_disk else datasets.load_dataset(source)
    except Exception as exc:
        where = "" if on_disk else " (is this machine online? HF_ENDPOINT selects a mirror)"
        raise LiandanError(f"--data {source}: cannot load the dataset{where}: {str(exc).splitlines()[0]}") from None
    if isinstance(loaded, datasets.Dataset):
        loaded = {"train": loaded}
    out = {}
    for split in splits:
        found = next((n for n in _DATASET_SPLIT_NAMES[split] if n in loaded), None)
        out[split] = _datafile_from_records(loaded[found], Path(source) / found, names) if found else None
    return out


def _datafile_from_records(records, label: Path, names: FieldNames) -> DataFile:
    data = None
    for index, record in enumerate(records, start=1):
        where = f"{label}:{index}"
        fmt = record_format(record, names, where, data.format if data else None, ("row", "split"))
        data = data or DataFile(label, fmt)
        data.examples.append(_normalise(record, fmt, names, where, index))
    if data is None:
        raise LiandanError(f"{label}: the split is empty")
    return data
