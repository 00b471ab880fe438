"""`liandan <command>`: parse arguments and dispatch to the command's module. No logic here."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from liandan import __version__

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
    "demo": ("liandan.demo", "The seed's joke dataset, end to end, on the embedded model"),
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
    parser = build_parser()
    if not argv or argv[0] not in COMMANDS:
        parser.parse_args(argv or ["--help"])
        return
    _quiet_libraries()
    module = importlib.import_module(COMMANDS[argv[0]][0])
    command_parser = OneLineErrors(prog=f"liandan {argv[0]}", description=COMMANDS[argv[0]][1])
    args = module.build_parser(command_parser).parse_args(argv[1:])
    sys.exit(run(module.main, args))


class OneLineErrors(argparse.ArgumentParser):
    """A bad flag is one line, like every other liandan error (argparse would print the whole usage first)."""

    def error(self, message: str):
        self.exit(2, f"liandan: error: {message} (see {self.prog} --help)\n")


def run(func, args) -> int:
    """Run a command; user errors become one line on stderr with exit code 2, never a traceback."""
    from liandan.errors import LiandanError

    try:
        return func(args) or 0
    except LiandanError as exc:
        print(f"liandan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("liandan: interrupted", file=sys.stderr)
        return 130


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
