"""What each GGUF type costs on the demo model: file size, validation perplexity vs f32 and the six answers.

    .venv/bin/python benchmarks/quant_quality.py [--adapter-path liandan-demo/adapters] [--data DIR]

Fuses the adapter (made by `liandan demo`), writes one GGUF per type with `liandan export gguf`'s
code (k-quants and q4_0/q5_0 by llama.cpp's quantizer from one f16 file), and for each file, in llama.cpp:

* perplexity of the validation set's trained tokens (export/quality.py; the demo's valid.jsonl), vs f32;
* the demo's six questions, rendered with the adapter's recorded chat template and tokenized by
  liandan, answered greedily: exact means the same text as trained and stopped by the trained stop token.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")


def ask(gguf_path: Path, questions: list, encoder, max_tokens: int) -> list[tuple[str, str, str, bool]]:
    """(question, expected, answer, stopped) for each question, greedy in llama.cpp."""
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    out = []
    for question, expected in questions:
        ids = encoder.prompt_ids([{"role": "user", "content": question}])
        reply = llm.create_completion(ids, max_tokens=max_tokens, temperature=0.0)["choices"][0]
        out.append((question, expected, reply["text"], reply["finish_reason"] == "stop"))
    llm.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter-path", default="liandan-demo/adapters", help="The demo's adapter (liandan demo --out liandan-demo)")
    parser.add_argument("--data", default=None, help="Validation data directory (default: the adapter's recorded data)")
    parser.add_argument("--max-tokens", type=int, default=30, help="Answer budget, as in the demo (default 30)")
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="quant-quality-"))
    try:
        measure(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def measure(args, work: Path) -> None:
    import llama_cpp
    from transformers import AutoTokenizer

    from liandan.adapters import read_record
    from liandan.data.formats import read_jsonl
    from liandan.data.render import Encoder, rendering_of
    from liandan.demo import QUESTIONS_FILE, example_dir
    from liandan.export.gguf import export_gguf
    from liandan.export.quality import gguf_perplexity, validation_items
    from liandan.export.quantize import OUTTYPES, quantize_file, tensor_types
    from liandan.fuse import fuse

    fused = work / "fused"
    fuse(None, Path(args.adapter_path), fused, log=lambda *_: None)
    record = read_record(fused)
    tokenizer = AutoTokenizer.from_pretrained(str(fused))
    rendering = rendering_of(record, tokenizer)
    encoder = Encoder(tokenizer, rendering)
    items, where = validation_items(fused, args.data)
    questions = [(e.messages[0]["content"], e.messages[1]["content"]) for e in read_jsonl(example_dir() / QUESTIONS_FILE).examples]

    # llama.cpp's types are made from one f16 file, as `export gguf` does for each (it writes the f16 first).
    f16 = export_gguf(fused, work / "f16.gguf", "f16", rendering.chat_template, rendering.stop_tokens, log=lambda *_: None)
    rows, reference = [], None
    for outtype in args.types:
        path = work / f"{outtype}.gguf"
        if outtype == "f16":
            path = f16
        elif OUTTYPES[outtype]:
            quantize_file(llama_cpp, f16, path, outtype)
        else:
            export_gguf(fused, path, outtype, rendering.chat_template, rendering.stop_tokens, log=lambda *_: None)
        ppl, tokens = gguf_perplexity(path, items)
        reference = reference or (ppl if outtype == "f32" else None)
        answers = ask(path, questions, encoder, args.max_tokens)
        lost = [f"{question} → {text.strip()!r}{'' if stopped else ' (no stop)'}"
                for question, expected, text, stopped in answers if not (stopped and text.strip() == expected.strip())]
        exact = len(answers) - len(lost)
        types = ", ".join(f"{n} {t}" for t, n in tensor_types(path).most_common())
        rows.append((outtype, path.stat().st_size / 1e6, ppl, exact, types, lost))
        if path != f16:
            path.unlink()

    print(f"{args.adapter_path} fused; perplexity on {where} ({len(items)} examples, {tokens} trained tokens), "
          f"{len(questions)} questions, greedy, llama.cpp\n")
    print("| type | file MB | tensors (count by GGML type) | perplexity | vs f32 | answers exact & stopped |")
    print("| --- | ---: | --- | ---: | ---: | :---: |")
    for outtype, size, ppl, exact, types, lost in rows:
        change = f"{(ppl / reference - 1) * 100:+.2f}%" if reference else "n/a"
        print(f"| {outtype} | {size:.1f} | {types} | {ppl:.4f} | {change} | {exact}/{len(questions)} |")
    for outtype, *_, lost in rows:
        if lost:
            print(f"\n{outtype} answered differently: " + "; ".join(lost))


if __name__ == "__main__":
    main()
