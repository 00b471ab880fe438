"""`liandan docs index|search`: build a saved document index, and try queries against it."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from liandan.docs.prompt import DEFAULT_TOP_K
from liandan.errors import LiandanError


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    i = sub.add_parser("index", help="Index a folder of Markdown/text/HTML documents (BM25) into a directory")
    i.add_argument("source", help="A folder of documents (searched recursively) or one file")
    i.add_argument("--out", required=True, help="Index directory to write")
    i.add_argument("--overwrite", action="store_true", help="Replace an index of other files in --out")
    s = sub.add_parser("search", help="Show the chunks a question retrieves")
    s.add_argument("docs", help="A saved index or a folder of documents (indexed via the cache)")
    s.add_argument("--query", "-q", required=True, help="The question")
    s.add_argument("--top-k", type=int, default=DEFAULT_TOP_K, help=f"How many chunks (default {DEFAULT_TOP_K})")
    s.add_argument("--json", action="store_true", help="Print the hits as JSON")
    return parser


def main(args: argparse.Namespace) -> int:
    from liandan.docs.index import build_index, open_docs

    if args.action == "index":
        start = time.perf_counter()
        index = build_index(Path(args.source), Path(args.out), args.overwrite)
        m = index.manifest
        print(f"Indexed {len(m['files']) - m['skipped']} file(s), {m['chunks']} chunk(s) in "
              f"{time.perf_counter() - start:.1f}s → {args.out}")
        return 0
    if args.top_k < 1:
        raise LiandanError(f"--top-k must be at least 1, got {args.top_k}")
    index = open_docs(args.docs)
    hits = index.search(args.query, args.top_k)
    if args.json:
        print(json.dumps([{"rank": h.rank, "score": h.score, **h.chunk.to_dict()} for h in hits], ensure_ascii=False, indent=2))
        return 0
    for h in hits:
        print(f"[{h.rank}] {h.score:.2f}  {h.chunk.source} — {h.chunk.section}\n{h.chunk.text}\n")
    if not hits:
        print("(no chunk shares a word with the query)")
    return 0
