"""`liandan data check`: what is right and what is wrong with a data directory, before training.

Per file: format and counts, every error as file:line (capped), token lengths as the model will
see them (chat template + stop token), examples over --max-seq-length, stop tokens typed by hand,
empty fields and duplicates. Across files: train/valid/test leakage, exact (normalised text) and
near-duplicate (MinHash over character 5-grams, confirmed by Jaccard similarity).

Files are streamed; per example only a length and a few hashes are kept, and near-duplicate
signatures only for valid/test, so a 1 GB train.jsonl is checked in bounded memory.
"""

from __future__ import annotations

import hashlib
import os
import re
import statistics
import sys
import time
import unicodedata
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from liandan.data.formats import MAX_LINE_BYTES, SPLITS, TABLE_SUFFIXES, FieldNames, scan_jsonl
from liandan.errors import LiandanError

MAX_LISTED = 20
NEAR_DUP = 0.8  # Jaccard similarity of character 5-grams above which two questions count as the same


@dataclass
class FileReport:
    path: Path
    format: str | None = None
    examples: int = 0
    errors: list[str] = field(default_factory=list)
    error_count: int = 0
    lengths: array = field(default_factory=lambda: array("I"))
    over_length: int = 0
    hand_typed: Counter = field(default_factory=Counter)
    empty_fields: list[int] = field(default_factory=list)
    duplicates: list[tuple[int, int]] = field(default_factory=list)  # (line, first line)

    def to_dict(self) -> dict:
        lengths = sorted(self.lengths)
        return {
            "path": str(self.path), "format": self.format, "examples": self.examples,
            "errors": self.errors, "error_count": self.error_count,
            "tokens": _length_stats(lengths) if lengths else None, "over_max_seq_length": self.over_length,
            "hand_typed_stop_tokens": dict(self.hand_typed), "empty_fields": self.empty_fields,
            "duplicates": [{"line": a, "same_as_line": b} for a, b in self.duplicates],
        }


def normalise(text: str) -> str:
    """Case, width, punctuation and spacing do not make two examples different."""
    text = unicodedata.normalize("NFKC", text).lower()
    text = re.sub(r"[\W_]+", " ", text)
    return " ".join(text.split())


def question_of(example) -> str:
    """The part of an example a test question is matched on: the text, or the user turns."""
    if example.text is not None:
        return example.text
    return "\n".join(m.get("content") or "" for m in example.messages if m["role"] == "user")


def whole_of(example) -> str:
    if example.text is not None:
        return example.text
    return "\n".join(f"{m['role']}: {m.get('content') or ''}" for m in example.messages)


