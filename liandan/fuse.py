"""`liandan fuse`: merge the adapter into the base weights and write a standalone Hugging Face model.

The fused directory carries the training-time prompt format with it: `chat_template.jinja` is the
template used in training, `generation_config.json` lists the trained stop tokens as EOS ids, and
`liandan.json` keeps the full rendering record (system prompt included). Plain transformers,
vLLM, llama.cpp's converter and liandan's own GGUF exporter all read those files.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from liandan.adapters import RECORD
from liandan.config import TrainConfig
from liandan.data.render import CHAT_TEMPLATE_HELP
from liandan.errors import LiandanError
from liandan.export.quantize import OUTTYPE_HELP


GGUF_OUTTYPE = "f16"  # --export-gguf's default, as mlx_lm's fuse writes


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="Base model (default: the adapter's base model)")
    adapters = TrainConfig.adapter_path  # where `liandan lora` saves by default
    parser.add_argument("--adapter-path", default=adapters, help=f"Adapter directory (default: {adapters})")
    parser.add_argument("--save-path", default="fused_model", help="Where to write the fused model (default: fused_model)")
    parser.add_argument("--export-gguf", action="store_true", help="Also write a GGUF file for llama.cpp / Ollama")
    parser.add_argument("--gguf-path", default=None, help="GGUF file (default: SAVE_PATH/ggml-model-OUTTYPE.gguf)")
    parser.add_argument("--outtype", default=None, help=f"GGUF tensor type: {OUTTYPE_HELP} (default {GGUF_OUTTYPE})")
    parser.add_argument("--dequantize", action="store_true",
                        help="Accepted for mlx_lm compatibility: liandan always fuses into dequantized weights")
    parser.add_argument("--chat-template", help=CHAT_TEMPLATE_HELP)
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model directory")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace an existing --save-path / --gguf-path (other files in --save-path are kept, "
                             "but not the old model's weights and GGUFs)")
    return parser


def fuse(model_spec: str | None, adapter_path: Path, save_path: Path, trust_remote_code: bool = False, log=print,
         overwrite: bool = False, chat_template: str | None = None) -> dict:
    """Merge and save; returns the rendering record used."""
    import torch

    from liandan.adapters import base_model_of, load_adapter, read_record
    from liandan.atomic import atomic_dir, check_output
    from liandan.data.render import rendering_of, stop_token_ids
    from liandan.models import Device, load_model, resolve_model

    adapter_path, save_path = Path(adapter_path), Path(save_path)
    check_output(save_path, "--save-path", {"--adapter-path": adapter_path}, overwrite, directory=True)
    record = read_record(adapter_path)
    model_spec = base_model_of(adapter_path, record, model_spec)
    model_dir = resolve_model(model_spec)
    check_output(save_path, "--save-path", {"the base model": model_dir, "--model": Path(model_spec) if model_spec else None},
                 overwrite, directory=True)
    save_dtype = _saved_dtype(model_dir)
    # Merge in fp32 so the fused weights equal base + scale * B @ A to the last bit we can keep.
    model, tokenizer = load_model(model_dir, Device("cpu", torch.float32), trust_remote_code)
    model = load_adapter(model, adapter_path, record)
    if hasattr(model, "merge_and_unload"):
        model = model.merge_and_unload()
    rendering = rendering_of(record, tokenizer, chat_template=chat_template)
    tokenizer.chat_template = rendering.chat_template
    stops = stop_token_ids(tokenizer, model, rendering)
    model.generation_config.eos_token_id = stops if len(stops) > 1 else stops[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    if save_dtype is not None:
        model.to(save_dtype)
    fused_record = dict(record, base_model=str(model_spec), fused_from=str(adapter_path.resolve()),
                        rendering=rendering.to_dict())
    with atomic_dir(save_path, keep_others=not_weights) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / RECORD).write_text(json.dumps(fused_record, indent=2, ensure_ascii=False), encoding="utf-8")
    log(f"Saved the fused model to {save_path}")
    return fused_record


def not_weights(name: str) -> bool:
    """Files of an earlier fused model that --overwrite does not carry into the new one: its weights (a shard the
    new model lacks would be read as part of it) and GGUFs made from them; other files the user kept stay."""
    return not (name.endswith((".safetensors", ".gguf", ".bin", ".pt", ".pth")) or name.endswith(".index.json"))


def _saved_dtype(model_dir: Path):
    """Keep the base model's storage precision (a bf16 checkpoint stays bf16 on disk)."""
    import torch

    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    name = config.get("dtype") or config.get("torch_dtype")
    return getattr(torch, name, None) if isinstance(name, str) else None


def main(args: argparse.Namespace) -> int:
    from liandan.adapters import base_model_of, read_record
    from liandan.data.render import Rendering
    from liandan.export.gguf import export_gguf
    from liandan.atomic import check_output
    from liandan.export.quantize import usable_outtype

    if not Path(args.adapter_path).is_dir():
        raise LiandanError(f"--adapter-path {args.adapter_path}: not a directory")
    if not args.export_gguf and (args.gguf_path or args.outtype):  # else the user waits for a GGUF never written
        raise LiandanError(f"{'--gguf-path' if args.gguf_path else '--outtype'} applies to the GGUF; add --export-gguf")
    if args.export_gguf:
        args.outtype = usable_outtype(args.outtype or GGUF_OUTTYPE)  # a bad --outtype stops before the merge, not after it
        if args.gguf_path:
            base = base_model_of(Path(args.adapter_path), read_record(Path(args.adapter_path)), args.model)
            check_output(args.gguf_path, "--gguf-path", {"--adapter-path": Path(args.adapter_path),
                                                         "--model": Path(base) if base else None}, args.overwrite)
    record = fuse(args.model, Path(args.adapter_path), Path(args.save_path), args.trust_remote_code,
                  overwrite=args.overwrite, chat_template=args.chat_template)
    if args.export_gguf:
        rendering = Rendering.from_dict(record["rendering"])
        gguf_path = Path(args.gguf_path) if args.gguf_path else Path(args.save_path) / f"ggml-model-{args.outtype}.gguf"
        export_gguf(Path(args.save_path), gguf_path, args.outtype, rendering.chat_template, rendering.stop_tokens)
    return 0
