"""Generation speed: liandan's engines (torch, llama.cpp on each GGUF type) vs. Hugging Face `generate`
and llama-cpp-python's own `Llama` loop.

    .venv/bin/python benchmarks/generate_speed.py [--model smollm2-135m] [--adapter-path DIR] [--tokens 128]

Same model, same prompt, greedy, the same number of new tokens (stop tokens ignored for the
timing). Prompt (prefill) and generation tokens per second are reported separately, as
`liandan generate` prints them. The llama.cpp rows run through liandan's engine (`--engine llama.cpp`:
liandan's tokenization, sampling and stop handling on llama.cpp's logits) on the GGUFs it converts
and caches; the last row is llama-cpp-python's own loop on the q8_0 file, for the engine's overhead.
Skipped when llama-cpp-python is not installed.

With --adapter-path (the demo's adapter), each engine also answers the demo's six questions greedily
(rendered as in training, 30 tokens at most): "exact" counts answers equal to the trained ones that stop
at the trained stop token, "= torch" those equal to the torch engine's, stop included.
"""

from __future__ import annotations

import argparse
import time

PROMPT = ("Explain in detail how a database index speeds up queries, what a B-tree is, and when an index "
          "does not help. Give examples with tables of customers and orders.")


def bench_engine(engine, ids, n):
    """(prompt tok/s, generation tok/s) of one greedy run of exactly n tokens (stop ids ignored)."""
    from liandan.engines import Sampling
    from liandan.generate import GenerationResult

    stops, engine.pipe.stop_ids = engine.pipe.stop_ids, []
    try:
        list(engine.stream([ids[0]] * 4, 4, Sampling()))  # warm-up, sharing no prefix with the measured prompt
        result = GenerationResult()
        list(engine.stream(ids, n, Sampling(), result))
    finally:
        engine.pipe.stop_ids = stops
    return len(ids) / result.prompt_seconds, len(result.tokens) / result.generation_seconds


def demo_answers(engine, max_tokens: int = 30) -> list[tuple[str, bool, bool]]:
    """(answer, stopped, exact) for each of the demo's questions, greedy."""
    from liandan.data.formats import read_jsonl
    from liandan.demo import QUESTIONS_FILE, example_dir
    from liandan.engines import Sampling
    from liandan.generate import GenerationResult

    out = []
    for example in read_jsonl(example_dir() / QUESTIONS_FILE).examples:
        question, expected = example.messages[0]["content"], example.messages[1]["content"]
        result = GenerationResult()
        list(engine.stream(engine.pipe.encoder.prompt_ids([{"role": "user", "content": question}]), max_tokens,
                           Sampling(), result))
        text = engine.pipe.tokenizer.decode(result.tokens, skip_special_tokens=False)
        out.append((text, result.stopped, result.stopped and text.strip() == expected.strip()))
    return out


def measure(engine, ids, args) -> tuple:
    """(prompt tok/s, generation tok/s, demo answers or None) of one engine."""
    return (*bench_engine(engine, ids, args.tokens), demo_answers(engine) if args.adapter_path else None)


def bench_hf(pipe, ids, n):
    import torch

    model = pipe.model
    x = torch.tensor([ids], device=pipe.device.torch_device)
    with torch.inference_mode():
        start = time.perf_counter()
        model(input_ids=x, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=pipe.tokenizer.pad_token_id)
        total = time.perf_counter() - start
    generated = out.shape[1] - len(ids)
    return len(ids) / prefill, generated / max(total - prefill, 1e-9), None


def bench_llama_cpp_python(gguf, ids, n):
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=len(ids) + n + 8, verbose=False, n_threads=_cpus())
    start = time.perf_counter()
    llm.eval(ids)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(n):
        token = llm.sample(top_k=1, temp=0.0)
        llm.eval([token])
    return len(ids) / prefill, n / (time.perf_counter() - start), None


def _cpus() -> int:
    from liandan.engines.llama_engine import cpu_count

    return cpu_count()


def llama_rows(args, ids):
    from liandan.engines import GGUF_TYPES, load_engine

    rows, q8 = [], None
    for gguf_type in GGUF_TYPES:
        engine = load_engine("llama.cpp", args.model, args.adapter_path, gguf_type=gguf_type)
        rows.append((f"liandan --engine llama.cpp, {gguf_type} GGUF", *measure(engine, ids, args)))
        if gguf_type == "q8_0" and not args.adapter_path:
            from liandan.engines.gguf_cache import engine_ggufs

            q8 = engine_ggufs(engine.pipe, "q8_0")[0]
        engine.close()
    if q8 is not None:
        rows.append(("llama-cpp-python Llama loop, q8_0", *bench_llama_cpp_python(q8, ids, args.tokens)))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="Base model (default: the adapter's, else smollm2-135m)")
    parser.add_argument("--adapter-path", default=None, help="Measure with this adapter applied")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--no-hf", action="store_true", help="Skip the HF generate row")
    args = parser.parse_args()

    from liandan.engines import load_engine

    torch_engine = load_engine("torch", args.model, args.adapter_path)
    ids = torch_engine.pipe.encoder.prompt_ids([{"role": "user", "content": PROMPT}])
    dtype = str(torch_engine.pipe.device.dtype).removeprefix("torch.")
    rows = [(f"liandan --engine torch ({torch_engine.pipe.device.type} {dtype})", *measure(torch_engine, ids, args))]
    if not args.no_hf and not args.adapter_path:
        rows.append((f"HF transformers generate ({dtype})", *bench_hf(torch_engine.pipe, ids, args.tokens)))
    torch_engine.close()
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        rows.append(("llama.cpp (llama-cpp-python not installed)", float("nan"), float("nan"), None))
    else:
        rows += llama_rows(args, ids)
    print(f"{args.model or 'smollm2-135m'}{' + ' + args.adapter_path if args.adapter_path else ''}: prompt {len(ids)} "
          f"tokens, {args.tokens} new tokens, greedy, {_cpus()} CPU threads\n")
    print(f"{'system':<42}{'prompt tok/s':>14}{'gen tok/s':>12}{'vs torch':>10}{'exact':>7}{'= torch':>9}")
    print("-" * 94)
    reference = rows[0][3]
    for name, prompt_tps, gen_tps, answers in rows:
        checks = "" if answers is None else (f"{sum(a[2] for a in answers):>5}/{len(answers)}"
                                             f"{sum(a[:2] == r[:2] for a, r in zip(answers, reference)):>7}/{len(answers)}")
        print(f"{name:<42}{prompt_tps:>14.1f}{gen_tps:>12.1f}{gen_tps / rows[0][2]:>9.1f}x{checks}")
    for name, *_, answers in rows[1:]:
        for (text, stopped, _), (ref, ref_stopped, _) in zip(answers or [], reference or []):
            if (text, stopped) != (ref, ref_stopped):
                print(f"{name}: {text!r}{'' if stopped else ' (no stop)'} where torch says {ref!r}")


if __name__ == "__main__":
    main()
