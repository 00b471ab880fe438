"""Documents → answers: the BM25 index (build, cache, bad input, Chinese), the prompt layout,
`data from-docs --questions`, `data synth`, `liandan eval`, and --docs in generate/serve/lora --test."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, liandan, write_jsonl

pytest.importorskip("bm25s")
pytest.importorskip("jieba")

HANDBOOK = REPO / "liandan" / "examples" / "handbook"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Index caches of these tests go to their tmp_path, not the shared tests/.cache (subprocesses too)."""
    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))


def make_docs(root: Path) -> Path:
    (root / "guide").mkdir(parents=True)
    (root / "guide" / "battery.md").write_text(
        "# Battery\n\nThe Zephyr drone charges in 50 minutes over USB-C.\n\n## Storage\n\n"
        "Store the battery at 40 percent charge in a cool place.\n")
    (root / "props.md").write_text("# Propellers\n\nReplace the propellers after 200 flights or any crash.\n")
    (root / "faq.html").write_text("<h1>FAQ</h1><p>The drone flies for 31 minutes on one battery.</p>")
    return root


def test_index_finds_the_chunk_and_is_cached_until_a_file_changes(tmp_path, monkeypatch):
    from liandan.docs.index import DocsIndex, cache_dir_for, open_docs

    docs = make_docs(tmp_path / "docs")
    notes = []
    index = open_docs(docs, notes.append)
    hits = index.search("How many minutes does the drone need to charge?", 2)
    assert hits[0].chunk.source == "guide/battery.md" and hits[0].chunk.section == "Battery"
    assert "50 minutes" in hits[0].chunk.text and hits[0].rank == 1
    assert index.search("Which propellers?", 3)[0].chunk.source == "props.md"
    assert index.search("zzzz unknown", 3) == []
    cached = cache_dir_for(docs) / "liandan-index.json"
    first = cached.stat().st_mtime_ns
    open_docs(docs, notes.append)
    assert cached.stat().st_mtime_ns == first  # unchanged files: the cached index is read, not rebuilt
    (docs / "props.md").write_text("# Propellers\n\nCarbon propellers last 500 flights.\n")
    os.utime(docs / "props.md", ns=(first + 10**9, first + 10**9))
    loads = []
    monkeypatch.setattr(DocsIndex, "load", classmethod(lambda cls, d: loads.append(d)))
    fresh = open_docs(docs, notes.append)
    assert "500 flights" in fresh.search("propellers flights", 1)[0].chunk.text
    assert loads == []  # the stale index is judged by its manifest, not loaded before the rebuild
    assert cached.stat().st_mtime_ns != first


def test_chinese_documents_are_segmented_with_jieba(tmp_path):
    from liandan.docs.index import open_docs

    index = open_docs(HANDBOOK / "zh")
    for question, section in [("保温模式最多能维持多长时间？", "电源与加热"), ("密封圈建议隔多长时间换新？", "清洁与保养"),
                              ("错误代码 E7 代表什么？", "故障排除")]:
        sections = [h.chunk.section.split(" > ")[-1] for h in index.search(question, 3)]
        assert section in sections, (question, sections)


def test_saved_index_refuses_other_files_and_rebuilds_when_its_files_change(tmp_path):
    docs = make_docs(tmp_path / "docs")
    other = make_docs(tmp_path / "other")
    out = tmp_path / "index"
    built = liandan("docs", "index", docs, "--out", out)
    assert built.returncode == 0 and "3 file(s)" in built.stdout, built.stderr
    refused = liandan("docs", "index", other, "--out", out)
    assert refused.returncode == 2 and refused.stderr.count("\n") == 1
    assert f"holds an index of {docs.resolve()}" in refused.stderr and "--overwrite" in refused.stderr
    (docs / "props.md").write_text("# Propellers\n\nTitanium propellers never wear out.\n")
    searched = liandan("docs", "search", out, "-q", "propellers", "--json")
    assert searched.returncode == 0 and "rebuilding" in searched.stderr
    assert "Titanium" in json.loads(searched.stdout)[0]["text"]
    assert liandan("docs", "index", other, "--out", out, "--overwrite").returncode == 0


