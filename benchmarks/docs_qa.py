"""Documents → answers on liandan's built-in invented handbooks (English and Chinese), end to end.

    nice -n 10 .venv/bin/python benchmarks/docs_qa.py [--langs en zh] [--rows base doc ra doc+ra synth] [--iters 40]

Each handbook (liandan/examples/handbook/{en,zh}) has six sections, 15 evaluation questions reworded from
its sentences (questions.jsonl) and 15 training questions on *other* facts of the same handbook
(train_questions.jsonl), so no evaluated answer is ever trained. On the embedded model, greedy, an
answer counts when it contains the expected one. Rows, each with its time (training + evaluation):

- base, base + docs: the model as shipped, without and with the top-3 retrieved chunks;
- document-only fine-tuning: `data from-docs` text chunks → LoRA; asked without and with docs;
- retrieval-aware fine-tuning: `data from-docs --questions train_questions.jsonl` → LoRA; without/with docs;
- documents, then retrieval-aware: the document-only adapter trained on with the retrieval-aware examples
  (`--resume-adapter-file`): facts stored in the weights, plus the habit of reading the sources;
- synthetic questions: `data synth` with the embedded model as its own teacher → `from-docs --questions` → LoRA.

Then indexing speed on 1,000 generated Markdown pages (~1 MB) and query latency (targets: < 30 s, < 50 ms).
Every step runs the real CLI in its own process, as a user would.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HANDBOOK = ROOT / "liandan" / "examples" / "handbook"
ENV = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))


def cli(*args, fail=True) -> tuple[str | None, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "liandan", *map(str, args)], capture_output=True, text=True, env=ENV)
    if proc.returncode != 0:
        if not fail:
            print(f"liandan {args[0]} {args[1]} failed: {proc.stderr.strip()[-300:]}", flush=True)
            return None, time.perf_counter() - start
        sys.exit(f"liandan {' '.join(map(str, args))} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return proc.stdout, time.perf_counter() - start


def evaluate(lang: str, *extra) -> dict:
    out, seconds = cli("eval", HANDBOOK / lang / "questions.jsonl", "--docs", HANDBOOK / lang, "--json", *extra)
    report = json.loads(out)
    report["seconds"] = seconds
    return report


def train(data: Path, adapter: Path, iters: int, *extra) -> float:
    _, seconds = cli("lora", "--train", "--data", data, "--adapter-path", adapter, "--iters", iters, "--batch-size", 2,
                     "--learning-rate", "2e-4", "--replay-ratio", 0, "--val-batches", 0, "--steps-per-report", iters,
                     "--save-every", iters, "--overwrite", *extra)
    return seconds


def rows_for(report: dict, label: str, train_seconds: float = 0.0) -> list[dict]:
    return [{"setup": label + (" + docs" if m["mode"].endswith("+docs") else ""),
             "correct": m["correct"], "exact": m["exact"], "stopped": m["stopped"], "total": m["total"],
             "train_s": train_seconds, "eval_s": m["seconds"]} for m in report["modes"]]


def run_language(lang: str, rows_wanted: list[str], iters: int, work: Path) -> tuple[list[dict], dict]:
    docs, table = HANDBOOK / lang, []
    base = evaluate(lang)
    recall = base["recall"]
    table += rows_for(base, "base")
    doc_seconds = 0.0
    if {"doc", "doc+ra"} & set(rows_wanted):
        cli("data", "from-docs", docs, "--out", work / "doc", "--chunk-tokens", 256, "--overlap", 32)
        doc_seconds = train(work / "doc", work / "doc-adapter", iters)
    if "doc" in rows_wanted:
        table += rows_for(evaluate(lang, "--adapter-path", work / "doc-adapter", "--modes", "adapter", "adapter+docs"),
                          "document-only fine-tuning", doc_seconds)
    if {"ra", "doc+ra"} & set(rows_wanted):
        cli("data", "from-docs", docs, "--out", work / "ra", "--questions", docs / "train_questions.jsonl")
    if "ra" in rows_wanted:
        seconds = train(work / "ra", work / "ra-adapter", iters)
        table += rows_for(evaluate(lang, "--adapter-path", work / "ra-adapter", "--modes", "adapter", "adapter+docs"),
                          "retrieval-aware fine-tuning", seconds)
    if "doc+ra" in rows_wanted:  # the documents first, then retrieval-aware examples from those weights on
        seconds = doc_seconds + train(work / "ra", work / "doc-ra-adapter", iters,
                                      "--resume-adapter-file", work / "doc-adapter")
        table += rows_for(evaluate(lang, "--adapter-path", work / "doc-ra-adapter", "--modes", "adapter", "adapter+docs"),
                          "documents, then retrieval-aware fine-tuning", seconds)
    if "synth" in rows_wanted:
        out, synth_seconds = cli("data", "synth", docs, "--out", work / "synth", fail=False)
        if out is None:  # the small model as its own teacher may give no usable pairs at all
            table.append({"setup": "synthetic questions: no usable pairs", "correct": 0, "exact": 0, "stopped": 0,
                          "total": 15, "train_s": synth_seconds, "eval_s": 0})
            return table, recall
        pairs = [json.loads(line) for line in (work / "synth" / "train.jsonl").read_text(encoding="utf-8").splitlines()]
        cli("data", "from-docs", docs, "--out", work / "synth-ra", "--questions", work / "synth" / "train.jsonl")
        seconds = train(work / "synth-ra", work / "synth-adapter", iters) + synth_seconds
        table += rows_for(evaluate(lang, "--adapter-path", work / "synth-adapter", "--modes", "adapter", "adapter+docs"),
                          f"synthetic questions ({len(pairs)} pairs) fine-tuning", seconds)
        print(f"[{lang}] first synthetic pairs: {pairs[:3]}", flush=True)
    return table, recall


WORDS = ("account backup cable charger device engine filter gateway handle index journal kernel lever module node "
         "option panel queue router sensor token update valve widget zone battery cluster driver export firmware").split()
ZH = "设备电池网关模块节点配置更新传感器滤网阀门接口固件驱动导出集群队列面板令牌路由"


def make_pages(root: Path, n: int = 1000, seed: int = 0) -> int:
    """n Markdown pages of ~1 KB: headings, sentences of product words and numbers; every tenth in Chinese."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(n):
        if i % 10 == 9:
            body = "\n\n".join("".join(rng.choice(ZH) for _ in range(60)) + "。" for _ in range(5))
            text = f"# 页面 {i}\n\n## 说明\n\n{body}\n"
        else:
            paragraphs = [" ".join(rng.choice(WORDS) for _ in range(30)) + f" {rng.randint(1, 999)}." for _ in range(4)]
            text = f"# Page {i}\n\n## Setup of {rng.choice(WORDS)}\n\n" + "\n\n".join(paragraphs) + "\n"
        (root / f"page-{i:04d}.md").write_text(text, encoding="utf-8")
        total += len(text.encode())
    return total


