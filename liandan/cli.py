"""`liandan <command>`: parse arguments, dispatch to the command's module, and turn what goes wrong into one
line and an exit code (errors.py). No command logic here."""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
import traceback
from pathlib import Path

from liandan import __version__
from liandan.errors import EXIT_INPUT, EXIT_INTERNAL

# command -> (module, one-line help). Modules are imported only when their command runs,
# so `liandan --help` stays instant.
COMMANDS = {
    "data": ("liandan.data.cli", "Check, prepare and split training data; turn documents into training text"),
    "lora": ("liandan.lora", "Fine-tune with LoRA, DoRA or full fine-tuning, and/or test (mlx_lm.lora flags)"),
    "generate": ("liandan.generate", "Generate a completion for one prompt (mlx_lm.generate flags)"),
    "fuse": ("liandan.fuse", "Merge an adapter into its base model: a standalone Hugging Face model (and GGUF)"),
    "export": ("liandan.export.cli", "Export GGUF files and Ollama Modelfiles"),
    "chat": ("liandan.chat", "Chat with a model or adapter in the terminal (multi-turn, streamed)"),
    "serve": ("liandan.serve", "An OpenAI-compatible HTTP API (binds 127.0.0.1 unless told otherwise)"),
    "docs": ("liandan.docs.cli", "Index documents for --docs (BM25) and try queries against the index"),
    "eval": ("liandan.docs.eval", "Compare base, base + docs, adapter, adapter + docs on the same questions"),
    "demo": ("liandan.demo", "The seed's joke dataset, end to end, on the embedded model"),
    "studio": ("liandan.studio.cli", "The whole workflow in a local web page (needs liandan[studio])"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="liandan", description="Fine-tune LLMs on your own machine.")
    parser.add_argument("--version", action="version", version=f"liandan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        sub.add_parser(name, help=help_text, description=help_text)
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    _printable_output()
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return
    sys.exit(run(_dispatch, argv))


def _printable_output() -> None:
    """A terminal whose encoding lacks a character (an ASCII or Latin-1 locale) gets it as \\uXXXX, as Python's own
    stderr does, instead of a UnicodeEncodeError ending a chat or losing a generated answer."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _dispatch(argv: list[str]) -> int:
    _quiet_libraries()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = OneLineErrors(prog=f"liandan {argv[0]}", description=COMMANDS[argv[0]][1])
    args = module.build_parser(command_parser).parse_args(argv[1:])
    return module.main(args)




class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line, like every other liandan error (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(EXIT_INPUT, f"liandan: error: {message} (see {self.prog} --help)\n")


def run(func, args) -> int:
    """Run a command; user errors become one line on stderr with exit code 2, bugs one line with exit
    code 3 and the traceback in a log file, never a traceback on the terminal."""
    from liandan.errors import LiandanError

    try:
        return func(args) or 0
    except LiandanError as exc:
        print(f"liandan: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("liandan: interrupted", file=sys.stderr)
        return 130
    except OSError as exc:
        if exc.filename is None and exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            return _internal_error(exc)
        # A path the system refused (permissions, a file where a folder should be) or a full disk: the user's to
        # fix, so one line; the traceback still goes to the log in case a check of liandan's should have caught it.
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"liandan: error: {where}{exc.strerror or exc} (details in {_log_traceback()})", file=sys.stderr)
        if os.environ.get("LIANDAN_DEBUG") == "1":
            traceback.print_exc()
        return EXIT_INPUT
    except Exception as exc:  # the top-level guard: anything else is a bug in liandan
        return _internal_error(exc)


def _internal_error(exc: Exception) -> int:
    log = _log_traceback()
    message = " ".join(str(exc).split())[:300]
    print(f"liandan: internal error: {type(exc).__name__}: {message} (please report; details in {log})",
          file=sys.stderr)
    if os.environ.get("LIANDAN_DEBUG") == "1":
        traceback.print_exc()
    return EXIT_INTERNAL


def _log_traceback() -> str:
    """Write the current exception's traceback to a new file under the cache (else the temp dir)."""
    import tempfile
    import time

    from liandan.models import cache_root

    text = f"liandan {__version__}, python {sys.version.split()[0]}\nargv: {sys.argv!r}\n\n{traceback.format_exc()}"
    name = f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    for folder in (cache_root() / "logs", Path(tempfile.gettempdir())):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_text(text, encoding="utf-8")
            return str(folder / name)
        except OSError:
            continue
    return "nowhere (no writable cache or temp directory; rerun with LIANDAN_DEBUG=1)"


def _quiet_libraries() -> None:
    # transformers' info/warning chatter buries liandan's own messages; errors still show.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