def test_chinese_results_print_on_a_terminal_that_cannot_show_them(tmp_path):
    """An ASCII-only terminal gets the characters it lacks escaped, not a UnicodeEncodeError."""
    env = dict(os.environ, PYTHONIOENCODING="ascii")
    result = subprocess.run([sys.executable, "-m", "liandan", "docs", "search", HANDBOOK / "zh", "-q", "错误代码 E7"],
                            capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert b"E7" in result.stdout and b"\\u" in result.stdout and result.stdout.isascii()


def test_bad_document_folders(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "image.png").write_bytes(b"\x89PNG")
    result = liandan("docs", "index", empty, "--out", tmp_path / "i1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "no .md" in result.stderr
    binary = tmp_path / "binary"
    binary.mkdir()
    (binary / "a.md").write_bytes(b"\xff\xfe\x00\x01garbage")
    (binary / "b.txt").write_bytes(b"text\x00with NUL")
    result = liandan("docs", "index", binary, "--out", tmp_path / "i2")
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "no readable text in 2 document file(s) (2 not readable UTF-8 text)" in result.stderr
    (binary / "good.md").write_text("# Good\n\nReadable text.\n")
    result = liandan("docs", "index", binary, "--out", tmp_path / "i3")
    assert result.returncode == 0 and "Skipped 2 file(s) that are not readable UTF-8 text" in result.stdout
    assert "Indexed 1 file(s), 1 chunk(s)" in result.stdout
    missing = liandan("docs", "search", tmp_path / "nope", "-q", "x")
    assert missing.returncode == 2 and "no such file or directory" in missing.stderr


def test_prompt_layout_states_sources_and_replaces_only_the_last_question(tmp_path):
    from liandan.docs.index import open_docs
    from liandan.docs.prompt import DocsContext, DocsLayout

    docs = DocsContext(open_docs(make_docs(tmp_path / "docs")), DocsLayout(), top_k=2)
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
               {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "How many minutes does the drone need to charge?"}]
    messages, sources = docs.apply(history)
    assert messages[:3] == history[:3] and len(sources) == 2
    assert sources[0]["source"] == "guide/battery.md" and sources[0]["rank"] == 1
    text = messages[3]["content"]
    assert text.startswith("[1] guide/battery.md\n# Battery\n\n")
    assert "The Zephyr drone charges in 50 minutes over USB-C." in text and "\n\n[2] " in text
    assert text.endswith("\n\nAnswer in a few words from the text above.\nQuestion: How many minutes does the drone need to charge?")
    custom = DocsLayout.from_dict({"template": "{question}\n---\n{sources}", "source": "<{source}> {text}", "top_k": 1})
    asked, _ = DocsContext(docs.index, custom).apply([{"role": "user", "content": "propellers?"}])
    assert asked[0]["content"].startswith("propellers?\n---\n<props.md> # Propellers")


def test_a_long_running_docs_context_follows_edits_and_keeps_answering_when_a_rebuild_fails(tmp_path, monkeypatch):
    """serve and chat run for hours: an edited document is searched within RECHECK_SECONDS, without a restart."""
    import liandan.docs.prompt as prompt

    docs, notes = make_docs(tmp_path / "docs"), []
    context = prompt.DocsContext.open(docs, log=notes.append)
    question = [{"role": "user", "content": "How many flights do the propellers last?"}]
    assert "200 flights" in context.apply(question)[0][0]["content"]
    (docs / "props.md").write_text("# Propellers\n\nCarbon propellers last 500 flights.\n")
    assert "200 flights" in context.apply(question)[0][0]["content"]  # within RECHECK_SECONDS: not looked at yet
    monkeypatch.setattr(prompt, "RECHECK_SECONDS", 0.0)
    assert "500 flights" in context.apply(question)[0][0]["content"]
    for path in docs.rglob("*.*"):
        path.write_bytes(b"\xff\xfe\x00binary")  # nothing readable is left: the rebuild fails
    assert "500 flights" in context.apply(question)[0][0]["content"]
    assert notes and "cannot be indexed" in notes[-1] and "answering from the index as it was" in notes[-1]


def test_layout_versions_and_system_placement(tmp_path):
    from liandan.docs.index import open_docs
    from liandan.docs.prompt import _V1, LAYOUT_VERSION, DocsContext, DocsLayout
    from liandan.docs.qa import QA, retrieval_examples

    old_record = {k: v for k, v in _V1.items() if k not in ("placement", "version")}  # as version 1 saved it
    assert DocsLayout.from_dict(old_record) == DocsLayout(**_V1) and DocsLayout.from_dict(None) == DocsLayout()
    assert DocsLayout().version == LAYOUT_VERSION == 2 and DocsLayout.from_dict({"version": 1}) == DocsLayout(**_V1)
    index = open_docs(make_docs(tmp_path / "docs"))
    system = DocsLayout(template="Use this text.\n\n{sources}", source="{body}", placement="system", top_k=1)
    asked, _ = DocsContext(index, system).apply([{"role": "user", "content": "How long does the drone charge?"}])
    assert asked == [{"role": "system", "content": "Use this text.\n\nThe Zephyr drone charges in 50 minutes over USB-C."},
                     {"role": "user", "content": "How long does the drone charge?"}]
    kept, _ = DocsContext(index, system).apply([{"role": "system", "content": "Be brief."}, asked[1]])
    assert kept[0]["content"].startswith("Be brief.\n\nUse this text.") and len(kept) == 2
    records = retrieval_examples(index, [QA("How long does the drone charge?", "50 minutes", 1)], system, 1)
    assert records[0]["messages"][0]["role"] == "system" and records[0]["messages"][-1]["content"] == "50 minutes"


def test_from_docs_questions_train_records_the_layout_and_test_uses_docs(tmp_path, tiny_llama):
    data = tmp_path / "data"
    result = liandan("data", "from-docs", HANDBOOK / "en", "--out", data, "--questions",
                     HANDBOOK / "en" / "train_questions.jsonl", "--top-k", "3")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(l) for l in (data / "train.jsonl").read_text().splitlines()]
    questions = [json.loads(l) for l in (HANDBOOK / "en" / "train_questions.jsonl").read_text().splitlines()]
    assert len(rows) == 15
    for row, qa in zip(rows, questions):
        assert row["completion"] == qa["completion"] and row["prompt"].endswith("Question: " + qa["prompt"])
        assert len(row["sources"]) == 3 and qa["section"] in [s["section"].split(" > ")[-1] for s in row["sources"]]
    layout = json.loads((data / "docs-layout.json").read_text())
    write_jsonl(data / "test.jsonl", [{"prompt": "What is the capacity of the water tank?", "completion": "90 millilitres"}])
    adapter = tmp_path / "adapter"
    trained = liandan("lora", "--model", tiny_llama, "--train", "--data", data, "--iters", "2", "--batch-size", "1",
                      "--replay-ratio", "0", "--adapter-path", adapter)
    assert trained.returncode == 0, trained.stderr
    assert json.loads((adapter / "liandan.json").read_text())["docs_layout"] == layout
    tested = liandan("lora", "--test", "--adapter-path", adapter, "--data", data, "--docs", HANDBOOK / "en")
    assert tested.returncode == 0, tested.stderr
    assert "Test questions are asked with the top chunks of" in tested.stdout and "Exact answers: 0/1" in tested.stdout