def indexing_speed(work: Path) -> dict:
    from liandan.docs.index import DocsIndex

    size = make_pages(work / "pages")
    start, cpu = time.perf_counter(), time.process_time()
    index = DocsIndex.build(work / "pages", log=lambda *_: None)
    index.save(work / "pages-index")
    build, build_cpu = time.perf_counter() - start, time.process_time() - cpu  # CPU time: fair on a shared machine
    start = time.perf_counter()
    loaded = DocsIndex.load(work / "pages-index")
    load = time.perf_counter() - start
    rng = random.Random(1)
    queries = [" ".join(rng.choice(WORDS) for _ in range(6)) + "?" for _ in range(90)]
    queries += ["".join(rng.choice(ZH) for _ in range(12)) + "？" for _ in range(10)]
    loaded.search(queries[0], 3)  # the first call loads jieba's dictionary
    times = []
    for q in queries:
        start = time.perf_counter()
        loaded.search(q, 3)
        times.append(time.perf_counter() - start)
    times.sort()
    return {"pages": 1000, "bytes": size, "chunks": len(index.chunks), "build_s": build, "build_cpu_s": build_cpu, "load_s": load,
            "query_median_ms": 1000 * statistics.median(times), "query_p95_ms": 1000 * times[int(0.95 * len(times)) - 1]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--langs", nargs="*", default=["en", "zh"], help="None: the indexing speed alone")
    parser.add_argument("--rows", nargs="+", default=["base", "doc", "ra", "doc+ra", "synth"])
    parser.add_argument("--iters", type=int, default=40, help="Training iterations per fine-tuning row (batch 2)")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="liandan-docs-qa-") as tmp:
        work = Path(tmp)
        for lang in args.langs:
            table, recall = run_language(lang, args.rows, args.iters, work / lang)
            print(f"\n[{lang}] retrieval recall@{recall['k']}: {recall['found']}/{recall['total']}")
            print("| setup | correct | exact | stopped | train s | eval s |\n| --- | ---: | ---: | ---: | ---: | ---: |")
            for r in table:
                print(f"| {r['setup']} | {r['correct']}/{r['total']} | {r['exact']}/{r['total']} | "
                      f"{r['stopped']}/{r['total']} | {r['train_s']:.0f} | {r['eval_s']:.0f} |", flush=True)
        if not args.skip_speed:
            s = indexing_speed(work)
            print(f"\nIndexing {s['pages']} Markdown pages ({s['bytes'] / 1e6:.2f} MB, {s['chunks']} chunks): "
                  f"{s['build_s']:.1f} s wall, {s['build_cpu_s']:.1f} s CPU (target < 30 s); loading the saved index {s['load_s']:.2f} s; "
                  f"query median {s['query_median_ms']:.1f} ms, p95 {s['query_p95_ms']:.1f} ms (target < 50 ms)")


if __name__ == "__main__":
    main()
