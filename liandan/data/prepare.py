"""`liandan data prepare`: any table of examples (JSONL, JSON, CSV, Parquet; any field names) →
train/valid/test.jsonl in a training format, split at random with a seed and without leakage.

Fields are picked with a name (`--prompt Question`) or a template that joins several
(`--completion "<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}"`, the medical-o1-reasoning-SFT layout).
"""

from __future__ import annotations

import csv
import json
import random
import string
from pathlib import Path

from liandan.atomic import atomic_path, check_output
from liandan.data.check import normalise
from liandan.data.formats import MAX_LINE_BYTES, open_regular, parse_json, read_lines
from liandan.errors import LiandanError

# Field names guessed when no --prompt/--completion/--text is given (first match wins).
PROMPT_NAMES = ("prompt", "question", "Question", "instruction", "query", "input", "problem")
COMPLETION_NAMES = ("completion", "answer", "Answer", "response", "Response", "output", "solution")
TEXT_NAMES = ("text", "content", "document", "body")


def read_rows(path: Path):
    """Yield (row number, dict) from .jsonl, .json, .csv or .parquet."""
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        for n, raw, _ in read_lines(path):
            if raw is None:
                raise LiandanError(f"{path}:{n}: the line is longer than {MAX_LINE_BYTES:,} bytes")
            raw = raw.removeprefix(b"\xef\xbb\xbf") if n == 1 else raw
            if raw.strip():
                yield n, parse_json(raw, f"{path}:{n}")
    elif suffix == ".json":
        with open_regular(path) as f:
            data = parse_json(f.read().removeprefix(b"\xef\xbb\xbf"), str(path))
        if isinstance(data, dict):
            data = next((v for v in data.values() if isinstance(v, list)), None)
        if not isinstance(data, list):
            raise LiandanError(f"{path}: expected a JSON list of objects (or an object holding one)")
        yield from enumerate(data, start=1)
    elif suffix == ".csv":
        open_regular(path).close()
        with open(path, encoding="utf-8-sig", newline="") as f:
            reader = csv.DictReader(f)
            try:
                yield from enumerate(reader, start=2)  # line 1 is the header
            except UnicodeDecodeError:
                raise LiandanError(f"{path}: not valid UTF-8; save the file as UTF-8") from None
            except csv.Error as exc:
                raise LiandanError(f"{path}:{reader.line_num + 1}: invalid CSV: {exc}") from None
    elif suffix == ".parquet":
        open_regular(path).close()
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise LiandanError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
        for n, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield n, row
    else:
        raise LiandanError(f"{path}: unknown file type {suffix!r}; use .jsonl, .json, .csv or .parquet")


def make_getter(spec: str | None, guesses: tuple, first_row: dict, what: str, path: Path):
    """A function row -> str for a field name or a '{Field}' template; guessed from common names if None."""
    if spec is None:
        spec = next((name for name in guesses if name in first_row), None)
        if spec is None:
            raise LiandanError(f"{path}: cannot guess the {what} field among {', '.join(sorted(first_row))}; "
                               f"name it with --{what}")
    if "{" in spec:
        fields = [name for _, name, _, _ in string.Formatter().parse(spec) if name]

        def from_template(row, where):
            missing = [f for f in fields if f not in row]
            if missing:
                raise LiandanError(f"{where}: no field {missing[0]!r} (for --{what})")
            return spec.format(**{f: "" if row[f] is None else str(row[f]) for f in fields})

        return from_template

    def from_field(row, where):
        if spec not in row:
            raise LiandanError(f"{where}: no field {spec!r} (for --{what}); fields: {', '.join(sorted(row))}")
        return "" if row[spec] is None else str(row[spec])

    return from_field


def convert(path: Path, fmt: str, prompt=None, completion=None, text=None, system=None) -> list[dict]:
    rows = list(read_rows(path))
    if not rows:
        raise LiandanError(f"{path}: no rows")
    first = rows[0][1]
    if not isinstance(first, dict):
        raise LiandanError(f"{path}: rows must be objects")
    out = []
    if fmt == "text":
        get_text = make_getter(text, TEXT_NAMES, first, "text", path)
        for n, row in rows:
            value = get_text(row, f"{path}:{n}")
            if value.strip():
                out.append({"text": value})
        return out
    get_prompt = make_getter(prompt, PROMPT_NAMES, first, "prompt", path)
    get_completion = make_getter(completion, COMPLETION_NAMES, first, "completion", path)
    get_system = make_getter(system, (), first, "system", path) if system else None
    for n, row in rows:
        where = f"{path}:{n}"
        p, c = get_prompt(row, where), get_completion(row, where)
        if not p.strip() or not c.strip():
            continue  # nothing to learn from; `liandan data check` on the input reports such rows
        if fmt == "completions":
            out.append({"prompt": p, "completion": c})
        else:
            messages = [{"role": "system", "content": get_system(row, where)}] if get_system else []
            out.append({"messages": messages + [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
    return out


def split(records: list[dict], valid_ratio: float, test_ratio: float, seed: int) -> dict[str, list[dict]]:
    """Seeded random split after removing exact duplicates, so no example lands in two splits."""
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise LiandanError("--valid-ratio and --test-ratio must be in [0, 1) and sum to less than 1")
    seen, unique = set(), []
    for record in records:
        key = normalise(json.dumps(record, ensure_ascii=False, sort_keys=True))
        if key not in seen:
            seen.add(key)
            unique.append(record)
    random.Random(seed).shuffle(unique)
    n_test = int(round(len(unique) * test_ratio))
    n_valid = int(round(len(unique) * valid_ratio))
    return {"test": unique[:n_test], "valid": unique[n_test : n_test + n_valid], "train": unique[n_test + n_valid :]}


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")


SPLIT_NAMES = ("train", "valid", "test")


def prepare(inputs: list[Path], out: Path, fmt: str, valid_ratio: float, test_ratio: float, seed: int,
            log=print, overwrite: bool = False, **fields) -> dict[str, int]:
    reads = [("the input", Path(path)) for path in inputs]
    for name in SPLIT_NAMES:  # checked before any work: an existing split is replaced only with --overwrite
        check_output(out / f"{name}.jsonl", "--out", reads, overwrite)
    records = []
    for path in inputs:
        records += convert(Path(path), fmt, **fields)
    splits = split(records, valid_ratio, test_ratio, seed)
    dropped = len(records) - sum(len(v) for v in splits.values())
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        if rows:
            write_jsonl(out / f"{name}.jsonl", rows)
        elif (out / f"{name}.jsonl").exists():
            log(f"Note: {out / f'{name}.jsonl'} is from before and was left as it is (this split is empty now).")
    counts = {k: len(v) for k, v in splits.items()}
    log(f"Wrote {out}: " + ", ".join(f"{k}.jsonl {v}" for k, v in counts.items() if v)
        + (f" ({dropped} duplicate(s) removed)" if dropped else ""))
    return counts
