"""The GGUF files the llama.cpp engine runs, converted once and cached under the model cache.

* a LoRA adapter: the base model's GGUF (shared by every adapter of that base) + the adapter's
  LoRA GGUF, keyed by the adapter's content hash, so retraining into the same directory converts anew;
* a DoRA or full fine-tune (llama.cpp has no adapter format for them): fused once, then one GGUF;
* no adapter (a base or fused model directory): that directory's GGUF;
* a .gguf file given as --model (with no adapter, or a LoRA one): that file itself, never converted: a
  q4_k_m file converted would be requantized to --gguf-type, slower and answering differently.

Files are written atomically; a cached file that no longer parses is rebuilt, not crashed on.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from pathlib import Path


def engine_ggufs(pipe, outtype: str, rebuild: bool = False) -> tuple[Path, Path | None]:
    """(model GGUF, LoRA GGUF or None) for a pipeline loaded with load_pipeline(load_weights=False)."""
    from liandan.export.gguf import export_gguf, export_lora_gguf
    from liandan.models import cache_root

    root = cache_root() / "gguf"
    adapter = pipe.adapter_path
    if adapter is not None and _needs_fusing(adapter, pipe.record):  # the fused weights: adapter and base
        key = hashlib.sha256(f"{content_hash(adapter)}|{_dir_key(pipe.model_dir)}".encode()).hexdigest()[:16]
        fused = _fused_dir(pipe, key)
        return cached(root / f"fused-{adapter.name}-{key}-{outtype}.gguf",
                      lambda out: export_gguf(fused, out, outtype, log=_note), rebuild), None
    model_dir = pipe.model_dir
    base = pipe.gguf_file or cached(root / f"{model_dir.name}-{_dir_key(model_dir)}-{outtype}.gguf",
                                    lambda out: export_gguf(model_dir, out, outtype, name=model_dir.name, log=_note),
                                    rebuild)
    if adapter is None:
        return base, None
    lora = cached(root / f"lora-{adapter.name}-{content_hash(adapter)}.gguf",
                  lambda out: export_lora_gguf(adapter, out, "f32", log=_note), rebuild)
    return base, lora


def cached(path: Path, build, rebuild: bool = False) -> Path:
    """`path` if it holds a readable GGUF, else built (again) by `build(path)`."""
    if path.is_file() and not rebuild and readable_gguf(path):
        return path
    if path.exists():
        _note(f"The cached {path.name} is unreadable; rebuilding it")
        path.unlink()
    path.parent.mkdir(parents=True, exist_ok=True)
    _note(f"Converting for llama.cpp (once): {path}")
    build(path)
    return path


def readable_gguf(path: Path) -> bool:
    """The header parses and every tensor's data lies inside the file (a truncated copy fails). Checked at every
    llama.cpp engine start, so with liandan's header walker (export.quantize.tensor_table), not gguf.GGUFReader."""
    import gguf

    from liandan.export.quantize import tensor_table

    try:
        table, start, size = tensor_table(path)
        for dims, kind, offset in table:
            block, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(kind)]
            if start + offset + math.prod(dims) // block * block_bytes > size:
                return False
        return True
    except Exception:  # a damaged file fails in many ways (struct errors, unknown types, not GGUF)
        return False


def content_hash(adapter: Path) -> str:
    """sha256 of the adapter's weights and PEFT config: what the converted files depend on."""
    from liandan.adapters import FULL_WEIGHTS, PEFT_CONFIG, PEFT_WEIGHTS

    digest = hashlib.sha256()
    for name in (PEFT_CONFIG, PEFT_WEIGHTS, FULL_WEIGHTS):
        path = adapter / name
        if path.is_file():
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
    return digest.hexdigest()[:16]


def _dir_key(model_dir: Path) -> str:
    """A model directory's identity: its path and the size and mtime of its weights and config
    (hashing gigabytes of base weights at every start would cost more than the conversion saves)."""
    from liandan.models import weight_files

    parts = [str(model_dir.resolve())]
    for path in weight_files(model_dir) + [model_dir / "config.json"]:
        stat = path.stat()
        parts.append(f"{path.name}|{stat.st_size}|{stat.st_mtime_ns}")
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:12]


def _needs_fusing(adapter: Path, record: dict) -> bool:
    if record.get("fine_tune_type") in ("dora", "full"):
        return True
    from liandan.adapters import PEFT_CONFIG

    config = adapter / PEFT_CONFIG
    return config.is_file() and bool(json.loads(config.read_text(encoding="utf-8")).get("use_dora"))


def _fused_dir(pipe, key: str) -> Path:
    from liandan.fuse import fuse
    from liandan.models import cache_root

    fused = cache_root() / "fused" / f"{pipe.adapter_path.name}-{key}"
    if not (fused / "config.json").is_file():
        fuse(str(pipe.model_dir), pipe.adapter_path, fused, log=_note)
    return fused


def _note(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