def test_answer_scoring():
    from liandan.docs.qa import contains_answer, is_exact

    assert contains_answer("The Velora P7 weighs 410 Grams.", "410 grams")
    assert contains_answer("它重860克。", "860 克") and not contains_answer("86 克", "860 克")
    assert is_exact("Three years.", "three years") and not is_exact("three years, or two", "three years")
    assert not contains_answer("anything", "")


def test_eval_compares_four_modes_with_one_model_load(tmp_path, tiny_llama):
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"prompt": "Capital of France?", "completion": "Paris."}] * 2)
    adapter = tmp_path / "adapter"
    assert liandan("lora", "--model", tiny_llama, "--train", "--data", data, "--iters", "1", "--batch-size", "1",
                   "--replay-ratio", "0", "--adapter-path", adapter).returncode == 0
    result = liandan("eval", HANDBOOK / "en" / "questions.jsonl", "--adapter-path", adapter, "--docs", HANDBOOK / "en",
                     "--max-tokens", "4", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [m["mode"] for m in report["modes"]] == ["base", "base+docs", "adapter", "adapter+docs"]
    assert report["recall"]["k"] == 3 and report["recall"]["found"] >= 14 and report["recall"]["total"] == 15
    for mode in report["modes"]:
        assert mode["total"] == 15 and len(mode["answers"]) == 15 and mode["answers"][0]["expected"] == "410 grams"
    base, with_docs = report["modes"][0]["answers"], report["modes"][1]["answers"]
    assert [a["got"] for a in base] != [a["got"] for a in with_docs]  # the chunks reached the prompt
    table = liandan("eval", HANDBOOK / "en" / "questions.jsonl", "--model", tiny_llama, "--modes", "base",
                    "--max-tokens", "2")
    assert table.returncode == 0 and "| base | " in table.stdout and "(expected: 410 grams)" in table.stdout
    refused = liandan("eval", HANDBOOK / "en" / "questions.jsonl", "--model", tiny_llama, "--modes", "adapter")
    assert refused.returncode == 2 and "--adapter-path" in refused.stderr


class ScriptedTeacher:
    """Stands in for the teacher model: replies in the Q:/A: form, with a repeat and a near repeat."""

    def ask(self, prompt, max_tokens):
        topic = "propellers" if "Propellers" in prompt else "battery" if "Battery" in prompt else "flight"
        return (f"1. Q: What does the text say about the {topic}?\nA: It describes the {topic}.\n"
                f"Q: What does the text say about the {topic}?\nA: Again.\nQ: How long is a flight?\nA: 31 minutes.\n"
                "Q: How long is a flight ?\nA: 31 minutes.")


def test_synth_keeps_sources_drops_duplicates_and_leaks(tmp_path):
    from liandan.docs.index import read_chunks
    from liandan.docs.synth import drop_leaks, parse_pairs, synthesize

    assert parse_pairs("Q: 电池多久充满？\nA: 50 分钟。\n问：能飞多久？\n答：31 分钟") == [("电池多久充满？", "50 分钟。"),
                                                                                     ("能飞多久？", "31 分钟")]
    chunks, _, _ = read_chunks(make_docs(tmp_path / "docs"))
    records, dropped = synthesize(chunks, ScriptedTeacher(), per_chunk=4, max_tokens=64, log=lambda *_: None)
    questions = [r["prompt"] for r in records]
    assert len(questions) == len(set(questions)) and "How long is a flight?" in questions
    assert not any(q == "How long is a flight ?" for q in questions) and dropped > 0
    battery = next(r for r in records if "battery" in r["prompt"])
    assert battery["source"] == "guide/battery.md" and battery["section"] == "Battery"
    write_jsonl(tmp_path / "out" / "test.jsonl", [{"prompt": "How long is a flight?", "completion": "31 minutes"}])
    kept, leaks = drop_leaks(records, tmp_path / "out")
    assert leaks == 1 and "How long is a flight?" not in [r["prompt"] for r in kept]


def test_synth_with_an_unreachable_teacher_is_one_line(tmp_path):
    pytest.importorskip("openai")
    result = liandan("data", "synth", make_docs(tmp_path / "docs"), "--out", tmp_path / "out",
                     "--teacher-url", "http://127.0.0.1:9/v1")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "is the server running?" in result.stderr


def test_generate_and_serve_answer_with_sources(tmp_path, tiny_llama):
    from test_serve import Server

    result = liandan("generate", "--model", tiny_llama, "--docs", HANDBOOK / "en", "-p", "How much ground coffee goes into the basket?",
                     "-m", "3")
    assert result.returncode == 0, result.stderr
    assert "Sources: [1] velora-p7.md — Velora P7 Handbook > Brewing" in result.stdout
    chat = subprocess.run([sys.executable, "-m", "liandan", "chat", "--model", str(tiny_llama), "--docs", str(HANDBOOK / "en"),
                           "-m", "3"], input="How much ground coffee goes into the basket?\nAnd water?\n", text=True,
                          capture_output=True, timeout=300)
    assert chat.returncode == 0 and chat.stdout.startswith("liandan chat"), chat.stderr
    server = Server("--model", tiny_llama, "--docs", HANDBOOK / "zh", "--model-name", "m")
    try:
        import httpx

        reply = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
            "model": "m", "max_tokens": 3, "messages": [{"role": "user", "content": "错误代码 E7 代表什么？"}]}).json()
    finally:
        server.stop()
    assert reply["sources"][0]["section"].endswith("故障排除") and reply["choices"][0]["message"]["role"] == "assistant"


