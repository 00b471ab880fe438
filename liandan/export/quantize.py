"""k-quant and legacy-quant GGUF files, made by llama.cpp's own quantizer (through llama-cpp-python).

The `gguf` package can write only the block types with a simple formula (Q8_0, Q4_0, ...); the
k-quants people run (q4_K_M, q5_K_M, q6_K) need llama.cpp's quantizer, which also chooses a type per
tensor (the "_M" mixes keep attention values and the FFN down projection at more bits). So liandan
writes its own f16 GGUF, hands it to `llama_model_quantize`, and deletes it again.

k-quant blocks are 256 values wide. A tensor whose rows are not a multiple of 256 gets llama.cpp's
fallback type instead (in llama-cpp-python 0.3.36: Q2_K/Q3_K → Q4_0, Q4_K → Q5_0, Q5_K → Q5_1,
Q6_K → Q8_0); SmolLM2-135M's hidden size is 576, so all its tensors but the FFN down projections do.
`export` prints the types each file really holds.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
import tempfile
from collections import Counter
from contextlib import contextmanager
from pathlib import Path

from liandan.engines import require_llama_cpp
from liandan.errors import LiandanError

# Every --outtype and what produces it: None = liandan's own GGUF writer (export/gguf.py) writes it;
# otherwise llama-cpp-python's LLAMA_FTYPE_* constant that llama.cpp's quantizer makes from liandan's f16 file.
OUTTYPES: dict[str, str | None] = {
    "f32": None,
    "f16": None,
    "bf16": None,
    "q8_0": None,
    "q6_k": "LLAMA_FTYPE_MOSTLY_Q6_K",
    "q5_k_m": "LLAMA_FTYPE_MOSTLY_Q5_K_M",
    "q5_0": "LLAMA_FTYPE_MOSTLY_Q5_0",
    "q4_k_m": "LLAMA_FTYPE_MOSTLY_Q4_K_M",
    "q4_0": "LLAMA_FTYPE_MOSTLY_Q4_0",
    "q3_k_m": "LLAMA_FTYPE_MOSTLY_Q3_K_M",
    "q2_k": "LLAMA_FTYPE_MOSTLY_Q2_K",
}
QUANTIZER_INPUT = "f16"  # what llama.cpp's own workflow quantizes from (convert_hf_to_gguf → llama-quantize)
OUTTYPE_HELP = ", ".join(OUTTYPES)
GGML_LOG_LEVEL_ERROR = 4  # ggml.h's enum (the table in llama_cpp/_logger.py predates DEBUG moving to 1)


def check_outtype(outtype: str) -> str:
    """The outtype in liandan's spelling (llama.cpp writes Q4_K_M), or a one-line error listing the types."""
    name = outtype.lower()
    if name not in OUTTYPES:
        raise LiandanError(f"--outtype {outtype}: expected one of {OUTTYPE_HELP}")
    return name


def usable_outtype(outtype: str) -> str:
    """check_outtype, and for llama.cpp's types the install hint now rather than after minutes of work."""
    name = check_outtype(outtype)
    if OUTTYPES[name]:
        require_llama_cpp(f"--outtype {name}")
    return name


def export_quantized(model_dir: Path, outfile: Path, outtype: str, chat_template: str | None = None,
                     stop_tokens: list[str] | None = None, name: str | None = None, log=print) -> Path:
    """liandan's f16 GGUF of the model, quantized by llama.cpp into `outfile` (written atomically)."""
    from liandan.atomic import atomic_path
    from liandan.export.gguf import export_gguf

    outtype = check_outtype(outtype)
    llama_cpp = require_llama_cpp(f"--outtype {outtype}")  # before any work: fail fast
    outfile = Path(outfile)
    outfile.parent.mkdir(parents=True, exist_ok=True)
    # Next to the output (same disk) and removed whatever happens.
    with tempfile.TemporaryDirectory(prefix=f".{outfile.name}.", dir=outfile.parent) as scratch:
        source = export_gguf(model_dir, Path(scratch) / f"model-{QUANTIZER_INPUT}.gguf", QUANTIZER_INPUT,
                             chat_template, stop_tokens, name, log=lambda *_: None)
        with atomic_path(outfile) as tmp:
            quantize_file(llama_cpp, source, tmp, outtype)
    log(f"Wrote {outfile} ({outtype} by llama.cpp's quantizer from liandan's {QUANTIZER_INPUT} GGUF, "
        f"{outfile.stat().st_size / 1e6:.1f} MB; tensors: {describe_types(outfile)})")
    return outfile


