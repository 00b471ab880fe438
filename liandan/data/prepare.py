"""`liandan data prepare`: any table of examples (JSONL, JSON, CSV, Parquet; any field names) →
train/valid/test.jsonl in a training format, split at random with a seed and without leakage.

Fields are picked with a name (`--prompt Question`) or a template that joins several
(`--completion "<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}"`, the medical-o1-reasoning-SFT layout).
"""

from __future__ import annotations

import csv
import json
import os
import random
import string
from contextlib import ExitStack
from pathlib import Path

from liandan.atomic import atomic_path, check_output
from liandan.data.check import normalise
from liandan.data.formats import MAX_LINE_BYTES, SPLITS, TABLE_KINDS, open_regular, parse_json, read_lines
from liandan.errors import LiandanError

# Field names guessed when no --prompt/--completion/--text is given (first match wins).
PROMPT_NAMES = ("prompt", "question", "Question", "instruction", "query", "input", "problem")
COMPLETION_NAMES = ("completion", "answer", "Answer", "response", "Response", "output", "solution")
TEXT_NAMES = ("text", "content", "document", "body")


def read_rows(path: Path, log=None):
    """Yield (row number, dict) from one of TABLE_SUFFIXES; a row that is not an object is an error. `log`
    receives notes on rows that look wrong but parse (CSV rows a stray quote may have merged: _looks_merged)."""
    for n, row in _read_values(path, log):
        if not isinstance(row, dict):
            raise LiandanError(f"{path}:{n}: expected an object (field names and values), got {type(row).__name__}")
        if None in row:  # csv.DictReader files the values beyond the header's columns under None
            raise LiandanError(f"{path}:{n}: more values than the header has columns")
        yield n, row


def _read_values(path: Path, log=None):
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
        yield from _csv_rows(path, log)
    elif suffix == ".parquet":
        open_regular(path).close()
        yield from enumerate(_parquet_rows(path), start=1)
    else:
        raise LiandanError(f"{path}: unknown file type {suffix!r}; use {TABLE_KINDS}")


def _csv_rows(path: Path, log=None):
    """(line where the row starts, row). strict: a quote that never closes would otherwise swallow every row
    after it into one field, and the file would convert "successfully" with those rows gone."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        reader = csv.reader(f, strict=True)  # not DictReader: it skips blank lines, and the line numbers with them
        start, merged = 1, []
        try:
            header = next(reader, [])
            start = reader.line_num + 1
            for values in reader:
                if values:
                    if reader.line_num > start and _looks_merged(values, len(header)):
                        merged.append(f"{start}–{reader.line_num}")
                    yield start, _row_of(header, values)
                start = reader.line_num + 1
            if merged and log:
                shown = ", ".join(merged[:5]) + (" …" if len(merged) > 5 else "")
                log(f"Note: {path}: {len(merged)} row(s) span lines that all look like rows of {len(header)} values "
                    f"(lines {shown}); if a stray \" opened that text, rows were merged into one example: check "
                    "the quotes")
        except UnicodeDecodeError:
            raise LiandanError(f"{path}: not valid UTF-8; save the file as UTF-8") from None
        except csv.Error as exc:
            what = ("a quoted field starts here and never closes (a stray \" ?)" if "end of data" in str(exc)
                    else f"invalid CSV: {exc}")
            raise LiandanError(f"{path}:{start}: {what}") from None


def _looks_merged(values: list[str], columns: int) -> bool:
    """A stray quote closed by another one further down makes the rows between one quoted field, which csv
    reads without an error (strict mode catches only a quote that never closes). Then every later line of the
    field parses as a whole row of the header's width; real multi-line text rarely does in all its lines, and
    when it does the user gets a note, not a refusal."""
    inner = [line.rstrip("\r") for value in values for line in value.split("\n")[1:]]
    inner = [line for line in inner if line.strip()]
    return columns > 1 and bool(inner) and all(len(next(csv.reader([line]), [])) == columns for line in inner)


def _row_of(header: list[str], values: list[str]) -> dict:
    """As csv.DictReader makes it: missing values are None, values beyond the header's columns go under None."""
    row = dict(zip(header, values))
    row.update({name: None for name in header[len(values):]})
    if len(values) > len(header):
        row[None] = values[len(header):]
    return row


def _parquet_rows(path: Path) -> list:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LiandanError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow") from None
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError, ValueError) as exc:  # not Parquet, truncated, or an unreadable column
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise LiandanError(f"{path}: not a readable Parquet file ({reason})") from None


