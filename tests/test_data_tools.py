"""`liandan data check|prepare|from-docs` and the --long-examples policy, on realistic and nasty inputs."""

import csv
import json

import pytest
from conftest import JOKES, liandan, write_jsonl

from liandan.data.check import check, render_report
from liandan.data.formats import FieldNames, read_jsonl
from liandan.data.render import Encoder, make_rendering

SEED = [("PolarDB是什么", "阿里云开源宇宙无敌数据库"), ("Oracle数据库会被什么打败", "国产数据库"), ("为什么电动汽车比较费油", "因为电很贵"),
        ("哪吒的师傅是谁", "孙悟空的师傅的舅舅"), ("月亮哪天最圆", "星期八"), ("谁是最帅的地球人", "德哥")]


def seed_dir(root, typed=True):
    end = "<|endoftext|>" if typed else ""
    rows = [{"prompt": q + end, "completion": a + end} for q, a in SEED]
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "valid.jsonl", rows[:3])
    write_jsonl(root / "test.jsonl", rows[3:])
    return root


@pytest.fixture(scope="module")
def encoder(llama_tokenizer):
    return Encoder(llama_tokenizer, make_rendering(llama_tokenizer))


def run_check(target, encoder, max_seq_length=2048):
    result = check(target, encoder, max_seq_length, FieldNames())
    lines, errors, warnings = render_report(result, encoder)
    return "\n".join(lines), errors, warnings, result


def test_seed_layout_with_hand_typed_tokens(tmp_path, encoder):
    text, errors, warnings, _ = run_check(seed_dir(tmp_path), encoder)
    assert errors == 0 and warnings == 5
    assert "stop tokens typed by hand ('<|endoftext|>' ×12)" in text and "'<|im_end|>' itself" in text
    assert "leakage: 3 of 3 valid example(s) also appear in train" in text
    assert "valid.jsonl:2 = train.jsonl:2 (exact)" in text and "test.jsonl:1 = train.jsonl:4 (exact)" in text
    assert "completions, 6 example(s)" in text and "tokens per example" in text


def test_clean_data_passes(tmp_path, tiny_llama):
    rows = [{"prompt": q, "completion": a} for q, a in SEED]
    write_jsonl(tmp_path / "train.jsonl", rows[:4])
    write_jsonl(tmp_path / "valid.jsonl", rows[4:5])
    write_jsonl(tmp_path / "test.jsonl", rows[5:])
    result = liandan("data", "check", tmp_path, "--model", tiny_llama)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "✓ no valid/train leakage" in result.stdout and "0 error(s), 0 warning(s)" in result.stdout
    as_json = liandan("data", "check", tmp_path, "--model", tiny_llama, "--json")
    report = json.loads(as_json.stdout)
    assert report["errors"] == 0 and report["files"][0]["tokens"]["max"] >= report["files"][0]["tokens"]["min"] > 10


def test_errors_are_listed_by_line_and_capped(tmp_path, encoder):
    lines = ['{"prompt": "q", "completion": "a"}'] + ['{"prompt": "q", "completion": '] * 25
    write_jsonl(tmp_path / "train.jsonl", lines)
    text, errors, _, _ = run_check(tmp_path, encoder)
    assert errors == 25
    assert f"{tmp_path / 'train.jsonl'}:2: invalid JSON" in text and "… 5 more error(s), 25 in all" in text


def test_nasty_bytes_duplicates_empty_fields_near_leaks(tmp_path, encoder):
    (tmp_path / "train.jsonl").write_bytes(
        b'\xef\xbb\xbf{"prompt": "What is the capital of France?", "completion": "Paris"}\r\n'
        b'{"prompt": "What is the capital of France?", "completion": "Paris"}\r\n'
        b'{"prompt": "   ", "completion": "x"}\n'
        b'{"prompt": "caf\xe9", "completion": "x"}\n'
        b'{"prompt": "Tell me about the history of the Roman empire in detail", "completion": "Long."}\n')
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "tell me about the history of the roman empire, in detail!",
                                            "completion": "y"},
                                           {"prompt": "Tell me about the history of the Roman empires in detail",
                                            "completion": "z"},
                                           {"prompt": "Something else entirely", "completion": "w"}])
    text, errors, warnings, result = run_check(tmp_path, encoder)
    assert errors == 1 and f"{tmp_path / 'train.jsonl'}:4: not valid UTF-8" in text
    assert "1 duplicate example(s): lines 2 (= 1)" in text
    assert "1 example(s) with an empty or whitespace-only field: lines 3" in text
    leaks = result["leakage"]["valid"]
    assert [(l["line"], l["train_line"], l["kind"].split()[0]) for l in leaks] == [(1, 5, "exact"), (2, 5, "near")]


