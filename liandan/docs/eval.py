"""`liandan eval QUESTIONS.jsonl`: base, base + docs, adapter, adapter + docs on the same questions.

One process, the model loaded once: the base modes run the adapter model inside PEFT's
`disable_adapter()`, so they score the very weights the adapter was trained on, with the same
rendering. Greedy decoding; an answer counts when it contains the expected answer (after
normalising case, width, punctuation and spaces); `exact` is reported beside it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from liandan.docs.prompt import TOP_K_HELP
from liandan.errors import LiandanError
from liandan.models import DEFAULT_MODEL

MODES = ("base", "base+docs", "adapter", "adapter+docs")


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("questions", help="JSONL of questions with answers (prompt/completion or chat; optional section)")
    parser.add_argument("--model", help=f"Base model (default: the adapter's base model, else {DEFAULT_MODEL})")
    parser.add_argument("--adapter-path", help="Adapter directory: adds the adapter and adapter+docs modes")
    parser.add_argument("--docs", help="Documents (a folder or a `liandan docs index`): adds the +docs modes")
    parser.add_argument("--top-k", type=int, default=None, help=TOP_K_HELP)
    parser.add_argument("--modes", nargs="+", choices=MODES, help="Only these modes (default: all that apply)")
    parser.add_argument("--max-tokens", "-m", type=int, default=48, help="Answer budget per question (default 48)")
    parser.add_argument("--json", action="store_true", help="Print the results as JSON")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    return parser


@dataclass
class ModeResult:
    mode: str
    answers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def count(self, key: str) -> int:
        return sum(bool(a[key]) for a in self.answers)

    def to_dict(self) -> dict:
        n = len(self.answers)
        return {"mode": self.mode, "correct": self.count("correct"), "exact": self.count("exact"),
                "stopped": self.count("stopped"), "total": n, "seconds": round(self.seconds, 2), "answers": self.answers}


def recall_at_k(docs, questions) -> tuple[int, list[bool]]:
    """How many questions have a relevant chunk (liandan.docs.qa.is_relevant) among the top k retrieved."""
    from liandan.docs.qa import is_relevant

    found = [any(is_relevant(h.chunk, qa) for h in docs.index.search(qa.question, docs.top_k)) for qa in questions]
    return sum(found), found


def run_mode(pipe, questions, docs, mode: str, max_tokens: int) -> ModeResult:
    from liandan.docs.qa import contains_answer, is_exact
    from liandan.generate import generate

    with_adapter = mode.startswith("adapter")
    off = contextlib.nullcontext() if with_adapter else pipe.model.disable_adapter() if hasattr(
        pipe.model, "disable_adapter") else contextlib.nullcontext()
    result = ModeResult(mode)
    start = time.perf_counter()
    with off:
        for qa in questions:
            messages = [{"role": "user", "content": qa.question}]
            if mode.endswith("+docs"):
                messages, _ = docs.apply(messages)
            out = generate(pipe.model, pipe.encoder.prompt_ids(messages), max_tokens, pipe.stop_ids,
                           pipe.device.torch_device)
            got = pipe.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
            result.answers.append({"question": qa.question, "expected": qa.answer, "got": got,
                                   "correct": contains_answer(got, qa.answer), "exact": is_exact(got, qa.answer),
                                   "stopped": out.stopped})
    result.seconds = time.perf_counter() - start
    return result


def applicable_modes(has_adapter: bool, has_docs: bool, wanted=None) -> list[str]:
    modes = [m for m in MODES if (has_adapter or not m.startswith("adapter")) and (has_docs or not m.endswith("+docs"))]
    if wanted:
        missing = [m for m in wanted if m not in modes]
        if missing:
            need = "--adapter-path" if missing[0].startswith("adapter") and not has_adapter else "--docs"
            raise LiandanError(f"--modes {' '.join(missing)} needs {need}")
        modes = [m for m in modes if m in wanted]
    return modes


def format_table(results: list[ModeResult], recall: tuple[int, int, int] | None) -> list[str]:
    lines = ["| mode | correct (contains answer) | exact | stopped | seconds |", "| --- | ---: | ---: | ---: | ---: |"]
    for r in results:
        n = len(r.answers)
        lines.append(f"| {r.mode} | {r.count('correct')}/{n} | {r.count('exact')}/{n} | {r.count('stopped')}/{n} | {r.seconds:.1f} |")
    if recall:
        lines.append(f"Retrieval recall@{recall[2]}: {recall[0]}/{recall[1]}")
    return lines


def main(args: argparse.Namespace) -> int:
    from liandan.docs.qa import read_questions
    from liandan.generate import load_pipeline

    if args.max_tokens <= 0:
        raise LiandanError(f"--max-tokens must be positive, got {args.max_tokens}")
    questions = read_questions(Path(args.questions))
    modes = applicable_modes(bool(args.adapter_path), bool(args.docs), args.modes)
    pipe = load_pipeline(args.model, args.adapter_path, dtype=args.dtype)
    if args.adapter_path and not hasattr(pipe.model, "disable_adapter") and any(m.startswith("base") for m in modes):
        raise LiandanError(f"{args.adapter_path}: a full fine-tune has no separate base weights here; "
                           "pass --modes adapter adapter+docs, and run the base without --adapter-path")
    docs = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        docs = DocsContext.open(args.docs, pipe.record, args.top_k)
    recall = None
    if docs:
        hits, _ = recall_at_k(docs, questions)
        recall = (hits, len(questions), docs.top_k)
    results = [run_mode(pipe, questions, docs, mode, args.max_tokens) for mode in modes]
    if args.json:
        print(json.dumps({"questions": len(questions), "recall": None if recall is None else
                          {"found": recall[0], "total": recall[1], "k": recall[2]},
                          "modes": [r.to_dict() for r in results]}, ensure_ascii=False, indent=2))
        return 0
    for i, qa in enumerate(questions):
        print(f"{qa.question}  (expected: {qa.answer})")
        for r in results:
            a = r.answers[i]
            print(f"  {'✓' if a['correct'] else '✗'} {r.mode:<13} {a['got'][:100]!r}")
    print("\n".join(format_table(results, recall)))
    return 0
