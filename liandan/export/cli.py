"""`liandan export gguf|ollama`."""

from __future__ import annotations

import argparse
from pathlib import Path

from liandan.data.render import CHAT_TEMPLATE_HELP
from liandan.engines import require_llama_cpp
from liandan.errors import LiandanError
from liandan.models import DEFAULT_MODEL
from liandan.export.quantize import OUTTYPE_HELP, usable_outtype


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    sub = parser.add_subparsers(dest="target", metavar="TARGET", required=True)
    g = sub.add_parser("gguf", help="A GGUF file for llama.cpp: a whole model (--model) or a LoRA adapter (--adapter-path)")
    g.add_argument("--model", help=f"Hugging Face model directory (e.g. from `liandan fuse`), .gguf or {DEFAULT_MODEL}")
    g.add_argument("--adapter-path", help="Export this LoRA adapter alone (for llama.cpp --lora / Ollama ADAPTER)")
    g.add_argument("--outfile", required=True, help="GGUF file to write")
    g.add_argument("--outtype", default="f16", help=f"Tensor type: {OUTTYPE_HELP} (default f16)")
    g.add_argument("--check", action="store_true",
                   help="Also measure the file's perplexity on the validation set in llama.cpp, vs f32")
    g.add_argument("--data", default=None, help="Data directory for --check (default: the one recorded in training)")
    g.add_argument("--overwrite", action="store_true", help="Replace an existing --outfile")
    g.add_argument("--chat-template", help=CHAT_TEMPLATE_HELP)
    o = sub.add_parser("ollama", help="A GGUF and a Modelfile whose TEMPLATE and stop tokens match training")
    o.add_argument("--model", required=True, help="Fused model directory (from `liandan fuse`) or any HF model directory")
    o.add_argument("--name", required=True, help="Ollama model name")
    o.add_argument("--out", default=None, help="Output directory (default: ./NAME-ollama)")
    o.add_argument("--system", default=None, help="SYSTEM prompt (default: the one used in training)")
    o.add_argument("--outtype", default="q8_0", help=f"Tensor type: {OUTTYPE_HELP} (default q8_0)")
    o.add_argument("--overwrite", action="store_true", help="Replace an existing NAME.gguf / Modelfile in --out")
    o.add_argument("--chat-template", help=CHAT_TEMPLATE_HELP)
    return parser


def main(args: argparse.Namespace) -> int:
    from liandan.atomic import check_output
    from liandan.models import resolve_model

    args.outtype = usable_outtype(args.outtype)
    if getattr(args, "data", None) and not args.check:  # else the user waits for a measurement never made
        raise LiandanError("--data is the validation data of --check; add --check")
    if getattr(args, "check", False):
        require_llama_cpp("--check")
    if args.target == "gguf":
        from liandan.export.gguf import export_gguf, export_lora_gguf

        if args.adapter_path and args.check:
            raise LiandanError("--check measures a whole model; for an adapter, `liandan fuse` it and check the fused model")
        if args.adapter_path:
            check_output(args.outfile, "--outfile", {"--adapter-path": Path(args.adapter_path)}, args.overwrite)
            export_lora_gguf(Path(args.adapter_path), Path(args.outfile), args.outtype, base=args.model)
            return 0
        model_dir = resolve_model(args.model)
        check_output(args.outfile, "--outfile", _model_inputs(args.model, model_dir), args.overwrite)
        if args.check:
            from liandan.export.quality import validation_items

            validation_items(model_dir, args.data)  # missing validation data: said now, not after the export
        from liandan.adapters import read_record
        from liandan.data.render import Rendering, rendering_of

        record = read_record(model_dir, required=False)
        rendering = Rendering.from_dict(record["rendering"]) if record.get("rendering") else None
        if args.chat_template:
            from transformers import AutoTokenizer

            rendering = rendering_of(record, AutoTokenizer.from_pretrained(str(model_dir)), chat_template=args.chat_template)
        export_gguf(model_dir, Path(args.outfile), args.outtype, rendering.chat_template if rendering else None,
                    rendering.stop_tokens if rendering else None)
        if args.check:
            from liandan.export.quality import check

            check(model_dir, Path(args.outfile), args.outtype, args.data)
        return 0
    from liandan.export.ollama import check_ollama_name, default_folder, export_ollama, gguf_file_name

    check_ollama_name(args.name)
    model_dir, out = resolve_model(args.model), Path(args.out or default_folder(args.name))
    reads = _model_inputs(args.model, model_dir)
    check_output(out, "--out", reads, overwrite=True, directory=True)
    for name in (gguf_file_name(args.name), "Modelfile"):
        check_output(out / name, "--out", reads, args.overwrite)
    export_ollama(model_dir, args.name, out, args.system, args.outtype, chat_template=args.chat_template)
    return 0


def _model_inputs(spec: str | None, model_dir: Path) -> dict:
    """What an export reads: the --model path as given (a .gguf file, a directory) and the resolved model directory."""
    return {"--model": Path(spec) if spec else None, "the model": model_dir}
