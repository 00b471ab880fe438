"""The Ship tab: `liandan fuse`, `liandan export gguf` and `liandan export ollama` on a run's adapter."""

from __future__ import annotations

import argparse
import hashlib
import shlex
from pathlib import Path

from liandan.errors import LiandanError


FUSED_FROM = "fused-from.txt"  # in the ship folder: the adapter (weights and record) the fused model was made from


def fused_dir(ship_dir: Path) -> Path:
    return Path(ship_dir) / "fused_model"


def adapter_key(adapter_dir: Path) -> str:
    """What a fused model depends on: the adapter's weights and its record (rendering, base model)."""
    from liandan.adapters import RECORD
    from liandan.engines.gguf_cache import content_hash

    record = Path(adapter_dir) / RECORD
    return content_hash(Path(adapter_dir)) + (hashlib.sha256(record.read_bytes()).hexdigest()[:16]
                                              if record.is_file() else "")


def fuse_run(adapter_dir: Path, ship_dir: Path) -> str:
    """Fuse the run's adapter into the ship folder, replacing an earlier fuse: the folder is the studio's own."""
    from liandan.atomic import atomic_write_text
    from liandan.fuse import fuse

    said = []
    key = adapter_key(adapter_dir)
    fuse(None, Path(adapter_dir), fused_dir(ship_dir), log=said.append, overwrite=True)
    atomic_write_text(Path(ship_dir) / FUSED_FROM, key)
    return "\n".join(said)


def fused_for(adapter_dir: Path, ship_dir: Path) -> Path:
    """The ship folder, its fused model made from the adapter as it is now: fused (again) when it never was, or
    when the run has trained on (or was retrained) since, so an export never ships older weights."""
    from liandan.adapters import RECORD

    marker = Path(ship_dir) / FUSED_FROM
    current = (fused_dir(ship_dir) / RECORD).is_file() and marker.is_file()
    if not current or marker.read_text(encoding="utf-8") != adapter_key(adapter_dir):
        fuse_run(adapter_dir, ship_dir)
    return Path(ship_dir)


def _fused(ship_dir: Path) -> Path:
    from liandan.adapters import RECORD

    fused = fused_dir(ship_dir)
    if not (fused / RECORD).is_file():
        raise LiandanError(f"{fused}: fuse the adapter first")
    return fused


def export_gguf(ship_dir: Path, outtype: str) -> Path:
    """`liandan export gguf --model FUSED --outfile ... --outtype ...` (the CLI's own function)."""
    from liandan.export.cli import main

    outfile = Path(ship_dir) / f"model-{outtype}.gguf"
    main(_export_args("gguf", "--model", _fused(ship_dir), "--outfile", outfile, "--outtype", outtype, "--overwrite"))
    return outfile


def export_ollama(ship_dir: Path, name: str, outtype: str) -> tuple[Path, Path, str]:
    """`liandan export ollama`: (Modelfile, GGUF, the `ollama create` command to copy)."""
    from liandan.export.cli import main
    from liandan.export.ollama import default_folder, gguf_file_name

    out = Path(ship_dir) / default_folder(name)
    main(_export_args("ollama", "--model", _fused(ship_dir), "--name", name, "--out", out, "--outtype", outtype,
                      "--overwrite"))
    modelfile = out / "Modelfile"
    return modelfile, out / gguf_file_name(name), f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile.resolve()))}"


def _export_args(*argv) -> argparse.Namespace:
    """`liandan export ARGV` parsed by the CLI's own parser: every option gets the CLI's default. The page's
    exports replace the previous ones of the same run (made from the same or an older fused model)."""
    from liandan.export.cli import build_parser

    return build_parser(argparse.ArgumentParser(prog="liandan export")).parse_args([str(a) for a in argv])
