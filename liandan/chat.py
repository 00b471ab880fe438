"""`liandan chat`: a multi-turn REPL, streamed, rendered exactly as in training.

History is kept as messages and re-rendered with the chat template each turn; when it no longer
fits the context window (with room for the answer), the oldest exchanges are dropped.
"""

from __future__ import annotations

import argparse
import sys

from liandan.errors import LiandanError

HELP = "Commands: /reset (forget the conversation), /exit (or Ctrl-D)."


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from liandan.generate import add_inference_args

    return add_inference_args(parser, max_tokens=512)


def fit_history(encoder, history: list[dict], context: int, max_tokens: int,
                prefix: list[dict] = ()) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges until the rendered prompt (prefix: a system turn of --docs) leaves max_tokens of room."""
    while True:
        ids = encoder.prompt_ids(list(prefix) + history)
        if len(ids) + max_tokens <= context or len(history) <= 1:
            return history, ids
        history = history[2:] if len(history) > 2 else history[-1:]


def is_text(line: str) -> bool:
    """False, with a one-line note, for a line that is not UTF-8 text (a paste in another encoding), so that it
    costs that line and not the session (the tokenizer would raise a TypeError on it)."""
    from liandan.generate import check_text

    try:
        check_text(line, "this message")
    except LiandanError as exc:
        print(f"({exc}; not sent)", flush=True)
        return False
    return True


def main(args: argparse.Namespace) -> int:
    from liandan.engines import engine_from_args
    from liandan.generate import TextStreamer, check_inference_args, sampling_of
    from liandan.reasoning import ShownAnswer, split_text, splitter_for

    check_inference_args(args)
    engine = engine_from_args(args)
    sampling = sampling_of(args)
    pipe = engine.pipe
    docs = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        docs = DocsContext.open(args.docs, pipe.record, args.top_k)
    interactive = sys.stdin.isatty()
    if hasattr(sys.stdin, "reconfigure"):  # an undecodable line then arrives as text that check_text refuses, instead
        sys.stdin.reconfigure(errors="surrogateescape")  # of a UnicodeDecodeError that would end the session
    if pipe.encoder.rendering.prompt_style == "raw":  # chat is turns in the chat template, whatever training saw
        print("Note: this adapter was trained on plain text, not chat turns; chat wraps your messages in the chat "
              "template. To continue text as it was trained, use `liandan generate -p TEXT`.", file=sys.stderr, flush=True)
    print(f"liandan chat — {HELP}", flush=True)
    history: list[dict] = []
    while True:
        try:
            line = input(">>> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = []
            print("(conversation reset)", flush=True)
            continue
        if line.startswith("/"):
            print(HELP, flush=True)
            continue
        if not is_text(line):
            continue
        asked = [{"role": "user", "content": line}]
        if docs:  # the question with its retrieved chunks; a layout may put them in a system turn of this prompt only
            asked, _ = docs.apply(asked)
        history, ids = fit_history(pipe.encoder, history + asked[-1:], engine.context, args.max_tokens, asked[:-1])
        if len(ids) >= engine.context:
            print("(this message alone is longer than the context window)", flush=True)
            history = []
            continue
        text, answer = TextStreamer(pipe.tokenizer), ""
        show = ShownAnswer(splitter_for(pipe.encoder), show_thinking=True, dim=True)  # reasoning shown dimmed
        for token in engine.stream(ids, min(args.max_tokens, engine.context - len(ids)), sampling):
            piece = text.add(token)
            answer += piece
            show.feed(piece)
        show.finish()
        print(flush=True)
        # History keeps the answer alone, as templates of thinking models render past turns.
        history.append({"role": "assistant", "content": split_text(splitter_for(pipe.encoder), answer)[1]})
    return 0