def _digest(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()


class MinHasher:
    """MinHash signatures of character 5-gram sets (32 permutations, 8 LSH bands of 4)."""

    def __init__(self, perms: int = 32, seed: int = 1):
        rng = np.random.default_rng(seed)
        self.prime = np.uint64((1 << 61) - 1)
        self.a = rng.integers(1, 1 << 61, perms, dtype=np.uint64)
        self.b = rng.integers(0, 1 << 61, perms, dtype=np.uint64)

    @staticmethod
    def shingles(text: str) -> set[str]:
        text = normalise(text)
        return {text[i : i + 5] for i in range(max(len(text) - 4, 1))}

    def signature(self, shingles: set[str]) -> np.ndarray:
        values = np.array([int.from_bytes(_digest(s), "little") >> 4 for s in shingles], dtype=np.uint64)
        with np.errstate(over="ignore"):
            hashed = (values[:, None] * self.a[None, :] + self.b[None, :]) % self.prime
        return hashed.min(axis=0)

    @staticmethod
    def bands(signature: np.ndarray, rows: int = 4):
        return [(i, signature[i : i + rows].tobytes()) for i in range(0, len(signature), rows)]


def check_file(path: Path, encoder, max_seq_length: int, names: FieldNames, max_line_bytes: int = MAX_LINE_BYTES,
               on_question=None) -> FileReport:
    """Scan one file into its report; on_question(line, question) is called for each example as it is read (the
    leakage check's input)."""
    report = FileReport(path)
    seen: dict[bytes, int] = {}
    if encoder is not None:
        encoder.hand_typed.counts.clear()
    try:
        for fmt, item in scan_jsonl(path, names, max_line_bytes, Progress(path)):
            if fmt is None:
                _add_error(report, str(item))
                continue
            report.format = fmt  # the file's so far: a chat file turns "tools" at its first record with tools
            report.examples += 1
            try:
                _check_example(report, item, seen, encoder, max_seq_length)
            except LiandanError as exc:  # e.g. the chat template cannot render this example
                _add_error(report, f"{path}:{item.line}: {exc}")
            if on_question is not None:
                on_question(item.line, question_of(item))
    except LiandanError as exc:  # the file cannot be read (any further): one error, the other files still checked
        _add_error(report, str(exc))
    if encoder is not None:
        report.hand_typed = Counter(encoder.hand_typed.counts)
    if report.examples == 0 and report.error_count == 0:
        _add_error(report, f"{path}: the file is empty")
    return report


def _add_error(report: FileReport, message: str) -> None:
    report.error_count += 1
    if len(report.errors) < MAX_LISTED:
        report.errors.append(message)


def _check_example(report: FileReport, item, seen: dict, encoder, max_seq_length: int) -> None:
    fields = [item.text] if item.text is not None else [m.get("content") or "" for m in item.messages if m.get("content") is not None]
    if any(not f.strip() for f in fields):
        report.empty_fields.append(item.line)
    key = _digest(normalise(whole_of(item)))
    if key in seen:
        report.duplicates.append((item.line, seen[key]))
    else:
        seen[key] = item.line
    if encoder is not None:
        # A chat is encoded only up to the turn that crosses max_seq_length, as training truncates it there.
        n = len(encoder.encode(item, limit=max_seq_length).input_ids)
        report.lengths.append(n)
        report.over_length += n > max_seq_length


class Progress:
    """A line on stderr every few seconds while a long file is read, so a big check never looks hung."""

    EVERY = 5.0  # seconds

    def __init__(self, path: Path):
        self.path, self.size = path, None
        self.last = time.monotonic()

    def __call__(self, line: int, read: int) -> None:
        now = time.monotonic()
        if now - self.last < self.EVERY:
            return
        self.last = now
        if self.size is None:
            self.size = max(self.path.stat().st_size, 1)
        print(f"liandan data check: {self.path.name}: line {line:,}, {min(read / self.size, 1):.0%} read",
              file=sys.stderr, flush=True)


class LeakFinder:
    """Held-out questions indexed once (exact digests and MinHash LSH buckets); training questions are then
    streamed past them one at a time, so a training file of any size is never held in memory."""

    def __init__(self, held_out: list):
        self.held_out, self.hasher = held_out, MinHasher()
        self.exact: dict[bytes, list[int]] = {}
        self.buckets: dict = {}
        self.shingle_sets = []
        for index, (_, text) in enumerate(held_out):
            self.exact.setdefault(_digest(normalise(text)), []).append(index)
            shingles = self.hasher.shingles(text)
            self.shingle_sets.append(shingles)
            for band in self.hasher.bands(self.hasher.signature(shingles)):
                self.buckets.setdefault(band, []).append(index)
        self.found: dict[int, dict] = {}

    def add(self, train_line: int, text: str) -> None:
        """Match one training question: exactly (normalised), or nearly (Jaccard of 5-gram sets >= NEAR_DUP)."""
        for index in self.exact.get(_digest(normalise(text)), []):
            self.found.setdefault(index, {"line": self.held_out[index][0], "train_line": train_line, "kind": "exact"})
        shingles = self.hasher.shingles(text)
        candidates = {i for band in self.hasher.bands(self.hasher.signature(shingles)) for i in self.buckets.get(band, [])}
        for index in candidates - set(self.found):
            other = self.shingle_sets[index]
            similarity = len(shingles & other) / max(len(shingles | other), 1)
            if similarity >= NEAR_DUP:
                self.found[index] = {"line": self.held_out[index][0], "train_line": train_line,
                                     "kind": f"near ({similarity:.0%})"}

    def leaks(self) -> list[dict]:
        return [self.found[i] for i in sorted(self.found)]


def find_leaks(train, held_out: list) -> list[dict]:
    """Held-out (line, question) pairs whose question also appears among the (line, question) pairs of train."""
    finder = LeakFinder(held_out)
    for line, text in train:
        finder.add(line, text)
    return finder.leaks()


def _length_stats(lengths: list[int]) -> dict:
    p95 = lengths[min(len(lengths) - 1, int(round(0.95 * (len(lengths) - 1))))]
    return {"min": lengths[0], "median": statistics.median(lengths), "p95": p95, "max": lengths[-1]}


def histogram(lengths: list[int], bins: int = 8, width: int = 30) -> list[str]:
    low, high = min(lengths), max(lengths)
    if low == high:
        return [f"    {low:>6} | {'█' * width} {len(lengths)}"]
    bins = min(bins, high - low + 1)
    step = (high - low + 1) / bins
    counts = [0] * bins
    for n in lengths:
        counts[min(int((n - low) / step), bins - 1)] += 1
    top = max(counts)
    return [f"    {int(low + i * step):>6}–{int(low + (i + 1) * step) - 1:<6}| {'█' * max(1 if c else 0, round(width * c / top))} {c}"
            for i, c in enumerate(counts)]


def check(target: Path, encoder, max_seq_length: int, names: FieldNames, max_line_bytes: int = MAX_LINE_BYTES) -> dict:
    """Check a data directory or one file. A directory's {train,valid,test}.jsonl are what training reads, so
    only they are checked when there (not metrics.jsonl or a raw export beside them); else every *.jsonl."""
    target = Path(target)
    files = sorted(target.glob("*.jsonl"), key=lambda p: (_rank(p), p.name)) if target.is_dir() else [target]
    not_read = [p for p in files if p.stem not in SPLITS] if any(p.stem in SPLITS for p in files) else []
    files = [p for p in files if p not in not_read]
    held_out = [p for p in files if p.stem in ("valid", "test")] if target.is_dir() else []
    reports, finders = {}, {}
    for path in held_out:  # read first: their questions are what train's are matched against
        questions = []
        reports[path] = check_file(path, encoder, max_seq_length, names, max_line_bytes,
                                   on_question=lambda line, text: questions.append((line, text)))
        if questions:
            finders[path.stem] = LeakFinder(questions)

    def match_train_question(line: int, text: str) -> None:
        for finder in finders.values():
            finder.add(line, text)

    for path in files:
        if path not in reports:
            reports[path] = check_file(path, encoder, max_seq_length, names, max_line_bytes,
                                       on_question=match_train_question if path.stem == "train" else None)
    trained = any(p.stem == "train" for p in files)
    leakage = {split: finder.leaks() for split, finder in finders.items() if trained}
    return {"files": [reports[p] for p in files], "leakage": leakage, "max_seq_length": max_seq_length,
            "not_read": [p.name for p in not_read]}


def _rank(path: Path) -> int:
    return SPLITS.index(path.stem) if path.stem in SPLITS else len(SPLITS)


def _in_training(fmt: str | None) -> str:
    """What training does by default with an over-long example (data/batching.py: encode_file)."""
    if fmt == "text":
        return ("training splits each into pieces of --max-seq-length tokens, nothing is lost "
                "(or use --long-examples truncate/drop)")
    return ("truncated in training (or use --long-examples drop); a chat is counted up to the turn that "
            "crosses the limit")


def require_jsonl(target: Path) -> None:
    """A table `data prepare` converts (.csv, .json, .parquet) is not training data yet: say how to make it so,
    instead of an "invalid JSON" error on every line."""
    if target.is_file() and target.suffix.lower() in TABLE_SUFFIXES and target.suffix.lower() != ".jsonl":
        raise LiandanError(f"{target}: data check reads JSONL, as training does; convert this table first with "
                           f"`liandan data prepare {target} --out DIR`, then check DIR")


def require_train(target: Path) -> None:
    """A data directory is what training (or `lora --test`) reads: train.jsonl, valid.jsonl or test.jsonl,
    exactly so named; "0 errors" for a folder training would find nothing in would mislead."""
    if not target.is_dir() or any(os.path.lexists(target / f"{s}.jsonl") for s in SPLITS):
        return
    found = sorted(p.name for p in target.iterdir() if p.suffix.lower() in TABLE_SUFFIXES)
    held = f"it holds {', '.join(found[:5])}" + (" …" if len(found) > 5 else "") if found else "it holds no data file"
    raise LiandanError(f"{target}: no train.jsonl (nor valid/test.jsonl), which training reads ({held}); name the file train.jsonl, "
                       f"check one file with `liandan data check {target / 'FILE.jsonl'}`, "
                       "or convert a table with `liandan data prepare`")


def render_report(result: dict, encoder) -> tuple[list[str], int, int]:
    """Human-readable lines, and the numbers of errors and warnings."""
    lines, errors, warnings = [], 0, 0
    limit = result["max_seq_length"]
    for r in result["files"]:
        lines.append(f"{r.path}: {r.format or 'unknown format'}, {r.examples} example(s)")
        for message in r.errors:
            lines.append(f"  ✗ {message}")
        if r.error_count > len(r.errors):
            lines.append(f"  ✗ … {r.error_count - len(r.errors)} more error(s), {r.error_count} in all")
        errors += r.error_count
        if len(r.lengths):
            s = _length_stats(sorted(r.lengths))
            lines.append(f"  tokens per example, as trained (template + stop token): min {s['min']}, median {s['median']:g}, "
                         f"p95 {s['p95']}, max {s['max']}")
            lines += histogram(list(r.lengths))
            if r.over_length:
                warnings += 1
                lines.append(f"  ⚠ {r.over_length} example(s) longer than --max-seq-length {limit}: {_in_training(r.format)}")
        if r.hand_typed:
            warnings += 1
            typed = ", ".join(f"'{t}' ×{n}" for t, n in r.hand_typed.items())
            stop = encoder.stop_token(r.format)
            lines.append(f"  ⚠ stop tokens typed by hand ({typed}): not needed, liandan ends every answer with '{stop}' "
                         "itself and removes them; you can delete them")
        if r.empty_fields:
            warnings += 1
            lines.append(f"  ⚠ {len(r.empty_fields)} example(s) with an empty or whitespace-only field: lines "
                         + ", ".join(map(str, r.empty_fields[:MAX_LISTED])))
        if r.duplicates:
            warnings += 1
            shown = ", ".join(f"{a} (= {b})" for a, b in r.duplicates[:MAX_LISTED])
            lines.append(f"  ⚠ {len(r.duplicates)} duplicate example(s): lines {shown}")
        if r.examples and not r.errors and not r.hand_typed and not r.empty_fields and not r.duplicates and not r.over_length:
            lines.append("  ✓ no problems found")
    for split, leaks in result["leakage"].items():
        if not leaks:
            lines.append(f"✓ no {split}/train leakage")
            continue
        warnings += 1
        held = next(r for r in result["files"] if r.path.stem == split)
        lines.append(f"⚠ leakage: {len(leaks)} of {held.examples} {split} example(s) also appear in train, so {split} "
                     "loss says little about new questions:")
        for leak in leaks[:MAX_LISTED]:
            lines.append(f"    {split}.jsonl:{leak['line']} = train.jsonl:{leak['train_line']} ({leak['kind']})")
    if result.get("not_read"):
        lines.append(f"Not checked, as training does not read them: {', '.join(result['not_read'])}")
    lines.append(f"{errors} error(s), {warnings} warning(s)")
    return lines, errors, warnings
