"""What a GGUF's tensor type costs, measured in llama.cpp: perplexity on the validation set vs f32.

The validation examples are rendered and tokenized by liandan exactly as in training (recorded chat
template, stop token, prompt masking), so the f32 file's perplexity is exp of the validation loss `liandan lora`
reports, here over the whole valid.jsonl, and every other type is compared with it on the same token ids. The KV cache
is kept in f32 so that the difference measured is the weights' alone.
"""

from __future__ import annotations

import math
import tempfile
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
    from liandan.engines import require_llama_cpp

    llama_cpp = require_llama_cpp("--check")
    n_ctx = max(len(item.input_ids) for item in items)
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=n_ctx, logits_all=True, verbose=False,
                          type_k=llama_cpp.GGML_TYPE_F32, type_v=llama_cpp.GGML_TYPE_F32)
    total, count = 0.0, 0
    try:
        for item in items:
            llm.reset()
            llm.eval(item.input_ids)
            logits = np.asarray(llm.scores[: len(item.input_ids) - 1], dtype=np.float64)
            targets = np.asarray(item.input_ids[1:])
            trained = np.asarray(item.labels[1:]) != IGNORE  # position t's logits predict token t + 1
            top = logits.max(-1, keepdims=True)
            log_norm = np.log(np.exp(logits - top).sum(-1)) + top[:, 0]
            nll = log_norm - logits[np.arange(len(targets)), targets]
            total += float(nll[trained].sum())
            count += int(trained.sum())
    finally:
        llm.close()
    return (math.exp(total / count) if count else float("nan")), count


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
