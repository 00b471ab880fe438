"""Reading hostile and large data: the JSON reader behind data/formats.py, and `data check` on one huge chat.

    .venv/bin/python benchmarks/data_read.py [--mb 50] [--turns 10000] [--model smollm2-135m]

1. A ~50 MB chat JSONL (random English/Chinese/emoji turns, 30% of lines written with ASCII escapes) read
   line by line with: json.loads; json.loads plus the checks liandan needs (bounded nesting, bounded
   integer length, no lone surrogates); orjson.loads (which has those limits built in); and liandan's
   whole reader (scan_jsonl: bounded line reading, orjson, validation). CPU seconds (stable on a shared
   machine), best of --repeats runs.
2. `liandan data check` (the real CLI, tokenizer of --model) on a file holding one chat line of --turns turns.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = "the model answers 数据库 阿里云 question about training loss 中文 emoji 😀 with tokens and more".split()


def write_big_jsonl(path: Path, megabytes: float) -> int:
    rng = random.Random(0)
    size = lines = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < megabytes * 1e6:
            messages = [{"role": "system", "content": "You are helpful."}]
            for _ in range(rng.randint(1, 4)):
                messages.append({"role": "user", "content": " ".join(rng.choices(WORDS, k=rng.randint(5, 60)))})
                messages.append({"role": "assistant", "content": " ".join(rng.choices(WORDS, k=rng.randint(10, 200)))})
            record = {"messages": messages, "id": rng.randint(0, 10**9)}
            line = json.dumps(record, ensure_ascii=rng.random() < 0.3) + "\n"
            size += len(line.encode("utf-8"))
            lines += 1
            f.write(line)
    return lines


def stdlib_checked(raw: bytes, max_depth=1024, max_digits=20):
    """What the standard library needs to match orjson's limits (the alternative that was measured)."""
    text = raw.decode("utf-8")
    if text.count("[") + text.count("{") > max_depth:  # only then is a depth scan needed
        depth = peak = 0
        for char in re.sub(r'"(?:[^"\\]|\\.)*"', "", text):
            depth += (char in "[{") - (char in "]}")
            peak = max(peak, depth)
        if peak > max_depth:
            raise ValueError("too deep")

    def bounded_int(digits):
        if len(digits) > max_digits:
            raise ValueError("integer too long")
        return int(digits)

    record = json.loads(text, parse_int=bounded_int)
    if "\\u" in text and re.search(r"\\u[dD][89a-fA-F]", text):
        json.dumps(record, ensure_ascii=False).encode("utf-8")  # raises on a lone surrogate
    return record


def time_reader(path: Path, parse, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        with open(path, "rb") as f:
            for raw in f:
                parse(raw)
        best = min(best, time.process_time() - start)
    return best


def time_scan(path: Path, repeats: int) -> float:
    from liandan.data.formats import scan_jsonl

    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for _ in scan_jsonl(path):
            pass
        best = min(best, time.process_time() - start)
    return best


def _children_cpu() -> float:
    import resource

    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    import orjson

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--turns", type=int, default=10_000)
    parser.add_argument("--model", default=None, help="Tokenizer for data check (default: the embedded model)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        big = Path(tmp) / "big.jsonl"
        lines = write_big_jsonl(big, args.mb)
        print(f"{big.stat().st_size / 1e6:.1f} MB, {lines:,} lines; best of {args.repeats}")
        print("| reader | CPU seconds |\n| --- | --- |")
        for name, parse in (("json.loads", lambda raw: json.loads(raw.decode("utf-8"))),
                            ("json.loads + depth/integer/surrogate checks", stdlib_checked),
                            ("orjson.loads", orjson.loads)):
            print(f"| {name} | {time_reader(big, parse, args.repeats):.2f} |")
        print(f"| liandan scan_jsonl (orjson + bounded lines + validation) | {time_scan(big, args.repeats):.2f} |")

        turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}: {WORDS[i % len(WORDS)]}"}
                 for i in range(args.turns)]
        print("\n`liandan data check` (wall and CPU seconds of the whole process, start-up included)")
        print("| file | wall s | CPU s | exit |\n| --- | --- | --- | --- |")
        for label, chat in (("one chat line of 2 turns (start-up alone)", turns[:2]),
                            (f"one chat line of {args.turns:,} turns", turns)):
            data = Path(tmp) / f"chat{len(chat)}"
            data.mkdir()
            (data / "train.jsonl").write_text(json.dumps({"messages": chat}, ensure_ascii=False) + "\n", encoding="utf-8")
            command = [sys.executable, "-m", "liandan", "data", "check", str(data)] + (["--model", args.model] if args.model else [])
            start, children = time.perf_counter(), _children_cpu()
            result = subprocess.run(command, capture_output=True, text=True)
            seconds, cpu = time.perf_counter() - start, _children_cpu() - children
            print(f"| {label} | {seconds:.1f} | {cpu:.1f} | {result.returncode} |")


if __name__ == "__main__":
    main()
