"""Generation speed: liandan's decoding loop vs. Hugging Face `generate` vs. llama.cpp on the exported GGUF.

    .venv/bin/python benchmarks/generate_speed.py [--model smollm2-135m] [--tokens 128]

Same model, same prompt, greedy, the same number of new tokens (stop tokens ignored for the
timing). Prompt (prefill) and generation tokens per second are reported separately, as
`liandan generate` prints them. llama.cpp runs the f32 and q8_0 GGUFs written by `liandan export gguf`
(skipped when llama-cpp-python is not installed).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

PROMPT = ("Explain in detail how a database index speeds up queries, what a B-tree is, and when an index "
          "does not help. Give examples with tables of customers and orders.")


def bench_liandan(pipe, ids, n):
    from liandan.generate import GenerationResult, stream

    result = GenerationResult()
    for _ in stream(pipe.model, ids, n, [], pipe.device.torch_device, result=result):
        pass
    return len(ids) / result.prompt_seconds, len(result.tokens) / result.generation_seconds


def bench_hf(pipe, ids, n):
    import torch

    model = pipe.model
    x = torch.tensor([ids])
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=x, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pipe.tokenizer.pad_token_id)
        total = time.perf_counter() - start
    generated = out.shape[1] - len(ids)
    return len(ids) / prefill, generated / max(total - prefill, 1e-9)


def bench_llama_cpp(gguf: Path, ids, n):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + n + 8, verbose=False, n_threads=None)
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return len(ids) / prefill, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--tokens", type=int, default=128)
    args = parser.parse_args()

    from liandan.export.gguf import export_gguf
    from liandan.generate import load_pipeline
    from liandan.models import resolve_model

    pipe = load_pipeline(args.model, None)
    ids = pipe.encoder.prompt_ids([{"role": "user", "content": PROMPT}])
    bench_liandan(pipe, ids, 8)  # warm-up
    rows = [("liandan generate (PyTorch fp32)", *bench_liandan(pipe, ids, args.tokens)),
            ("HF transformers generate (fp32)", *bench_hf(pipe, ids, args.tokens))]
    try:
        import llama_cpp  # noqa: F401

        work = Path(tempfile.mkdtemp())
        for outtype in ("f32", "q8_0"):
            gguf = export_gguf(resolve_model(args.model), work / f"m-{outtype}.gguf", outtype, log=lambda *_: None)
            rows.append((f"llama.cpp ({outtype} GGUF from liandan)", *bench_llama_cpp(gguf, ids, args.tokens)))
    except ImportError:
        rows.append(("llama.cpp", float("nan"), float("nan")))
    print(f"{args.model}: prompt {len(ids)} tokens, {args.tokens} new tokens, greedy\n")
    print(f"{'system':<36}{'prompt tok/s':>14}{'gen tok/s':>12}")
    print("-" * 62)
    for name, prompt_tps, gen_tps in rows:
        print(f"{name:<36}{prompt_tps:>14.1f}{gen_tps:>12.1f}")


if __name__ == "__main__":
    main()