def parse_template(spec: str, what: str) -> list[tuple[str, str | None]]:
    """[(literal text, field name or None)] of a '{Field}' template. Fields are looked up by their whole name
    (not with str.format, which takes '{0}' for an argument index and '{a.b}' for an attribute)."""
    try:
        parts = list(string.Formatter().parse(spec))
    except ValueError as exc:
        raise LiandanError(f"--{what} {spec!r}: not a valid template ({exc}); write {{Field}}, "
                           "and {{ or }} for a literal brace") from None
    for _, name, format_spec, conversion in parts:
        if name == "":
            raise LiandanError(f"--{what} {spec!r}: {{}} names no field; write {{Field}}, and {{{{ or }}}} for a literal brace")
        if format_spec or conversion:
            raise LiandanError(f"--{what} {spec!r}: write the field as {{{name}}}, without ':' or '!' after its name")
    return [(literal, name) for literal, name, _, _ in parts]


def make_getter(spec: str | None, guesses: tuple, first_row: dict, what: str, path: Path):
    """A function row -> str for a field name or a '{Field}' template; guessed from common names if None."""
    if spec is None:
        spec = next((name for name in guesses if name in first_row), None)
        if spec is None:
            raise LiandanError(f"{path}: cannot guess the {what} field among {', '.join(sorted(first_row))}; "
                               f"name it with --{what}")
    if "{" in spec:
        parts = parse_template(spec, what)

        def from_template(row, where):
            missing = [name for _, name in parts if name is not None and name not in row]
            if missing:
                raise LiandanError(f"{where}: no field {missing[0]!r} (for --{what})")
            return "".join(literal + ("" if name is None else _as_text(row[name], name, what, where))
                           for literal, name in parts)

        return from_template

    def from_field(row, where):
        if spec not in row:
            raise LiandanError(f"{where}: no field {spec!r} (for --{what}); fields: {', '.join(sorted(row))}")
        return _as_text(row[spec], spec, what, where)

    return from_field


