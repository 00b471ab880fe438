"""`liandan data check|prepare|from-docs`."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from liandan.errors import LiandanError


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    c = sub.add_parser("check", help="Formats, errors, token lengths, stop tokens, duplicates, train/valid/test leakage")
    c.add_argument("target", help="A data directory ({train,valid,test}.jsonl) or one .jsonl file")
    c.add_argument("--model", help="Model whose chat template and tokenizer count the tokens (default: smollm2-135m)")
    c.add_argument("--max-seq-length", type=int, default=2048, help="Flag examples longer than this (default 2048)")
    c.add_argument("--json", action="store_true", help="Print the report as JSON")
    _add_field_names(c)
    p = sub.add_parser("prepare", help="JSONL/JSON/CSV/Parquet with any field names → train/valid/test.jsonl")
    p.add_argument("inputs", nargs="+", help="Input files")
    p.add_argument("--out", required=True, help="Output data directory")
    p.add_argument("--format", choices=["completions", "chat", "text"], default="completions")
    p.add_argument("--prompt", help="Prompt field, or a template joining fields: '{Question}'")
    p.add_argument("--completion", help="Answer field or template, e.g. '<think>\\n{Complex_CoT}\\n</think>\\n\\n{Response}'")
    p.add_argument("--text", help="Text field or template (--format text)")
    p.add_argument("--system", help="System message field or template (--format chat)")
    p.add_argument("--valid-ratio", type=float, default=0.1, help="Share of examples for valid.jsonl (default 0.1)")
    p.add_argument("--test-ratio", type=float, default=0.1, help="Share of examples for test.jsonl (default 0.1)")
    p.add_argument("--seed", type=int, default=0, help="Seed of the random split (default 0)")
    d = sub.add_parser("from-docs", help="Markdown/text/HTML documents → text JSONL chunks that fit the context")
    d.add_argument("source", help="A directory of documents (searched recursively) or one file")
    d.add_argument("--out", required=True, help="Output data directory (train.jsonl)")
    d.add_argument("--model", help="Model whose tokenizer counts chunk sizes (default: smollm2-135m)")
    d.add_argument("--chunk-tokens", type=int, default=512, help="Maximum tokens per chunk (default 512)")
    d.add_argument("--overlap", type=int, default=64, help="Tokens repeated when a paragraph is cut (default 64)")
    return parser


def _add_field_names(parser):
    from liandan.data.formats import FieldNames

    parser.add_argument("--prompt-feature", default=FieldNames.prompt)
    parser.add_argument("--completion-feature", default=FieldNames.completion)
    parser.add_argument("--text-feature", default=FieldNames.text)
    parser.add_argument("--chat-feature", default=FieldNames.chat)


def _tokenizer(model: str | None):
    from transformers import AutoTokenizer

    from liandan.models import resolve_model

    return AutoTokenizer.from_pretrained(str(resolve_model(model)))


def main(args: argparse.Namespace) -> int:
    if args.action == "check":
        from liandan.data.check import check, render_report
        from liandan.data.formats import FieldNames
        from liandan.data.render import Encoder, make_rendering

        target = Path(args.target)
        if not target.exists():
            raise LiandanError(f"{target}: no such file or directory")
        tokenizer = _tokenizer(args.model)
        encoder = Encoder(tokenizer, make_rendering(tokenizer))
        names = FieldNames(args.text_feature, args.prompt_feature, args.completion_feature, args.chat_feature)
        result = check(target, encoder, args.max_seq_length, names)
        lines, errors, warnings = render_report(result, encoder)
        if args.json:
            print(json.dumps({"files": [r.to_dict() for r in result["files"]], "leakage": result["leakage"],
                              "errors": errors, "warnings": warnings}, ensure_ascii=False, indent=2))
        else:
            print("\n".join(lines))
        return 2 if errors else 1 if warnings else 0
    if args.action == "prepare":
        from liandan.data.prepare import prepare

        prepare([Path(p) for p in args.inputs], Path(args.out), args.format, args.valid_ratio, args.test_ratio,
                args.seed, prompt=args.prompt, completion=args.completion, text=args.text, system=args.system)
        return 0
    from liandan.data.docs import from_docs

    if args.chunk_tokens <= 0:
        raise LiandanError(f"--chunk-tokens must be positive, got {args.chunk_tokens}")
    from_docs(Path(args.source), Path(args.out), _tokenizer(args.model), args.chunk_tokens, args.overlap)
    return 0
