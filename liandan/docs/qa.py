"""Question files, answer scoring, retrieval recall, and retrieval-aware training examples.

A question file is JSONL in the completions or chat format (`{"prompt": ..., "completion": ...}`);
an optional `section` (the heading the answer is under) makes recall exact, otherwise a retrieved
chunk counts as relevant when it contains the answer.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from liandan.data.check import normalise
from liandan.errors import LiandanError


@dataclass
class QA:
    question: str
    answer: str
    line: int
    section: str | None = None
    source: str | None = None


def read_questions(path: Path) -> list[QA]:
    """Questions and expected answers from a completions/chat JSONL file (the last user and assistant turns)."""
    from liandan.data.formats import read_jsonl

    path = Path(path)
    if path.is_dir():
        raise LiandanError(f"{path}: a folder; give the questions file (JSONL, e.g. {path / 'test.jsonl'})")
    if not path.is_file():
        raise LiandanError(f"{path}: no such file")
    data = read_jsonl(path)
    if data.format == "text":
        raise LiandanError(f"{path}: questions need a prompt and an answer (completions or chat format), not text")
    raw = {}
    with open(path, encoding="utf-8-sig") as f:  # read_jsonl has checked every line; -sig: a BOM is not JSON
        for number, line in enumerate(f, 1):
            if line.strip():
                raw[number] = json.loads(line)
    out = []
    for ex in data.examples:
        users = [m for m in ex.messages if m["role"] == "user"]
        answers = [m for m in ex.messages if m["role"] == "assistant"]
        if not users or not answers:
            raise LiandanError(f"{path}:{ex.line}: a question needs a user turn and an assistant answer")
        extra = raw.get(ex.line, {})
        for key in ("section", "source"):
            if not isinstance(extra.get(key), (str, type(None))):
                raise LiandanError(f"{path}:{ex.line}: \"{key}\" must be text (a heading or a file name), "
                                   f"not {type(extra[key]).__name__}")
        out.append(QA(users[-1]["content"] or "", answers[-1]["content"] or "", ex.line,
                      extra.get("section"), extra.get("source")))
    return out


def _squash(text: str) -> str:
    # normalise() keeps single spaces between words; Chinese answers differ in spacing ("860 克" / "860克")
    return normalise(text).replace(" ", "")


def is_exact(got: str, expected: str) -> bool:
    return _squash(got) == _squash(expected)


def contains_answer(got: str, expected: str) -> bool:
    return bool(_squash(expected)) and _squash(expected) in _squash(got)


def is_relevant(chunk, qa: QA) -> bool:
    """A retrieved chunk that holds the answer: the question's section if it names one (its own heading, as
    written by hand, or its whole heading path, as `data synth` writes it), else its answer text."""
    if qa.source and qa.source != chunk.source:
        return False
    if qa.section:
        return qa.section.strip() in (chunk.section.strip(), chunk.section.split(" > ")[-1].strip())
    return contains_answer(chunk.text, qa.answer)


def gold_chunk(index, qa: QA):
    """The chunk a question is about: among its section's chunks, one that holds the answer if any does."""
    relevant = [c for c in index.chunks if is_relevant(c, qa)]
    return next((c for c in relevant if contains_answer(c.text, qa.answer)), relevant[0] if relevant else None)


def retrieval_examples(index, questions: list[QA], layout, top_k: int, seed: int = 0, log=print) -> list[dict]:
    """(question + top-k retrieved chunks, in shuffled order) → answer, as completions records.

    The retrieved chunks beyond the relevant one are the distractors the model learns to ignore (random
    other chunks fill up to k when fewer match); the order is shuffled so it does not learn that the answer is always in source [1]. When
    retrieval misses a question's section, its chunk replaces the last hit, so no example teaches
    the model to answer without the answer in view."""
    rng = random.Random(seed)
    records, missed, unanswerable = [], 0, []
    for qa in questions:
        chunks = [h.chunk for h in index.search(qa.question, top_k)]
        if not any(is_relevant(c, qa) for c in chunks):
            gold = gold_chunk(index, qa)
            if gold is None:  # no chunk holds it: an example would teach answering without the answer in view
                unanswerable.append(qa.line)
                continue
            missed += 1
            chunks = chunks[: max(top_k - 1, 0)] + [gold]
        others = [c for c in index.chunks if c not in chunks and not is_relevant(c, qa)]
        chunks += rng.sample(others, min(top_k - len(chunks), len(others))) if len(chunks) < top_k else []
        rng.shuffle(chunks)
        asked = layout.place([{"role": "user", "content": qa.question}], chunks)
        shown = {"question": qa.question, "sources": [{"source": c.source, "section": c.section} for c in chunks]}
        if len(asked) == 1:
            records.append({"prompt": asked[0]["content"], "completion": qa.answer, **shown})
        else:  # the sources in a system message: chat records keep it
            records.append({"messages": asked + [{"role": "assistant", "content": qa.answer}], **shown})
    if missed:
        log(f"Note: retrieval missed the answer's chunk for {missed} of {len(questions)} question(s); "
            "it was put in their context instead of the last hit.")
    if unanswerable:
        log(f"Note: left out {len(unanswerable)} question(s) whose section or answer is in no chunk of the documents "
            f"(line(s) {', '.join(map(str, unanswerable[:10]))}{', …' if len(unanswerable) > 10 else ''}).")
    return records


LAYOUT_FILE = "docs-layout.json"


def write_retrieval_data(source: Path, questions_path: Path, out: Path, top_k: int, seed: int, log=print,
                         overwrite: bool = False) -> int:
    """`liandan data from-docs DIR --questions QA.jsonl --out DATA`: train.jsonl + the layout for the adapter record."""
    from liandan.atomic import atomic_write_text, check_output
    from liandan.data.prepare import write_jsonl
    from liandan.docs.index import open_docs
    from liandan.docs.prompt import DocsLayout

    if top_k < 1:
        raise LiandanError(f"--top-k must be at least 1, got {top_k}")
    check_output(out / "train.jsonl", "--out", [("--questions", questions_path), ("the documents", source)], overwrite)
    questions = read_questions(questions_path)
    index = open_docs(source, log)
    layout = DocsLayout(top_k=top_k)
    records = retrieval_examples(index, questions, layout, top_k, seed, log)
    if not records:
        raise LiandanError(f"{questions_path}: no question has its answer in the documents; nothing to write")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    atomic_write_text(out / LAYOUT_FILE, json.dumps(layout.to_dict(), indent=2, ensure_ascii=False))
    log(f"Wrote {out / 'train.jsonl'}: {len(records)} question(s) with {top_k} retrieved chunk(s) each, "
        f"and {out / LAYOUT_FILE} (recorded with the adapter, used again by --docs)")
    return len(records)


def read_layout(data_dir) -> dict | None:
    """The docs layout a data directory was made with, for the adapter record; None for other data."""
    path = Path(data_dir) / LAYOUT_FILE if data_dir else None
    if path is None or not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise LiandanError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg}") from None