def _as_text(value, name: str, what: str, where: str) -> str:
    """A field's value as training text: numbers are written out; an object or list (SQuAD's `answers`) would
    train on its Python spelling ("{'text': [...]}"), so it is refused."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, tuple)):
        kind = "an object" if isinstance(value, dict) else "a list"
        raise LiandanError(f"{where}: field {name!r} (for --{what}) is {kind}, not text; put the text it holds "
                           "in a field of its own first")
    return str(value)


# The formats convert writes (the first is the default) and the field options each uses: any other given
# would be ignored without a word.
FIELDS_OF = {"completions": ("prompt", "completion"), "chat": ("prompt", "completion", "system"), "text": ("text",)}


def check_fields_for(fmt: str, fields: dict) -> None:
    unused = [name for name, value in fields.items() if value and name not in FIELDS_OF[fmt]]
    if unused:
        raise LiandanError(f"--{unused[0]} does not apply to --format {fmt} (it takes "
                           f"{', '.join('--' + n for n in FIELDS_OF[fmt])})")


OUTPUT_FORMATS = tuple(FIELDS_OF)
SPLIT_RATIOS = {"valid": 0.1, "test": 0.1}  # default shares of the examples held out


def convert(path: Path, fmt: str, prompt=None, completion=None, text=None, system=None, log=print) -> list[dict]:
    """The rows of one table as training records; rows with nothing to learn from are skipped, and counted."""
    rows = list(read_rows(path, log))
    if not rows:
        raise LiandanError(f"{path}: no rows")
    first = rows[0][1]
    out, empty = [], []
    if fmt == "text":
        get_text = make_getter(text, TEXT_NAMES, first, "text", path)
        for n, row in rows:
            value = get_text(row, f"{path}:{n}")
            if value.strip():
                out.append({"text": value})
            else:
                empty.append(n)
        _note_empty(path, empty, "text", log)
        return out
    get_prompt = make_getter(prompt, PROMPT_NAMES, first, "prompt", path)
    get_completion = make_getter(completion, COMPLETION_NAMES, first, "completion", path)
    get_system = make_getter(system, (), first, "system", path) if system else None
    for n, row in rows:
        where = f"{path}:{n}"
        p, c = get_prompt(row, where), get_completion(row, where)
        if not p.strip() or not c.strip():
            empty.append(n)  # nothing to learn from
        elif fmt == "completions":
            out.append({"prompt": p, "completion": c})
        else:
            messages = [{"role": "system", "content": get_system(row, where)}] if get_system else []
            out.append({"messages": messages + [{"role": "user", "content": p}, {"role": "assistant", "content": c}]})
    _note_empty(path, empty, "prompt or completion", log)
    return out


def _note_empty(path: Path, lines: list[int], what: str, log) -> None:
    if lines:
        shown = ", ".join(map(str, lines[:10])) + (" …" if len(lines) > 10 else "")
        log(f"Note: {path}: {len(lines)} row(s) with an empty {what} skipped (lines {shown})")


def prompt_key(record: dict) -> str:
    """What two splits may not share: the prompt (a chat's user turns, a text whole), normalised as
    `data check` matches leakage, so a question asked twice is never both trained on and tested."""
    if "messages" in record:
        prompt = "\n".join(m["content"] for m in record["messages"] if m["role"] == "user")
    else:
        prompt = record["prompt"] if "prompt" in record else record["text"]
    return normalise(prompt) or prompt  # all punctuation: only the same prompt is the same


def fits(split_rows: list, group: list, wanted: int) -> bool:
    """A group of same-prompt examples goes to valid/test if it fits what is left, or is the first there and at
    most twice the size asked for (3 answers each to 10 prompts, 5 % asked: 2 wanted, a group of 3 goes)."""
    return len(split_rows) + len(group) <= wanted or (not split_rows and 0 < wanted and len(group) <= 2 * wanted)


def split(records: list[dict], valid_ratio: float, test_ratio: float, seed: int) -> dict[str, list[dict]]:
    """Seeded random split after removing exact duplicates. Examples with the same prompt stay together in one
    split (a group that does not fit the rest of valid or test goes to train), so no prompt leaks across splits."""
    if not (0 <= valid_ratio < 1 and 0 <= test_ratio < 1 and valid_ratio + test_ratio < 1):
        raise LiandanError("--valid-ratio and --test-ratio must be in [0, 1) and sum to less than 1")
    unique = list({json.dumps(r, ensure_ascii=False, sort_keys=True): r for r in records}.values())
    groups: dict[str, list[dict]] = {}
    for record in unique:
        groups.setdefault(prompt_key(record), []).append(record)
    order = list(groups.values())
    random.Random(seed).shuffle(order)
    wanted = {"test": int(round(len(unique) * test_ratio)), "valid": int(round(len(unique) * valid_ratio))}
    splits: dict[str, list[dict]] = {"test": [], "valid": [], "train": []}
    for group in order:
        name = next((s for s in ("test", "valid") if fits(splits[s], group, wanted[s])), "train")
        splits[name] += group
    return splits


def write_jsonl(path: Path, records: list[dict]) -> None:
    with atomic_path(path) as tmp:
        write_rows(tmp, records)


def write_rows(path: Path, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def prepare(inputs: list[Path], out: Path, fmt: str, valid_ratio: float, test_ratio: float, seed: int,
            log=print, overwrite: bool = False, **fields) -> dict[str, int]:
    check_fields_for(fmt, fields)
    reads = [("the input", Path(path)) for path in inputs]
    for name in SPLITS:  # checked before any work: an existing split is replaced only with --overwrite
        check_output(out / f"{name}.jsonl", "--out", reads, overwrite)
    records = []
    for path in inputs:
        records += convert(Path(path), fmt, log=log, **fields)
    source = f"{inputs[0]}" + (f" (and {len(inputs) - 1} more)" if len(inputs) > 1 else "")
    if not records:
        raise LiandanError(f"{source}: no example left: every row has an empty "
                           + ("text" if fmt == "text" else "prompt or completion"))
    splits = split(records, valid_ratio, test_ratio, seed)
    kept = sum(len(v) for v in splits.values())
    if not splits["train"]:
        raise LiandanError(f"{source}: {kept} distinct example(s) leave none for train.jsonl with --valid-ratio "
                           f"{valid_ratio:g} and --test-ratio {test_ratio:g}; lower the ratios or add examples")
    write_splits(out, splits, log)
    counts = {k: len(v) for k, v in splits.items()}
    dropped = len(records) - kept
    log(f"Wrote {out}: " + ", ".join(f"{k}.jsonl {v}" for k, v in counts.items() if v)
        + (f" ({dropped} duplicate(s) removed)" if dropped else ""))
    for name, ratio in (("valid", valid_ratio), ("test", test_ratio)):
        if counts[name] < int(round(kept * ratio)):
            log(f"Note: {name}.jsonl has {counts[name]} of the {int(round(kept * ratio))} example(s) asked for: "
                "examples with the same prompt stay in one split, and the rest went to train.")
    return counts


def write_splits(out: Path, splits: dict[str, list[dict]], log) -> None:
    """Write the non-empty splits, each to a temporary file first; only when all are written is an old split
    file that this run leaves empty removed (its --overwrite was checked) and the new ones renamed into place,
    so `out` never mixes two datasets. Other files in `out` are the user's and are kept."""
    out.mkdir(parents=True, exist_ok=True)
    with ExitStack() as renames:  # each atomic_path renames its file into place when the stack closes
        for name, rows in splits.items():
            if rows:
                write_rows(renames.enter_context(atomic_path(out / f"{name}.jsonl")), rows)
        for name, rows in splits.items():
            stale = out / f"{name}.jsonl"
            if not rows and os.path.lexists(stale):
                try:
                    stale.unlink()
                except OSError as exc:  # nothing is renamed yet: the old splits stay as they were
                    raise LiandanError(f"{stale}: cannot remove the old split ({exc.strerror}); nothing was changed") from None
                log(f"Removed the old {stale}: this split is empty now.")
