"""`liandan export gguf|ollama`."""

from __future__ import annotations

import argparse
from pathlib import Path

from liandan.errors import LiandanError
from liandan.export.gguf import OUTTYPES


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    g = sub.add_parser("gguf", help="A GGUF file for llama.cpp: a whole model (--model) or a LoRA adapter (--adapter-path)")
    g.add_argument("--model", help="Hugging Face model directory (e.g. from `liandan fuse`), .gguf or smollm2-135m")
    g.add_argument("--adapter-path", help="Export this LoRA adapter alone (for llama.cpp --lora / Ollama ADAPTER)")
    g.add_argument("--outfile", required=True, help="GGUF file to write")
    g.add_argument("--outtype", default="f16", choices=OUTTYPES, help="Tensor type (default f16)")
    o = sub.add_parser("ollama", help="A GGUF and a Modelfile whose TEMPLATE and stop tokens match training")
    o.add_argument("--model", required=True, help="Fused model directory (from `liandan fuse`) or any HF model directory")
    o.add_argument("--name", required=True, help="Ollama model name")
    o.add_argument("--out", default=None, help="Output directory (default: ./NAME-ollama)")
    o.add_argument("--system", default=None, help="SYSTEM prompt (default: the one used in training)")
    o.add_argument("--outtype", default="q8_0", choices=OUTTYPES, help="Tensor type (default q8_0)")
    return parser


def main(args: argparse.Namespace) -> int:
    from liandan.models import resolve_model

    if args.target == "gguf":
        from liandan.export.gguf import export_gguf, export_lora_gguf

        if args.adapter_path:
            export_lora_gguf(Path(args.adapter_path), Path(args.outfile), args.outtype)
            return 0
        model_dir = resolve_model(args.model)
        from liandan.adapters import read_record
        from liandan.data.render import Rendering

        record = read_record(model_dir, required=False)
        rendering = Rendering.from_dict(record["rendering"]) if record.get("rendering") else None
        export_gguf(model_dir, Path(args.outfile), args.outtype, rendering.chat_template if rendering else None,
                    rendering.stop_tokens if rendering else None)
        return 0
    from liandan.export.ollama import export_ollama

    if not args.name.replace("-", "").replace("_", "").replace(".", "").replace(":", "").isalnum():
        raise LiandanError(f"--name {args.name!r}: use letters, digits, '-', '_', '.' and ':' only")
    export_ollama(resolve_model(args.model), args.name, Path(args.out or f"{args.name}-ollama"), args.system, args.outtype)
    return 0
