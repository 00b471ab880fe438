"""What a GGUF's tensor type costs, measured in llama.cpp: perplexity on the validation set vs f32.

The validation examples are rendered and tokenized by liandan exactly as in training (recorded chat
template, stop token, prompt masking), so the f32 file's perplexity is exp of the validation loss `liandan lora`
reports, here over the whole valid.jsonl, and every other type is compared with it on the same token ids. The KV cache
is kept in f32 so that the difference measured is the weights' alone.
"""

from __future__ import annotations

import math
import os
import tempfile
from contextlib import ExitStack, contextmanager
from pathlib import Path

import numpy as np

from liandan.errors import LiandanError


def validation_items(model_dir: Path, data: str | None = None) -> tuple[list, str]:
    """The validation split as training encoded it: (Encoded items, where it came from)."""
    from transformers import AutoTokenizer

    from liandan.adapters import read_record
    from liandan.config import load_config
    from liandan.data.batching import encode_file
    from liandan.data.formats import load_splits
    from liandan.data.render import Encoder, rendering_of

    record = read_record(model_dir, required=False)
    cfg = load_config(None, record.get("training") or {})
    data = data or record.get("training", {}).get("data")
    if not data or not Path(data).exists():
        raise LiandanError(f"--check needs the validation data{f' (recorded: {data}, not found)' if data else ''}: "
                           "pass --data DIR (a directory with valid.jsonl)")
    valid = load_splits(data, cfg.field_names(), splits=("valid",))["valid"]
    if valid is None:
        raise LiandanError(f"--data {data}: valid.jsonl is missing; --check measures perplexity on it")
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    encoder = Encoder(tokenizer, rendering_of(record, tokenizer), cfg.mask_prompt)
    items = encode_file(valid, encoder, cfg.max_seq_length, log=lambda *_: None, long_examples=cfg.long_examples).items
    return items, str(valid.path)


def gguf_perplexity(path: Path, items: list) -> tuple[float, int]:
    """(perplexity, tokens) of the trained positions of `items`, computed by llama.cpp from the GGUF at `path`."""
    from liandan.data.render import IGNORE

    total, count = 0.0, 0
    with _llama_scorer(path, max(len(item.input_ids) for item in items)) as logits_of:
        for item in items:
            logits = logits_of(item.input_ids)[:-1].astype(np.float64)
            targets = np.asarray(item.input_ids[1:])
            trained = np.asarray(item.labels[1:]) != IGNORE  # position t's logits predict token t + 1
            top = logits.max(-1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            nll = log_norm - logits[np.arange(len(targets)), targets]
            total += float(nll[trained].sum())
            count += int(trained.sum())
    return (math.exp(total / count) if count else float("nan")), count


@contextmanager
def _llama_scorer(path: Path, n_ctx: int):
    """A function: token ids -> llama.cpp's logits at every position, from a fresh f32 KV cache each time.

    llama.cpp's low-level objects rather than llama_cpp.Llama, whose model parameters cannot be set: those of
    engines.llama_model_params keep it running on machines where its AMX kernels crash."""
    from liandan.engines import llama_model_params, require_llama_cpp

    llama_cpp = require_llama_cpp("--check")
    from llama_cpp import _internals

    llama_cpp.llama_backend_init()
    model_params = llama_model_params(llama_cpp)
    model_params.n_gpu_layers = 0  # as llama_cpp.Llama's default: the CPU's numbers, and any model size loads
    params = llama_cpp.llama_context_default_params()
    params.n_ctx = params.n_batch = params.n_ubatch = n_ctx
    params.n_threads = params.n_threads_batch = os.cpu_count() or 1
    params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
    # Flash attention (on by default for the CPU) sums in another order: ~1e-3 of relative error in perplexity,
    # as large as a good quantization's own cost.
    params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
    with ExitStack() as stack:  # closed in reverse order, also when a later one fails to load
        model = _internals.LlamaModel(path_model=str(path), params=model_params, verbose=False)
        stack.callback(model.close)
        ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        stack.callback(ctx.close)
        batch = _internals.LlamaBatch(n_tokens=n_ctx, embd=0, n_seq_max=1, verbose=False)
        stack.callback(batch.close)

        def logits_of(ids: list[int]) -> np.ndarray:
            ctx.kv_cache_clear()
            batch.set_batch(ids, n_past=0, logits_all=True)
            ctx.decode(batch)
            return np.ctypeslib.as_array(ctx.get_logits(), shape=(len(ids), model.n_vocab())).copy()

        yield logits_of


def check(model_dir: Path, outfile: Path, outtype: str, data: str | None = None, log=print) -> tuple[float, float]:
    """Perplexity of `outfile` and of an f32 export of the same model, on the validation set; logs the change."""
    from liandan.export.gguf import export_gguf

    items, where = validation_items(model_dir, data)
    ppl, tokens = gguf_perplexity(outfile, items)
    if outtype == "f32":
        reference = ppl
    else:
        with tempfile.TemporaryDirectory(prefix=f".{Path(outfile).name}.check.", dir=Path(outfile).parent) as scratch:
            f32 = export_gguf(model_dir, Path(scratch) / "f32.gguf", "f32", log=lambda *_: None)
            reference, _ = gguf_perplexity(f32, items)
    log(f"Perplexity in llama.cpp on {where} ({len(items)} examples, {tokens} trained tokens): "
        f"f32 {reference:.4f}, {outtype} {ppl:.4f} ({(ppl / reference - 1) * 100:+.2f}%)")
    return reference, ppl