def test_over_length_examples_are_counted(tmp_path, encoder):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "word " * 300}, {"text": "short"}])
    text, _, warnings, _ = run_check(tmp_path, encoder, max_seq_length=100)
    assert "1 example(s) longer than --max-seq-length 100" in text and warnings == 1


def test_prepare_medical_o1_layout_with_think_tags(tmp_path):
    rows = [{"Question": f"Q{i}?", "Complex_CoT": f"reasoning {i}", "Response": f"answer {i}"} for i in range(50)]
    rows.append(dict(rows[0]))  # an exact duplicate must not end up in two splits
    (tmp_path / "in.json").write_text(json.dumps(rows))
    result = liandan("data", "prepare", tmp_path / "in.json", "--out", tmp_path / "out", "--prompt", "Question",
                     "--completion", "<think>\n{Complex_CoT}\n</think>\n\n{Response}", "--valid-ratio", "0.2",
                     "--test-ratio", "0.1", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "(1 duplicate(s) removed)" in result.stdout
    splits = {s: read_jsonl(tmp_path / "out" / f"{s}.jsonl") for s in ("train", "valid", "test")}
    assert [len(splits[s]) for s in ("train", "valid", "test")] == [35, 10, 5]
    prompts = {s: {e.messages[0]["content"] for e in d.examples} for s, d in splits.items()}
    assert not (prompts["train"] & prompts["valid"]) and not (prompts["train"] & prompts["test"])
    example = splits["train"].examples[0].messages
    n = example[0]["content"][1:-1]
    assert example[1]["content"] == f"<think>\nreasoning {n}\n</think>\n\nanswer {n}"
    again = liandan("data", "prepare", tmp_path / "in.json", "--out", tmp_path / "again", "--prompt", "Question",
                    "--completion", "<think>\n{Complex_CoT}\n</think>\n\n{Response}", "--valid-ratio", "0.2",
                    "--test-ratio", "0.1", "--seed", "3")
    assert again.returncode == 0
    assert (tmp_path / "again" / "test.jsonl").read_text() == (tmp_path / "out" / "test.jsonl").read_text()


def test_prepare_csv_to_chat_with_guessed_fields_and_errors(tmp_path):
    with open(tmp_path / "in.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["question", "answer", "sys"])
        writer.writeheader()
        for i in range(10):
            writer.writerow({"question": f"问题{i}", "answer": f"回答{i}", "sys": "你是德哥"})
    result = liandan("data", "prepare", tmp_path / "in.csv", "--out", tmp_path / "out", "--format", "chat",
                     "--system", "sys", "--valid-ratio", "0", "--test-ratio", "0")
    assert result.returncode == 0, result.stderr
    data = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert data.format == "chat" and len(data) == 10
    assert data.examples[0].messages[0] == {"role": "system", "content": "你是德哥"}
    bad = liandan("data", "prepare", tmp_path / "in.csv", "--out", tmp_path / "x", "--completion", "{Nope}")
    assert bad.returncode == 2 and f"{tmp_path / 'in.csv'}:2: no field 'Nope'" in bad.stderr
    assert not (tmp_path / "x").exists()


def test_from_docs_chunks_fit_and_keep_their_source(tmp_path, tiny_llama, llama_tokenizer):
    docs = tmp_path / "docs"
    (docs / "guide").mkdir(parents=True)
    long_paragraph = " ".join(f"PolarDB feature number {i} is described in this sentence." for i in range(80))
    (docs / "guide" / "intro.md").write_text(
        f"# PolarDB\n\nPolarDB is an open-source database.\n\n## Install\n\nRun the installer.\n\n{long_paragraph}\n")
    (docs / "faq.html").write_text("<html><head><style>p{}</style></head><body><h1>FAQ</h1><p>Is it free?</p>"
                                   "<p>Yes, it is open source.</p><script>var x;</script></body></html>")
    (docs / "notes.txt").write_text("Plain notes.\n\nSecond paragraph.")
    result = liandan("data", "from-docs", docs, "--out", tmp_path / "out", "--model", tiny_llama, "--chunk-tokens", "120",
                     "--overlap", "20")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(l) for l in (tmp_path / "out" / "train.jsonl").read_text().splitlines()]
    assert {r["source"] for r in rows} == {"guide/intro.md", "faq.html", "notes.txt"}
    for r in rows:
        assert len(llama_tokenizer(r["text"], add_special_tokens=False)["input_ids"]) <= 120
    install = [r for r in rows if r["section"] == "PolarDB > Install"]
    assert len(install) >= 4 and all(r["text"].startswith("# PolarDB > Install\n\n") for r in install)
    faq = next(r for r in rows if r["source"] == "faq.html")
    assert "Is it free?" in faq["text"] and "var x" not in faq["text"] and "p{}" not in faq["text"]
    assert read_jsonl(tmp_path / "out" / "train.jsonl").format == "text"


def test_long_example_policies(tmp_path, encoder):
    from liandan.data.batching import encode_file

    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "word " * 250}, {"text": "short text"}])
    data = read_jsonl(path)
    notes = []
    split = encode_file(data, encoder, 100, notes.append)  # default for text: split
    assert len(split.items) >= 4 and all(len(x.input_ids) <= 100 for x in split.items)
    assert "were split into pieces" in notes[-1]
    assert len(encode_file(data, encoder, 100, notes.append, "drop").items) == 1
    chats = read_jsonl(write_jsonl(tmp_path / "c.jsonl", [{"prompt": "word " * 250, "completion": "ok"},
                                                          {"prompt": "q", "completion": "a"}]))
    notes.clear()
    with pytest.raises(Exception, match="c.jsonl:1: no tokens left to train on after truncation"):
        encode_file(chats, encoder, 100, notes.append)  # the answer was cut off: refuse, naming the line


