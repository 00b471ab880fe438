"""`liandan data check|prepare|from-docs|synth`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from liandan.data.docs import CHUNK_TOKENS, OVERLAP_TOKENS
from liandan.data.formats import MAX_LINE_BYTES
from liandan.data.prepare import OUTPUT_FORMATS, SPLIT_RATIOS
from liandan.data.render import CHAT_TEMPLATE_HELP
from liandan.docs.prompt import DEFAULT_TOP_K
from liandan.errors import EXIT_INPUT, EXIT_WARNINGS, LiandanError
from liandan.models import DEFAULT_MODEL


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="Formats, errors, token lengths, stop tokens, duplicates, train/valid/test leakage")
    c.add_argument("target", help="A data directory ({train,valid,test}.jsonl) or one .jsonl file")
    c.add_argument("--model", help=f"Model whose chat template and tokenizer count the tokens (default: {DEFAULT_MODEL})")
    c.add_argument("--max-seq-length", type=int, default=2048, help="Flag examples longer than this (default 2048)")
    c.add_argument("--json", action="store_true", help="Print the report as JSON")
    c.add_argument("--max-line-bytes", type=int, default=MAX_LINE_BYTES,
                   help="Longest line read, in bytes; a longer one is an error (default 16 MiB): bounds memory per line")
    c.add_argument("--show", type=int, default=0, metavar="N",
                   help="Also print the first N examples as trained: rendered, trained part between ⟦ ⟧")
    c.add_argument("--chat-template", help=CHAT_TEMPLATE_HELP)
    _add_field_names(c)
    p = sub.add_parser("prepare", help="JSONL/JSON/CSV/Parquet with any field names → train/valid/test.jsonl")
    p.add_argument("inputs", nargs="+", help="Input files")
    p.add_argument("--out", required=True, help="Output data directory")
    p.add_argument("--format", choices=OUTPUT_FORMATS, default=OUTPUT_FORMATS[0])
    p.add_argument("--prompt", help="Prompt field, or a template joining fields: '{Question}'")
    p.add_argument("--completion", help="Answer field or template, e.g. '<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}'")
    p.add_argument("--text", help="Text field or template (--format text)")
    p.add_argument("--system", help="System message field or template (--format chat)")
    for split, ratio in SPLIT_RATIOS.items():
        p.add_argument(f"--{split}-ratio", type=float, default=ratio, help=f"Share of examples for {split}.jsonl (default {ratio})")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="Replace train/valid/test.jsonl already in --out")
    d = sub.add_parser("from-docs", help="Markdown/text/HTML documents → text JSONL chunks that fit the context")
    d.add_argument("source", help="A directory of documents (searched recursively) or one file")
    d.add_argument("--out", required=True, help="Output data directory (train.jsonl)")
    d.add_argument("--model", help=f"Model whose tokenizer counts chunk sizes (default: {DEFAULT_MODEL})")
    d.add_argument("--chunk-tokens", type=int, default=None, help=f"Maximum tokens per chunk (default {CHUNK_TOKENS})")
    d.add_argument("--overlap", type=int, default=None,
                   help=f"Tokens repeated when a paragraph is cut (default {OVERLAP_TOKENS})")
    d.add_argument("--questions", help="Q&A JSONL (prompt/completion): write retrieval-aware examples instead — each "
                   "question with its --top-k retrieved chunks (the relevant one and distractors) → the answer")
    d.add_argument("--top-k", type=int, default=DEFAULT_TOP_K,
                   help=f"Chunks per question with --questions (default {DEFAULT_TOP_K})")
    d.add_argument("--seed", type=int, default=0, help="Seed for the order of chunks with --questions (default 0)")
    d.add_argument("--overwrite", action="store_true", help="Replace a train.jsonl already in --out")
    y = sub.add_parser("synth", help="Question/answer pairs for each chunk of your documents, from a teacher model")
    y.add_argument("source", help="A folder of documents (or one file)")
    y.add_argument("--out", required=True, help="Output data directory (train.jsonl; valid/test.jsonl there are "
                   "checked for leakage)")
    y.add_argument("--teacher-url", help="An OpenAI-compatible API (Ollama, llama.cpp server, `liandan serve`): "
                   "http://127.0.0.1:11434/v1; default: the local --model")
    y.add_argument("--teacher-model", default=None, help="Model name at --teacher-url (default: its first model)")
    y.add_argument("--api-key", default="none", help="API key for --teacher-url")
    y.add_argument("--model", help=f"Local teacher when there is no --teacher-url (default: {DEFAULT_MODEL})")
    y.add_argument("--per-chunk", type=int, default=3, help="Questions asked per chunk (default 3)")
    y.add_argument("--max-tokens", type=int, default=256, help="Teacher's answer budget per chunk (default 256)")
    y.add_argument("--overwrite", action="store_true", help="Replace a train.jsonl already in --out")
    return parser


def _add_field_names(parser):
    from liandan.data.formats import FieldNames

    parser.add_argument("--prompt-feature", default=FieldNames.prompt)
    parser.add_argument("--completion-feature", default=FieldNames.completion)
    parser.add_argument("--text-feature", default=FieldNames.text)
    parser.add_argument("--chat-feature", default=FieldNames.chat)


def shown_examples(target: Path, encoder, names, count: int) -> list[str]:
    """The first `count` examples (of train.jsonl in a directory) rendered as trained, trained part marked."""
    from liandan.data.formats import scan_jsonl

    path = target / "train.jsonl" if target.is_dir() else target
    if count <= 0 or not path.is_file():
        return []
    lines = [f"First {count} example(s) of {path} as trained (⟦trained⟧, the rest is the masked prompt):"]
    try:
        for fmt, item in scan_jsonl(path, names):
            if fmt is not None:
                lines += [f"--- {path.name}:{item.line}", _shown(encoder, item, path)]
                count -= 1
            if count == 0:
                break
    except LiandanError as exc:  # the file cannot be read (any further); the report above said so already
        lines.append(f"  ✗ {exc}")
    return lines


def _shown(encoder, item, path: Path) -> str:
    """One example as trained, or its error as file:line (the report counted it): the other examples still show."""
    from liandan.data.render import marked_text

    try:
        return marked_text(encoder.tokenizer, encoder.encode(item))
    except LiandanError as exc:
        return f"  ✗ {path}:{item.line}: {exc}"


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from liandan.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model)))


def main(args: argparse.Namespace) -> int:
    if args.action == "check":
        from liandan.data.check import check, render_report, require_jsonl, require_train
        from liandan.data.formats import FieldNames
        from liandan.data.render import Encoder, make_rendering, trains_tools

        target = Path(args.target)
        if not target.exists():
            raise LiandanError(f"{target}: no such file or directory")
        if args.max_line_bytes <= 0:
            raise LiandanError(f"--max-line-bytes must be positive, got {args.max_line_bytes}")
        require_jsonl(target)
        require_train(target)
        tokenizer = _tokenizer(args.model)
        tools = trains_tools(tokenizer, target)
        encoder = Encoder(tokenizer, make_rendering(tokenizer, chat_template=args.chat_template, tools=tools))
        names = FieldNames(args.text_feature, args.prompt_feature, args.completion_feature, args.chat_feature)
        result = check(target, encoder, args.max_seq_length, names, args.max_line_bytes)
        lines, errors, warnings = render_report(result, encoder)
        if args.json:
            print(json.dumps({"files": [r.to_dict() for r in result["files"]], "leakage": result["leakage"], "not_read": result["not_read"],
                              "errors": errors, "warnings": warnings}, ensure_ascii=False, indent=2))
        else:
            print("\n".join(lines), flush=True)  # the report stands even if showing the examples fails
            shown = shown_examples(target, encoder, names, args.show)
            if shown:
                print("\n".join(shown))
        return EXIT_INPUT if errors else EXIT_WARNINGS if warnings else 0
    if args.action == "prepare":
        from liandan.data.prepare import prepare

        prepare([Path(p) for p in args.inputs], Path(args.out), args.format, args.valid_ratio, args.test_ratio,
                args.seed, overwrite=args.overwrite, prompt=args.prompt, completion=args.completion, text=args.text, system=args.system)
        return 0
    if args.action == "synth":
        from liandan.docs.synth import synth_main

        return synth_main(args)
    if args.questions:
        from liandan.docs.qa import write_retrieval_data

        ignored = [f for f, v in (("--chunk-tokens", args.chunk_tokens), ("--overlap", args.overlap), ("--model", args.model))
                   if v is not None]
        if ignored:  # the retrieved chunks are the index's, as --docs will retrieve them at question time
            raise LiandanError(f"{ignored[0]} sizes plain text chunks; with --questions the chunks are the docs "
                               "index's (as --docs retrieves them), so leave it out")

        write_retrieval_data(Path(args.source), Path(args.questions), Path(args.out), args.top_k, args.seed,
                             overwrite=args.overwrite)
        return 0
    from liandan.data.docs import check_chunking, from_docs

    chunk_tokens = CHUNK_TOKENS if args.chunk_tokens is None else args.chunk_tokens
    overlap = OVERLAP_TOKENS if args.overlap is None else args.overlap
    check_chunking(chunk_tokens, overlap)  # before the tokenizer loads (a first use converts the embedded model)
    from_docs(Path(args.source), Path(args.out), _tokenizer(args.model), chunk_tokens, overlap,
              overwrite=args.overwrite)
    return 0