@pytest.mark.slow  # 164 s on a quiet 2-core machine
def test_embedded_model_answers_from_the_handbook(tmp_path):
    """On the real model, retrieved chunks help: 0/15 without, 4/15 with --docs in layout version 2 (recall@3 14/15)."""
    result = liandan("eval", HANDBOOK / "en" / "questions.jsonl", "--docs", HANDBOOK / "en", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    base, with_docs = report["modes"]
    assert report["recall"]["found"] >= 14
    assert with_docs["correct"] > base["correct"], (base["correct"], with_docs["correct"])


def test_cutting_keeps_the_text_and_bounds_every_piece():
    from liandan.data.docs import _pieces, sections
    from liandan.docs.index import count_words

    paragraph = ("The pump reaches 2.5 bar. Details are at example.com today.\n- first item\n- second item\n"
                 + "重量860克电压220伏" * 30 + "。下一句。")
    pieces = _pieces(paragraph, 20, 5, count_words)
    assert all(count_words(p) <= 20 for p in pieces) and len(pieces) > 5
    assert pieces[0] == "The pump reaches 2.5 bar. Details are at example.com today.\n- first item"
    assert "".join(pieces).replace("\n", "").startswith(paragraph.replace("\n", "")[:60])  # nothing added or lost
    heads = list(sections("# Setup\n\nInstall it.\n\n```bash\n# not a heading\n\npip install x\n```\n\nDone.\n"))
    assert heads == [(["Setup"], ["Install it.", "```bash\n# not a heading\n\npip install x\n```", "Done."])]
    from liandan.data.docs import chunk_document
    from liandan.docs.prompt import body_of
    from liandan.docs.index import Chunk

    deep = "".join(f"{'#' * level} {'Very long heading words ' * 3}{level}\n\n" for level in range(1, 6))
    chunks = chunk_document(deep + "The last section's text. " * 20, count_words, 40, 5)
    assert chunks and all(count_words(text) <= 40 for _, text in chunks)  # a long heading path is shortened
    title, text = chunks[0]
    assert title.count(" > ") == 4 and text.startswith(f"# {title.split(' > ')[-1]}\n\n")  # the path stays recorded
    assert body_of(Chunk(text, "a.md", title)).startswith("The last section's text.")


def test_document_files_skip_hidden_and_package_folders(tmp_path):
    from liandan.data.docs import document_files
    from liandan.errors import LiandanError

    docs = make_docs(tmp_path / "docs")
    for folder in (".git", ".venv/lib", "node_modules/pkg"):
        (docs / folder).mkdir(parents=True)
        (docs / folder / "README.md").write_text("# Not yours\n\nDependency text.\n")
    assert sorted(p.relative_to(docs).as_posix() for p in document_files(docs)) == [
        "faq.html", "guide/battery.md", "props.md"]
    (docs / "index.json").write_text("{}")
    with pytest.raises(LiandanError, match="not a .md"):
        document_files(docs / "index.json")


def test_relevance_accepts_synth_heading_paths_and_bom_question_files(tmp_path):
    from liandan.docs.index import Chunk
    from liandan.docs.qa import QA, is_relevant, read_questions
    from liandan.errors import LiandanError

    chunk = Chunk("# Battery > Storage\n\nStore the battery at 40 percent.", "guide/battery.md", "Battery > Storage")
    for section in ("Storage", "Battery > Storage"):  # by hand / as `data synth` writes it
        assert is_relevant(chunk, QA("How to store it?", "40 percent", 1, section))
    assert not is_relevant(chunk, QA("How to store it?", "40 percent", 1, "Battery"))
    path = tmp_path / "qa.jsonl"
    path.write_bytes('{"prompt": "How to store it?", "completion": "40 percent", "section": "Storage"}\n'.encode("utf-8-sig"))
    assert read_questions(path)[0].section == "Storage"
    path.write_text('{"prompt": "q", "completion": "a"}\n{"prompt": "q", "completion": "a", "section": 3}\n')
    with pytest.raises(LiandanError, match=r'qa.jsonl:2: "section" must be text'):
        read_questions(path)


def test_from_docs_never_replaces_questions_or_data_without_overwrite(tmp_path):
    data = tmp_path / "data"
    questions = HANDBOOK / "en" / "train_questions.jsonl"
    assert liandan("data", "from-docs", HANDBOOK / "en", "--out", data, "--questions", questions).returncode == 0
    again = liandan("data", "from-docs", HANDBOOK / "en", "--out", data, "--questions", questions)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "--overwrite" in again.stderr
    own = tmp_path / "own"
    own.mkdir()
    (own / "train.jsonl").write_text(questions.read_text())
    result = liandan("data", "from-docs", HANDBOOK / "en", "--out", own, "--questions", own / "train.jsonl", "--overwrite")
    assert result.returncode == 2 and "which this command reads" in result.stderr
    assert (own / "train.jsonl").read_text() == questions.read_text()
    zero = liandan("data", "from-docs", HANDBOOK / "en", "--out", tmp_path / "z", "--questions", questions, "--top-k", "0")
    assert zero.returncode == 2 and "--top-k must be at least 1, got 0" in zero.stderr
    sized = liandan("data", "from-docs", HANDBOOK / "en", "--out", tmp_path / "s", "--questions", questions,
                    "--chunk-tokens", "100")
    assert sized.returncode == 2 and "--chunk-tokens sizes plain text chunks" in sized.stderr
    plain = liandan("data", "from-docs", HANDBOOK / "en", "--out", data, "--overwrite")
    assert plain.returncode == 0, plain.stderr
    assert not (data / "docs-layout.json").exists()  # plain text chunks: no layout for the adapter to record


def test_copies_take_one_place_in_the_top_k_and_html_head_is_not_text(tmp_path):
    from liandan.data.docs import read_document
    from liandan.docs.index import DocsIndex

    docs = make_docs(tmp_path / "docs")
    (docs / "battery-copy.md").write_text((docs / "guide" / "battery.md").read_text())
    hits = DocsIndex.build(docs, log=lambda *_: None).search("How long does the battery take to charge?", 3)
    texts = [h.chunk.text for h in hits]
    assert len(texts) == 3 and len(set(texts)) == 3 and [h.rank for h in hits] == [1, 2, 3]
    page = tmp_path / "page.html"
    page.write_text("<html><head><title>Zephyr | Shop</title><head><body><aside>Menu</aside><h1>Zephyr</h1>"
                    "<p>It flies.</p></body></html>")
    text = read_document(page)
    assert "It flies." in text and "Shop" not in text and "Menu" not in text