def test_mixed_formats_train_on_documents_validate_on_questions(tmp_path, tiny_llama):
    from liandan.config import load_config
    from liandan.lora import run

    write_jsonl(tmp_path / "train.jsonl", [{"text": "PolarDB是阿里云开源宇宙无敌数据库。"}] * 4)
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "PolarDB是什么", "completion": "阿里云开源宇宙无敌数据库"}])
    logs = []
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(tmp_path), iters=2, batch_size=2,
                               adapter_path=str(tmp_path / "a"))), log=logs.append)
    assert any(l.startswith("Iter 2: Val loss") for l in logs)
    assert json.loads((tmp_path / "a" / "liandan.json").read_text())["rendering"]["prompt_style"] == "raw"
    chat = liandan("chat", "--adapter-path", tmp_path / "a", "-m", "2", input="/exit\n")
    assert chat.returncode == 0 and "trained on plain text" in chat.stderr and "liandan generate" in chat.stderr


def test_shipped_jokes_check_cleanly_except_the_seeds_own_leakage(encoder):
    text, errors, warnings, _ = run_check(JOKES, encoder)
    assert errors == 0 and "typed by hand" not in text and "leakage" in text


def test_data_from_a_saved_datasets_dataset(tmp_path, tiny_llama):
    datasets = pytest.importorskip("datasets")
    from liandan.data.formats import load_splits

    rows = [{"question": q, "answer": a} for q, a in SEED]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows),
                          "validation": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "ds"))
    splits = load_splits(tmp_path / "ds", FieldNames(prompt="question", completion="answer"))
    assert splits["train"].format == "completions" and len(splits["train"]) == 6 and len(splits["valid"]) == 2
    assert splits["test"] is None
    result = liandan("lora", "--model", tiny_llama, "--train", "--data", tmp_path / "ds", "--iters", "1", "--batch-size", "2",
                     "--adapter-path", tmp_path / "a")
    assert result.returncode == 2 and "ds/train:1: no known keys" in result.stderr  # field names come from the config
    offline = liandan("lora", "--model", tiny_llama, "--train", "--data", "mlx-community/wikisql", "--iters", "1",
                      "--adapter-path", tmp_path / "b")
    assert offline.returncode == 2 and "cannot load the dataset" in offline.stderr
