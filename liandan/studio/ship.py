"""The Ship tab: `liandan fuse`, `liandan export gguf` and `liandan export ollama` on a run's adapter."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from liandan.errors import LiandanError


def fused_dir(ship_dir: Path) -> Path:
    return Path(ship_dir) / "fused_model"


def fuse_run(adapter_dir: Path, ship_dir: Path) -> str:
    from liandan.fuse import fuse

    said = []
    fuse(None, Path(adapter_dir), fused_dir(ship_dir), log=said.append)
    return "\n".join(said)


def _fused(ship_dir: Path) -> Path:
    fused = fused_dir(ship_dir)
    if not (fused / "liandan.json").is_file():
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

    out = Path(ship_dir) / f"{name}-ollama"
    main(_export_args("ollama", "--model", _fused(ship_dir), "--name", name, "--out", out, "--outtype", outtype,
                      "--overwrite"))
    modelfile = out / "Modelfile"
    return modelfile, out / f"{name}.gguf", f"ollama create {shlex.quote(name)} -f {shlex.quote(str(modelfile.resolve()))}"


def _export_args(*argv) -> argparse.Namespace:
    """`liandan export ARGV` parsed by the CLI's own parser: every option gets the CLI's default. The page's
    exports replace the previous ones of the same run (the fused model they come from was just rebuilt)."""
    from liandan.export.cli import build_parser

    return build_parser(argparse.ArgumentParser(prog="liandan export")).parse_args([str(a) for a in argv])
