"""`liandan chat`: a multi-turn REPL, streamed, rendered exactly as in training.

History is kept as messages and re-rendered with the chat template each turn; when it no longer
fits the context window (with room for the answer), the oldest exchanges are dropped.
"""

from __future__ import annotations

import argparse
import sys

HELP = "Commands: /reset (forget the conversation), /exit (or Ctrl-D)."


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="Base model (default: the adapter's base model, else smollm2-135m)")
    parser.add_argument("--adapter-path", help="Adapter directory written by `liandan lora`")
    parser.add_argument("--system-prompt", default=None, help="System prompt (default: the one used in training)")
    parser.add_argument("--max-tokens", "-m", type=int, default=512, help="Maximum tokens per answer (default 512)")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model directory")
    parser.add_argument("--docs", help="Answer from these documents: a folder (Markdown/text/HTML) or a `liandan docs index`")
    parser.add_argument("--top-k", type=int, default=None, help="Chunks put in the prompt with --docs (default 3)")
    return parser


def fit_history(encoder, history: list[dict], context: int, max_tokens: int) -> tuple[list[dict], list[int]]:
    """Drop the oldest exchanges until the rendered prompt leaves max_tokens of room."""
    while True:
        ids = encoder.prompt_ids(history)
        if len(ids) + max_tokens <= context or len(history) <= 1:
            return history, ids
        history = history[2:] if len(history) > 2 else history[-1:]


def main(args: argparse.Namespace) -> int:
    from liandan.generate import TextStreamer, load_pipeline, stream

    pipe = load_pipeline(args.model, args.adapter_path, args.system_prompt, dtype=args.dtype,
                         trust_remote_code=args.trust_remote_code)
    context = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 2048)
    docs = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        docs = DocsContext.open(args.docs, pipe.record, args.top_k)
    interactive = sys.stdin.isatty()
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
        content = docs.prompt(line)[0] if docs else line  # the question with its retrieved chunks
        history, ids = fit_history(pipe.encoder, history + [{"role": "user", "content": content}], context, args.max_tokens)
        if len(ids) >= context:
            print("(this message alone is longer than the context window)", flush=True)
            history = []
            continue
        text, answer = TextStreamer(pipe.tokenizer), ""
        for token in stream(pipe.model, ids, args.max_tokens, pipe.stop_ids, pipe.device.torch_device, args.temp,
                            args.top_p, 0.0, args.seed):
            piece = text.add(token)
            answer += piece
            print(piece, end="", flush=True)
        print(flush=True)
        history.append({"role": "assistant", "content": answer})
    return 0
