"""What each GGUF type costs on the demo model: file size, validation perplexity vs f32 and the six answers.

    .venv/bin/python benchmarks/quant_quality.py [--adapter-path liandan-demo/adapters] [--data DIR] [--retention]
    .venv/bin/python benchmarks/quant_quality.py --base --retention     # the base model itself, no adapter

Fuses the adapter (made by `liandan demo`), writes one GGUF per type with `liandan export gguf`'s
code (k-quants and q4_0/q5_0 by llama.cpp's quantizer from one f16 file), and for each file, in llama.cpp:

* perplexity of the validation set's trained tokens (export/quality.py; the demo's valid.jsonl), vs f32;
* the demo's six questions, rendered with the adapter's recorded chat template and tokenized by
  liandan, answered greedily: exact means the same text as trained and stopped by the trained stop token;
* with --retention, general knowledge kept: of the held-out general questions the PyTorch fp32 base model answers
  right (liandan's retention score, liandan.replay), how many this file still answers right. With --base (no
  adapter, the demo's valid.jsonl for perplexity) that is what the llama.cpp kernels and the type alone cost: a
  yardstick for what training costs (benchmarks/forgetting.py).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

TYPES = ("f32", "f16", "q8_0", "q6_k", "q5_k_m", "q4_k_m", "q4_0", "q3_k_m", "q2_k")


def ask(gguf_path: Path, questions: list, encoder, max_tokens: int) -> list[tuple[str, str, str, bool]]:
    """(question, expected, answer, stopped) for each (question, expected) pair, greedy in llama.cpp."""
    import llama_cpp

    from liandan.replay import user_prompt_ids

    llm = llama_cpp.Llama(model_path=str(gguf_path), n_ctx=256, verbose=False)
    out = []
    for question, expected in questions:
        reply = llm.create_completion(user_prompt_ids(encoder, question), max_tokens=max_tokens, temperature=0.0)
        out.append((question, expected, reply["choices"][0]["text"], reply["choices"][0]["finish_reason"] == "stop"))
    llm.close()
    return out


def general_answers(gguf_path: Path, base, encoder) -> tuple[int, list[str]]:
    """(kept, lost as 'question → reply'): of the questions `base` (replay.BaseKnowledge) answers right, those this
    GGUF also answers right, greedy in llama.cpp with the retention score's budget."""
    from liandan.replay import RETENTION_MAX_TOKENS, is_correct

    known = [q for q, right in zip(base.questions, base.correct) if right]
    replies = ask(gguf_path, [(q.question, q.answers) for q in known], encoder, RETENTION_MAX_TOKENS)
    lost = [f"{question} → {text.strip()[:60]!r}" for question, answers, text, _ in replies if not is_correct(text, answers)]
    return len(known) - len(lost), lost


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter-path", default="liandan-demo/adapters", help="The demo's adapter (liandan demo --out liandan-demo)")
    parser.add_argument("--data", default=None, help="Validation data directory (default: the adapter's recorded data)")
    parser.add_argument("--max-tokens", type=int, default=30, help="Answer budget, as in the demo (default 30)")
    parser.add_argument("--types", nargs="+", default=list(TYPES))
    parser.add_argument("--base", action="store_true", help="Measure the base model (--model) instead of a fused adapter")
    parser.add_argument("--model", default=None, help="With --base: the model (default: the embedded smollm2-135m)")
    parser.add_argument("--retention", action="store_true",
                        help="Also count the held-out general answers each file keeps (~1-2 min a type here)")
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
    from liandan.models import resolve_model

    if args.base:
        source, record = resolve_model(args.model), {}
    else:
        source = work / "fused"
        fuse(None, Path(args.adapter_path), source, log=lambda *_: None)
        record = read_record(source)
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    rendering = rendering_of(record, tokenizer)
    encoder = Encoder(tokenizer, rendering)
    items, where = validation_items(source, args.data or (str(example_dir()) if args.base else None))
    # The demo's answers test what the adapter learned: nothing to test on the base model.
    questions = [] if args.base else [(e.messages[0]["content"], e.messages[1]["content"])
                                      for e in read_jsonl(example_dir() / QUESTIONS_FILE).examples]
    # The retention benchmark's own loading of the base model's right answers (benchmarks/ is on sys.path).
    from forgetting import base_knowledge

    base = base_knowledge(args.model if args.base else record.get("base_model"))[1] if args.retention else None

    # llama.cpp's types are made from one f16 file, as `export gguf` does for each (it writes the f16 first).
    f16 = export_gguf(source, work / "f16.gguf", "f16", rendering.chat_template, rendering.stop_tokens, log=lambda *_: None)
    rows, reference = [], None
    for outtype in args.types:
        path = work / f"{outtype}.gguf"
        if outtype == "f16":
            path = f16
        elif OUTTYPES[outtype]:
            quantize_file(llama_cpp, f16, path, outtype)
        else:
            export_gguf(source, path, outtype, rendering.chat_template, rendering.stop_tokens, log=lambda *_: None)
        ppl, tokens = gguf_perplexity(path, items)
        reference = reference or (ppl if outtype == "f32" else None)
        answers = ask(path, questions, encoder, args.max_tokens) if questions else []
        lost = [f"{question} → {text.strip()!r}{'' if stopped else ' (no stop)'}"
                for question, expected, text, stopped in answers if not (stopped and text.strip() == expected.strip())]
        exact = len(answers) - len(lost)
        kept, forgotten = general_answers(path, base, encoder) if base else (None, [])
        lost += [f"forgot {f}" for f in forgotten]
        types = ", ".join(f"{n} {t}" for t, n in tensor_types(path).most_common())
        rows.append((outtype, path.stat().st_size / 1e6, ppl, exact, kept, types, lost))
        if path != f16:
            path.unlink()

    known = f" of {sum(base.correct)}" if base else ""
    print(f"{source if args.base else args.adapter_path + ' fused'}; perplexity on {where} ({len(items)} examples, "
          f"{tokens} trained tokens), {len(questions)} questions, greedy, llama.cpp\n")
    print("| type | file MB | tensors (count by GGML type) | perplexity | vs f32 | answers exact & stopped | general answers kept |")
    print("| --- | ---: | --- | ---: | ---: | :---: | :---: |")
    for outtype, size, ppl, exact, kept, types, lost in rows:
        change = f"{(ppl / reference - 1) * 100:+.2f}%" if reference else "n/a"
        answers = f"{exact}/{len(questions)}" if questions else "–"
        print(f"| {outtype} | {size:.1f} | {types} | {ppl:.4f} | {change} | {answers} | "
              f"{kept if kept is not None else '–'}{known if kept is not None else ''} |")
    for outtype, *_, lost in rows:
        if lost:
            print(f"\n{outtype} answered differently: " + "; ".join(lost))


if __name__ == "__main__":
    main()