def quantize_file(llama_cpp, source: Path, target: Path, outtype: str) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, OUTTYPES[outtype])
    with _captured_log(llama_cpp) as errors:
        status = llama_cpp.llama_model_quantize(str(source).encode(), str(target).encode(), ctypes.byref(params))
    if status != 0:
        reason = "; ".join(e for e in errors if e) or f"status {status}"
        raise LiandanError(f"llama.cpp could not quantize {source.name} to {outtype}: {reason}")


@contextmanager
def _captured_log(llama_cpp):
    """Keep llama.cpp's per-tensor chatter off the terminal, but collect its errors for the message."""
    errors: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, _user_data):
        if level == GGML_LOG_LEVEL_ERROR:
            errors.append(text.decode("utf-8", "replace").strip())

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield errors
    finally:
        from llama_cpp import _logger

        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def tensor_types(path: Path) -> Counter:
    """How many tensors of each GGML type a GGUF file holds, e.g. Counter({'Q5_0': 90, 'F32': 61, ...})."""
    import gguf

    return Counter(gguf.GGMLQuantizationType(kind).name for _, kind, _ in tensor_table(path)[0])


def tensor_table(path: Path) -> tuple[list[tuple[tuple, int, int]], int, int]:
    """([(dims, GGML type, data offset)] of each tensor, where the data section starts, the file size).

    Walks the header itself: gguf.GGUFReader builds a numpy view per vocabulary entry, 3.3 CPU s for
    SmolLM2's 49k tokens and merges, where skipping them takes 0.03 s. struct.error: a truncated header."""
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        magic, version, n_tensors, n_kv = struct.unpack_from("<4sIQQ", buf, 0)
        if magic != b"GGUF" or version < 2:
            raise LiandanError(f"{path}: not a GGUF file (version 2 or later)")
        pos, alignment = 24, 32  # GGUF's default alignment of the data section
        for _ in range(n_kv):
            key_end = _skip_value(buf, pos, _STRING)
            (kind,) = struct.unpack_from("<I", buf, key_end)
            if buf[pos + 8 : key_end] == b"general.alignment" and kind == 4:  # u32
                (alignment,) = struct.unpack_from("<I", buf, key_end + 4)
            pos = _skip_value(buf, key_end + 4, kind)
        table = []
        for _ in range(n_tensors):
            pos = _skip_value(buf, pos, _STRING)  # the name
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            kind, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 12
            table.append((dims, kind, offset))
        return table, pos + (-pos % alignment), len(buf)


# GGUFValueType → bytes: u8 i8 u16 i16 u32 i32 f32 bool, then u64 i64 f64; 8 is a string and 9 an array.
_FIXED_SIZE = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING = 8


def _skip_value(buf, pos: int, kind: int) -> int:
    """The offset just after a GGUF value of type `kind` that starts at `pos`."""
    if kind in _FIXED_SIZE:
        return pos + _FIXED_SIZE[kind]
    if kind == _STRING:
        return pos + 8 + struct.unpack_from("<Q", buf, pos)[0]  # u64 length + bytes
    item, count = struct.unpack_from("<IQ", buf, pos)  # array: item type, count, items
    pos += 12
    if item in _FIXED_SIZE:
        return pos + count * _FIXED_SIZE[item]
    for _ in range(count):
        pos = _skip_value(buf, pos, item)
    return pos


def describe_types(path: Path) -> str:
    return ", ".join(f"{n} {name}" for name, n in tensor_types(path).most_common())
