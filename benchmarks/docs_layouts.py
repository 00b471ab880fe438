"""Which prompt layout lets the embedded model answer from retrieved chunks? One model load, many layouts.

    nice -n 10 .venv/bin/python benchmarks/docs_layouts.py [--langs en zh] [--only [LANG:]NAME ...] [--verbose]
    .venv/bin/python benchmarks/docs_layouts.py --retrieval      # the retrieval hits alone, no model
    .venv/bin/python benchmarks/docs_layouts.py --sentence-choice   # which sentence BM25 / the model would pick

On the built-in handbooks (liandan/examples/handbook/{en,zh}/questions.jsonl), greedy, an answer counts
when it contains the expected one (liandan.docs.qa.contains_answer, as `liandan eval`). Each row changes
one thing from the row it names; "gold" rows put the question's own section in the prompt instead of
the retrieved chunks, so they measure the answer given the right context apart from retrieval.
Retrieval hits (the question's section among the top k) are printed per chunk size and k.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from liandan.docs.prompt import _V1, DocsLayout  # noqa: E402

HANDBOOK = ROOT / "liandan" / "examples" / "handbook"
OLD = DocsLayout(**_V1)  # the first --docs layout


# Ask for the sentence that answers, not the fact alone: finding the sentence that shares the question's words may
# be easier for a small reader than cutting the fact out of it, and the sentence holds the answer.
QUOTE = "{sources}\n\nCopy the sentence from the text above that answers the question.\nQuestion: {question}"
# The question before the sources too, so the reader knows what to look for while it reads them.
SANDWICH = "Question: {question}\n\n{sources}\n\nAnswer in a few words from the text above.\nQuestion: {question}"


def variants(default: DocsLayout) -> list[tuple[str, dict]]:
    """(name, settings): layout (a DocsLayout), k, chunk_words (index chunk size), gold (oracle context)."""
    plain = replace(OLD, source="{body}")
    short = replace(plain, template="{sources}\n\nAnswer in a few words from the text above.\nQuestion: {question}")
    quote_plain = replace(plain, template=QUOTE)
    return [
        ("v1 layout, k=3", {"layout": OLD, "k": 3}),
        ("v1 layout, k=2", {"layout": OLD, "k": 2}),
        ("v1 layout, k=1", {"layout": OLD, "k": 1}),
        ("v1 layout, gold section only", {"layout": OLD, "k": 1, "gold": True}),
        ("question first, k=3", {"layout": replace(OLD, template="Question: {question}\n\n{sources}"), "k": 3}),
        ("plain chunk text (no [n], file, heading), k=3", {"layout": plain, "k": 3}),
        ("plain chunk text, best chunk last, k=3", {"layout": plain, "k": 3, "reverse": True}),
        ("plain chunk text, k=2", {"layout": plain, "k": 2}),
        ("plain chunk text, k=1", {"layout": plain, "k": 1}),
        ("plain chunk text, gold", {"layout": plain, "k": 1, "gold": True}),
        ("no instruction, plain, k=1", {"layout": replace(plain, template="{sources}\n\nQuestion: {question}"), "k": 1}),
        ("short-answer instruction, plain, k=1", {"layout": short, "k": 1}),
        ("short-answer instruction, plain, k=2", {"layout": short, "k": 2}),
        ("short-answer instruction, plain, k=3", {"layout": short, "k": 3}),
        ("short-answer instruction, plain, gold", {"layout": short, "k": 1, "gold": True}),
        ("short-answer instruction, numbered sources, k=3", {"layout": replace(OLD, template=short.template), "k": 3}),
        ("context in system message, plain, k=1", {"layout": replace(
            plain, template="Answer the question from this text.\n\n{sources}", placement="system"), "k": 1}),
        ("shorter chunks (40 words), plain, k=3", {"layout": plain, "k": 3, "chunk_words": 40}),
        ("shorter chunks (40 words), plain, k=1", {"layout": plain, "k": 1, "chunk_words": 40}),
        ("best 1 sentence of the top 3 chunks (BM25 over their sentences)",
         {"layout": default, "k": 3, "sentences": 1}),
        ("best 2 sentences of the top 3 chunks", {"layout": default, "k": 3, "sentences": 2}),
        ("best 3 sentences of the top 3 chunks", {"layout": default, "k": 3, "sentences": 3}),
        ("best 2 sentences of the gold section", {"layout": default, "k": 1, "gold": True, "sentences": 2}),
        ("1 worked example as an earlier chat turn, k=3", {"layout": default, "k": 3, "shots": 1}),
        ("2 worked examples as earlier chat turns, k=3", {"layout": default, "k": 3, "shots": 2}),
        ("2 worked examples as earlier chat turns, gold", {"layout": default, "k": 1, "gold": True, "shots": 2}),
        ("quote the answering sentence, plain, gold", {"layout": quote_plain, "k": 1, "gold": True}),
        ("quote the answering sentence, plain, k=1", {"layout": quote_plain, "k": 1}),
        ("quote the answering sentence, numbered sources, k=3", {"layout": replace(
            default, template=QUOTE), "k": 3}),
        ("question before and after the sources, plain, gold", {"layout": replace(
            plain, template=SANDWICH), "k": 1, "gold": True}),
        ("question before and after the sources, numbered sources, k=3", {"layout": replace(
            default, template=SANDWICH), "k": 3}),
        ("context-aware decoding (alpha 0.5), k=3", {"layout": default, "k": 3, "contrast": 0.5}),
        ("context-aware decoding (alpha 0.5), gold", {"layout": default, "k": 1, "gold": True, "contrast": 0.5}),
        ("context-aware decoding (alpha 1), k=3", {"layout": default, "k": 3, "contrast": 1.0}),
        ("default now", {"layout": default, "k": default.top_k}),
    ]


def load_index(lang: str, chunk_words: int | None):
    from liandan.docs import index as docs_index

    saved = docs_index.CHUNK_WORDS
    if chunk_words:
        docs_index.CHUNK_WORDS = chunk_words
    try:
        return docs_index.DocsIndex.build(HANDBOOK / lang, log=lambda *_: None)
    finally:
        docs_index.CHUNK_WORDS = saved


# Worked examples for the few-shot rows: an invented product unrelated to the handbooks, answered in a few words.
SHOTS = {
    "en": [("The Lumo desk lamp was designed by Orin Works in Oslo. It weighs 1.2 kilograms and its shade is made of "
            "frosted glass. The lamp runs for 30 hours on one charge, and the status light turns blue when the battery "
            "is low.", "How long does the lamp run on a charge?", "30 hours"),
           ("The Tessa kettle boils one litre of water in four minutes. Its filter should be rinsed every two weeks. "
            "If the base beeps three times, the kettle is empty.", "What does it mean when the base beeps three times?",
            "the kettle is empty")],
    "zh": [("鹿鸣台灯由奥林工坊在杭州设计，重1.2千克，灯罩由磨砂玻璃制成。充满一次电可以使用30小时，电量低时状态灯变成蓝色。",
            "台灯充一次电能用多久？", "30小时"),
           ("泰莎电水壶四分钟能烧开一升水。滤网应每两周冲洗一次。如果底座响三声，说明水壶里没有水。", "底座响三声是什么意思？",
            "水壶里没有水")],
}


def worked_examples(layout: DocsLayout, lang: str, n: int) -> list[dict]:
    """n earlier user/assistant turns, each a SHOTS passage in this layout and its short answer."""
    from liandan.docs.index import Chunk

    turns = []
    for text, question, answer in SHOTS[lang][:n]:
        passage = Chunk(text=text, source="example.md", section="")
        turns += [{"role": "user", "content": layout.fill(question, [passage])},
                  {"role": "assistant", "content": answer}]
    return turns


def best_sentences(index, question: str, chunks: list, n: int) -> list:
    """Contextual compression: only the n sentences of these chunks that BM25 scores highest for the question,
    in their reading order, one pseudo-chunk per source chunk. Does a shorter context help a small reader?"""
    import bm25s

    from liandan.data.docs import _SENTENCE_END  # the chunker's own sentence ends
    from liandan.docs.index import Chunk
    from liandan.docs.prompt import body_of

    sentences = [(c, s.strip()) for c in chunks for s in _SENTENCE_END.split(body_of(c)) if s.strip()]
    scorer = bm25s.BM25()
    scorer.index([index.analyzer.terms(s) or ["_"] for _, s in sentences], show_progress=False)
    terms = [t for t in index.analyzer.terms(question) if t in scorer.vocab_dict]
    if not terms:
        return chunks
    ids, _ = scorer.retrieve([terms], k=min(n, len(sentences)), show_progress=False, n_threads=1)
    kept: dict[int, list[str]] = {}
    for i in sorted(int(i) for i in ids[0]):
        kept.setdefault(id(sentences[i][0]), []).append(sentences[i][1])
    return [Chunk(text=" ".join(kept[id(c)]), source=c.source, section="") for c in chunks if id(c) in kept]


def contrastive_generate(pipe, with_docs: list[int], without: list[int], alpha: float, max_tokens: int):
    """Context-aware decoding (Shi et al. 2023, "Trusting Your Evidence"), greedy: the next token maximises
    (1 + alpha) * logits given the sources - alpha * logits without them, which favours what the sources add
    over what the model would say anyway. Two cached streams, one per prompt."""
    import torch

    from liandan.generate import GenerationResult, _cache_arg, _cache_of

    model, device, arg = pipe.model, pipe.device.torch_device, _cache_arg(pipe.model)
    stops, result = set(pipe.stop_ids), GenerationResult()
    with torch.inference_mode():
        outs = [model(input_ids=torch.tensor([ids], device=device), use_cache=True, logits_to_keep=1)
                for ids in (with_docs, without)]
        for _ in range(max_tokens):
            a, b = (o.logits[0, -1].float() for o in outs)
            token = int(torch.argmax((1 + alpha) * a - alpha * b))
            if token in stops:
                result.stopped = True
                break
            result.tokens.append(token)
            outs = [model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{arg: _cache_of(o)})
                    for o in outs]
    return result


def messages_for(layout: DocsLayout, qa, chunks) -> list[dict]:
    from liandan.docs.prompt import DocsContext

    class Fixed:  # an index that returns the chunks chosen here
        def search(self, query, k):
            from liandan.docs.index import Hit
            return [Hit(c, 1.0, i + 1) for i, c in enumerate(chunks)]

    messages, _ = DocsContext(Fixed(), layout, max(len(chunks), 1)).apply([{"role": "user", "content": qa.question}])
    return messages


def run_variant(pipe, lang, questions, settings, indexes, max_tokens) -> tuple[int, int, int, list[str]]:
    from liandan.docs.qa import contains_answer, is_relevant
    from liandan.generate import generate

    words = settings.get("chunk_words")
    if words not in indexes:  # one index per chunk size and language, built once
        indexes[words] = load_index(lang, words)
    index = indexes[words]
    shots = worked_examples(settings["layout"], lang, settings.get("shots", 0))  # the same before every question
    correct = hits = stopped = 0
    answers = []
    for qa in questions:
        retrieved = [h.chunk for h in index.search(qa.question, settings["k"])]
        hits += any(is_relevant(c, qa) for c in retrieved)
        chunks = [c for c in index.chunks if is_relevant(c, qa)] if settings.get("gold") else retrieved
        chunks = chunks[::-1] if settings.get("reverse") else chunks
        if settings.get("sentences"):
            chunks = best_sentences(index, qa.question, chunks, settings["sentences"])
        messages = shots + messages_for(settings["layout"], qa, chunks)
        ids = pipe.encoder.prompt_ids(messages)
        if settings.get("contrast"):
            alone = pipe.encoder.prompt_ids(shots + [{"role": "user", "content": qa.question}])
            out = contrastive_generate(pipe, ids, alone, settings["contrast"], max_tokens)
        else:
            out = generate(pipe.model, ids, max_tokens, pipe.stop_ids, pipe.device.torch_device)
        got = pipe.tokenizer.decode(out.tokens, skip_special_tokens=True).strip()
        ok = contains_answer(got, qa.answer)
        correct += ok
        stopped += out.stopped
        answers.append(f"{'✓' if ok else '✗'} {qa.answer!r} ← {got[:70]!r}")
    return correct, hits, stopped, answers


def planned(langs: list[str], only: list[str] | None) -> list[tuple[str, str, dict]]:
    """(lang, row name, settings) in the order to run: every row per language, or --only's order, where
    "zh:plain" picks the rows starting with "plain" for zh alone and "plain" picks them for every language."""
    rows = variants(DocsLayout())
    if not only:
        return [(lang, name, settings) for lang in langs for name, settings in rows]
    out = []
    for want in only:
        lang, _, prefix = want.rpartition(":") if want[:3] in {f"{l}:" for l in langs} else ("", "", want)
        out += [(l, name, settings) for l in ([lang] if lang else langs) for name, settings in rows
                if name.startswith(prefix)]
    return out


def retrieval_table(langs: list[str]) -> None:
    """The question's section among the top k, for k = 1..3 and two chunk sizes: no model needed."""
    from liandan.docs.qa import is_relevant, read_questions

    print("| lang | chunk words | chunks | hits@1 | hits@2 | hits@3 |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for lang in langs:
        questions = read_questions(HANDBOOK / lang / "questions.jsonl")
        for words in (None, 40):
            index = load_index(lang, words)
            hits = [sum(any(is_relevant(h.chunk, qa) for h in index.search(qa.question, k)) for qa in questions)
                    for k in (1, 2, 3)]
            n = len(questions)
            print(f"| {lang} | {words or 'default'} | {len(index.chunks)} | " + " | ".join(f"{h}/{n}" for h in hits) + " |")


def continuation_logprob(pipe, prompt: list[int], continuation: list[int]) -> float:
    """log P(continuation | prompt) under the model, summed over the continuation's tokens."""
    import torch

    with torch.inference_mode():
        ids = torch.tensor([prompt + continuation], device=pipe.device.torch_device)
        logp = pipe.model(input_ids=ids).logits[0, len(prompt) - 1:-1].float().log_softmax(-1)
        return float(logp.gather(-1, torch.tensor(continuation, device=ids.device)[:, None]).sum())


def sentence_choice_table(pipe, langs: list[str]) -> None:
    """Does the model know which sentence answers, even where it cannot write the answer? Among the sentences of
    the top 3 chunks, the one picked by BM25, by the model's query likelihood (how likely the question is after
    the sentence), and by its answer likelihood (how likely the sentence is as the reply in the QUOTE layout,
    per token); a pick counts when it contains the answer. An extractive reader's ceiling, not an answer mode."""
    import bm25s

    from liandan.data.docs import _SENTENCE_END  # the chunker's own sentence ends
    from liandan.docs.prompt import body_of
    from liandan.docs.qa import contains_answer, read_questions
    from liandan.replay import user_prompt_ids

    print("| lang | some sentence holds the answer | BM25 | query likelihood | answer likelihood | s |")
    print("| --- | ---: | ---: | ---: | ---: | ---: |")
    quote = replace(DocsLayout(), template=QUOTE)
    encode = lambda text: pipe.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    for lang in langs:
        start, index = time.perf_counter(), load_index(lang, None)
        questions = read_questions(HANDBOOK / lang / "questions.jsonl")
        counts = [0, 0, 0, 0]
        for qa in questions:
            chunks = [h.chunk for h in index.search(qa.question, 3)]
            sentences = [s.strip() for c in chunks for s in _SENTENCE_END.split(body_of(c)) if s.strip()]
            scorer = bm25s.BM25()
            scorer.index([index.analyzer.terms(s) or ["_"] for s in sentences], show_progress=False)
            terms = [t for t in index.analyzer.terms(qa.question) if t in scorer.vocab_dict]
            asked, question = pipe.encoder.prompt_ids(messages_for(quote, qa, chunks)), encode(qa.question)
            replies = [encode(s) for s in sentences]
            scores = [
                list(scorer.get_scores(terms)) if terms else [0.0] * len(sentences),
                [continuation_logprob(pipe, user_prompt_ids(pipe.encoder, f"{s}\n\nWrite one question that the text "
                                                            "above answers."), question) for s in sentences],
                [continuation_logprob(pipe, asked, reply) / len(reply) for reply in replies],
            ]
            holds = [contains_answer(s, qa.answer) for s in sentences]
            counts[0] += any(holds)
            for i, score in enumerate(scores, 1):
                counts[i] += holds[max(range(len(sentences)), key=score.__getitem__)]
        n = len(questions)
        print(f"| {lang} | " + " | ".join(f"{c}/{n}" for c in counts) + f" | {time.perf_counter() - start:.0f} |",
              flush=True)


def main() -> None:
    from liandan.docs.qa import read_questions
    from liandan.generate import load_pipeline

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", nargs="+", default=["en", "zh"])
    parser.add_argument("--only", nargs="+", help="Only the rows whose name starts with one of these, in this order "
                        "(LANG:PREFIX for one language): the most telling rows first when time is short")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--verbose", action="store_true", help="Print every answer")
    parser.add_argument("--retrieval", action="store_true", help="Only the retrieval hits (no model, seconds)")
    parser.add_argument("--sentence-choice", action="store_true",
                        help="Only which sentence of the top 3 chunks BM25 and the model pick (no generation)")
    args = parser.parse_args()
    if args.retrieval:
        return retrieval_table(args.langs)
    pipe = load_pipeline(None, None)
    if args.sentence_choice:
        return sentence_choice_table(pipe, args.langs)
    questions = {lang: read_questions(HANDBOOK / lang / "questions.jsonl") for lang in args.langs}
    indexes: dict = {lang: {} for lang in args.langs}
    print("| lang | layout | correct | section in top k | stopped | s |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for lang, name, settings in planned(args.langs, args.only):
        start = time.perf_counter()
        correct, hits, stopped, answers = run_variant(pipe, lang, questions[lang], settings, indexes[lang],
                                                      args.max_tokens)
        n = len(questions[lang])
        print(f"| {lang} | {name} | {correct}/{n} | {'-' if settings.get('gold') else f'{hits}/{n}'} | {stopped}/{n} | "
              f"{time.perf_counter() - start:.0f} |", flush=True)
        if args.verbose:
            print("\n".join("    " + a for a in answers), flush=True)


if __name__ == "__main__":
    main()
