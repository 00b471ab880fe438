"""`liandan data synth DIR --out DATA`: question/answer pairs for each chunk of the documents, from a teacher.

The teacher is any OpenAI-compatible chat API (`--teacher-url`: Ollama, a llama.cpp server,
`liandan serve`) or the local model. Pairs are parsed from "Q: ... / A: ..." lines, exact and
near duplicates (normalised text) dropped, and pairs whose question leaks into the data
directory's valid/test questions removed with `liandan data check`'s leakage test. Each pair keeps
the file and section it was asked about.
"""

from __future__ import annotations

import re
from pathlib import Path

from liandan.errors import LiandanError

INSTRUCTION = (
    "Read the text and write {n} different questions a user could ask about it, each followed by its short "
    "answer taken from the text. Use exactly this form, one pair after another:\nQ: <question>\nA: <answer>\n\n"
    "Text:\n{text}"
)
_PAIR = re.compile(r"^\s*(?:\d+[.)]\s*)?(?:Q|Question|问|问题)\s*[:：]\s*(.+?)\s*\n+\s*(?:A|Answer|答|答案)\s*[:：]\s*(.+?)\s*$",
                   re.MULTILINE | re.IGNORECASE)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    return [(q.strip(), a.strip()) for q, a in _PAIR.findall(text) if q.strip() and a.strip()]


class ApiTeacher:
    """A chat model behind an OpenAI-compatible API."""

    def __init__(self, url: str, model: str | None, api_key: str):
        try:
            from openai import OpenAI
        except ImportError:
            from liandan.docs.index import INSTALL

            raise LiandanError(f"--teacher-url needs the openai client: {INSTALL}") from None
        self.client = OpenAI(base_url=url, api_key=api_key, max_retries=1, timeout=300)
        self.url = url
        try:
            self.model = model or self.client.models.list().data[0].id
        except Exception as exc:  # connection refused, 404, no models: one line, not the client's traceback
            raise LiandanError(f"--teacher-url {url}: cannot list its models ({type(exc).__name__}); "
                               "is the server running? pass --teacher-model if it lists none") from None

    def ask(self, prompt: str, max_tokens: int) -> str:
        try:
            reply = self.client.chat.completions.create(model=self.model, temperature=0.0, max_tokens=max_tokens,
                                                        messages=[{"role": "user", "content": prompt}])
        except Exception as exc:
            raise LiandanError(f"--teacher-url {self.url}: the request failed ({type(exc).__name__}: "
                               f"{str(exc).splitlines()[0][:160] if str(exc) else ''})") from None
        return reply.choices[0].message.content or ""


class LocalTeacher:
    """The local model (default: the embedded one) as its own teacher."""

    def __init__(self, model: str | None):
        from liandan.generate import load_pipeline

        self.pipe = load_pipeline(model, None)

    def ask(self, prompt: str, max_tokens: int) -> str:
        from liandan.generate import generate

        ids = self.pipe.encoder.prompt_ids([{"role": "user", "content": prompt}])
        out = generate(self.pipe.model, ids, max_tokens, self.pipe.stop_ids, self.pipe.device.torch_device)
        return self.pipe.tokenizer.decode(out.tokens, skip_special_tokens=True)


def synthesize(chunks, teacher, per_chunk: int, max_tokens: int, log=print) -> tuple[list[dict], int]:
    """Pairs for every chunk, exact/near duplicates dropped; returns (records, duplicates dropped)."""
    from liandan.data.check import find_leaks, normalise

    records, seen, duplicates = [], set(), 0
    for i, chunk in enumerate(chunks, 1):
        reply = teacher.ask(INSTRUCTION.format(n=per_chunk, text=chunk.text), max_tokens)
        for question, answer in parse_pairs(reply)[:per_chunk]:
            key = normalise(question)
            if key in seen:
                duplicates += 1
                continue
            seen.add(key)
            records.append({"prompt": question, "completion": answer, "source": chunk.source, "section": chunk.section})
        if i % 10 == 0 or i == len(chunks):
            log(f"  {i}/{len(chunks)} chunks: {len(records)} pairs")
    # Near duplicates among the pairs themselves: the leakage test of `data check`, run pairs against pairs.
    near = {leak["line"] for leak in find_leaks([(i, r["prompt"]) for i, r in enumerate(records)],
                                                [(i, r["prompt"]) for i, r in enumerate(records)])
            if leak["train_line"] < leak["line"]}
    kept = [r for i, r in enumerate(records) if i not in near]
    return kept, duplicates + len(records) - len(kept)


def drop_leaks(records: list[dict], out: Path) -> tuple[list[dict], int]:
    """Remove pairs whose question is (nearly) a question of out/valid.jsonl or out/test.jsonl."""
    from liandan.data.check import find_leaks, question_of
    from liandan.data.formats import read_jsonl

    held_out = []
    for name in ("valid", "test"):
        path = out / f"{name}.jsonl"
        if path.is_file():
            held_out += [(ex.line, question_of(ex)) for ex in read_jsonl(path).examples]
    if not held_out:
        return records, 0
    # find_leaks reports held-out lines; run it with the pairs as the held-out side to learn which pairs leak.
    leaking = {leak["line"] for leak in find_leaks(held_out, [(i, r["prompt"]) for i, r in enumerate(records)])}
    return [r for i, r in enumerate(records) if i not in leaking], len(leaking)


def synth_main(args) -> int:
    import time

    from liandan.atomic import check_output
    from liandan.data.prepare import write_jsonl
    from liandan.docs.index import read_chunks

    if args.per_chunk < 1:
        raise LiandanError(f"--per-chunk must be at least 1, got {args.per_chunk}")
    out = Path(args.out)
    check_output(out / "train.jsonl", "--out", [("the documents", Path(args.source))], args.overwrite)
    chunks, _, _ = read_chunks(Path(args.source))
    teacher = ApiTeacher(args.teacher_url, args.teacher_model, args.api_key) if args.teacher_url else LocalTeacher(args.model)
    start = time.perf_counter()
    print(f"Asking the teacher for {args.per_chunk} question(s) on each of {len(chunks)} chunk(s)")
    records, duplicates = synthesize(chunks, teacher, args.per_chunk, args.max_tokens)
    records, leaks = drop_leaks(records, out)
    if not records:
        raise LiandanError(f"the teacher gave no usable Q:/A: pairs for {args.source}; try a larger teacher (--teacher-url)")
    out.mkdir(parents=True, exist_ok=True)
    write_jsonl(out / "train.jsonl", records)
    print(f"Wrote {out / 'train.jsonl'}: {len(records)} pair(s) in {time.perf_counter() - start:.0f}s "
          f"({duplicates} duplicate(s) and {leaks} leaking into valid/test dropped)")
    return 0
