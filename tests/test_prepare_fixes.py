"""`liandan data prepare|check` and the data reader on inputs a user really has: a re-prepared directory,
prompts asked twice, odd rows and templates, a data folder without train.jsonl, tools on some chats only."""

from pathlib import Path

import pytest
from conftest import liandan, one_line_error, write_jsonl

from liandan.data.formats import load_splits, read_jsonl
from liandan.data.prepare import prepare, split
from liandan.errors import LiandanError


def quiet(*_):
    pass


def qa(n, prompt="q{i}"):
    return [{"prompt": prompt.format(i=i), "completion": f"a{i}"} for i in range(n)]


# 1. Re-preparing a directory never mixes two datasets.

def test_overwrite_removes_a_split_the_new_run_leaves_empty(tmp_path):
    source, out = write_jsonl(tmp_path / "raw.jsonl", qa(10)), tmp_path / "data"
    prepare([source], out, "completions", 0.1, 0.1, 0, log=quiet)
    (out / "notes.txt").write_text("mine")
    said = []
    counts = prepare([source], out, "completions", 0, 0.1, 0, log=said.append, overwrite=True)
    assert counts == {"test": 1, "valid": 0, "train": 9}
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "test.jsonl", "train.jsonl"]
    assert any("Removed the old" in line and "valid.jsonl" in line for line in said)


def test_no_example_left_for_train_is_an_error_and_changes_nothing(tmp_path):
    source, out = write_jsonl(tmp_path / "raw.jsonl", qa(10)), tmp_path / "data"
    prepare([source], out, "completions", 0.1, 0.1, 0, log=quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    two = write_jsonl(tmp_path / "two.jsonl", qa(2))
    result = liandan("data", "prepare", two, "--out", out, "--overwrite", "--valid-ratio", "0.5", "--test-ratio", "0.4")
    one_line_error(result, "2 distinct example(s) leave none for train.jsonl", "--valid-ratio 0.5", "--test-ratio 0.4")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


# 2. Duplicates are exact records; a prompt never lands in two splits.

def test_only_exact_duplicates_are_removed():
    records = [{"prompt": "Is 2+2 = 4?", "completion": "yes"}, {"prompt": "Is 2*2 = 4?", "completion": "yes"},
               {"prompt": "Is 2+2 = 4?", "completion": "yes"}]
    splits = split(records, 0, 0, 0)
    assert sorted(r["prompt"] for r in splits["train"]) == ["Is 2*2 = 4?", "Is 2+2 = 4?"]


def test_examples_with_the_same_prompt_stay_in_one_split():
    # Each question asked three times, answered differently, in other case and punctuation.
    records = [{"prompt": ["What is X%d?", "what is x%d", "WHAT IS X%d!"][k] % i, "completion": f"answer {k}"}
               for i in range(30) for k in range(3)]
    for seed in range(5):
        splits = split(records, 0.2, 0.1, seed)
        where = {}
        for name, rows in splits.items():
            for row in rows:
                key = row["prompt"].lower().strip("?!")
                assert where.setdefault(key, name) == name, f"{key} in {where[key]} and {name}"
        assert sum(map(len, splits.values())) == 90 and len(splits["valid"]) == 18 and len(splits["test"]) == 9
    # Small ratios still get a group: 10 prompts x 3 answers at 5 % each (1.5 wanted) and 40 x 2 at 1 %.
    small = split(records[:30], 0.05, 0.05, 0)
    assert len(small["valid"]) == 3 and len(small["test"]) == 3 and len(small["train"]) == 24
    pairs = [{"prompt": f"Q{i}", "completion": f"A{i}{k}"} for i in range(40) for k in range(2)]
    assert len(split(pairs, 0.0, 0.01, 0)["test"]) == 2


def test_one_prompt_for_all_examples_goes_to_train_with_a_note(tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl", qa(10, prompt="Tell me a joke"))
    said = []
    counts = prepare([source], tmp_path / "out", "completions", 0.1, 0.1, 0, log=said.append)
    assert counts == {"test": 0, "valid": 0, "train": 10}
    assert any("test.jsonl has 0 of the 1 example(s) asked for" in line for line in said)


# 3. Odd rows, templates and files are one-line errors at file:row.

@pytest.mark.parametrize("name, content, args, expected", [
    ("in.jsonl", '{"prompt": "q", "completion": "a"}\n5\n', [], "in.jsonl:2: expected an object"),
    ("in.json", '[{"prompt": "q", "completion": "a"}, "x"]', [], "in.json:2: expected an object"),
    ("in.csv", "prompt,completion\nq,a\nq,a,extra\n", [], "in.csv:3: more values than the header has columns"),
    ("in.parquet", "not parquet at all", [], "in.parquet: not a readable Parquet file"),
    ("in.jsonl", '{"prompt": "q", "completion": "a"}\n', ["--completion", "{}"], "--completion '{}': {} names no field"),
    ("in.jsonl", '{"prompt": "q", "completion": "a"}\n', ["--completion", "{a"], "--completion '{a': not a valid template"),
    ("in.jsonl", '{"prompt": "q", "completion": "a"}\n', ["--prompt", "{prompt!r}"], "without ':' or '!'"),
    # a stray quote would swallow the rows after it into one answer, and the file convert "successfully"
    ("in.csv", 'prompt,completion\nq1,a1\nq2,"He said ""hi\nq3,a3\nq4,a4\n', [],
     "in.csv:3: a quoted field starts here and never closes"),
    ("in.json", '[{"prompt": "q", "completion": {"text": ["a"]}}]', [], "in.json:1: field 'completion' (for --completion) "
     "is an object, not text"),
    ("in.jsonl", '{"q": "x", "a": ["y"]}\n', ["--prompt", "{q}", "--completion", "A: {a}"], "in.jsonl:1: field 'a' "
     "(for --completion) is a list"),
    ("in.jsonl", '{"prompt": "q", "completion": "a"}\n', ["--system", "{prompt}"],  # silently ignored before
     "--system does not apply to --format completions (it takes --prompt, --completion)"),
])
def test_prepare_refuses_bad_rows_and_templates_in_one_line(tmp_path, name, content, args, expected):
    (tmp_path / name).write_text(content)
    one_line_error(liandan("data", "prepare", tmp_path / name, "--out", tmp_path / "out", *args), expected)
    assert not (tmp_path / "out").exists()


def test_rows_with_nothing_to_learn_are_counted_with_their_lines(tmp_path):
    (tmp_path / "in.csv").write_text('prompt,completion\nq1,"multi\nline"\nq2,\n\n,a3\nq4,42\n')  # a blank line too
    said = []
    prepare([tmp_path / "in.csv"], tmp_path / "out", "completions", 0, 0, 0, log=said.append)
    assert f"Note: {tmp_path / 'in.csv'}: 2 row(s) with an empty prompt or completion skipped (lines 4, 6)" in said
    assert [e.messages[1]["content"] for e in read_jsonl(tmp_path / "out" / "train.jsonl").examples] == ["multi\nline", "42"]


def test_a_stray_quote_closed_further_down_is_noted_with_its_lines(tmp_path):
    """The csv module reads this without an error: q2's stray quote and q4's inch mark make rows 2-4 one answer.
    Well-quoted multi-line answers are not noted, also when one of their lines has a comma."""
    (tmp_path / "in.csv").write_text('prompt,completion\nq1,a1\nq2,"a2\nq3,a3\nq4,12"\nq5,a5\nq6,"one\ntwo"\n'
                                     'q7,"Mix.\nThen, bake.\nServe warm."\n')
    said = []
    prepare([tmp_path / "in.csv"], tmp_path / "out", "completions", 0, 0, 0, log=said.append)
    notes = [line for line in said if line.startswith("Note:")]
    assert notes == [f'Note: {tmp_path / "in.csv"}: 1 row(s) span lines that all look like rows of 2 values (lines '
                     '3–5); if a stray " opened that text, rows were merged into one example: check the quotes'], said


def test_template_fields_are_looked_up_by_their_whole_name(tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl", [{"0": "q", "a.b": "x", "c": None}])
    prepare([source], tmp_path / "out", "completions", 0, 0, 0, log=quiet, prompt="{0}", completion="{a.b}{c} {{ok}}")
    assert read_jsonl(tmp_path / "out" / "train.jsonl").examples[0].messages[1]["content"] == "x {ok}"


# 4-6. `data check`: a folder without train.jsonl, --show past a render error, what training does with long text.

@pytest.mark.parametrize("files", [[], ["train.JSONL"]])
def test_check_a_folder_without_train_jsonl(tmp_path, files):
    for name in files:
        (tmp_path / name).write_text('{"text": "a"}\n')
    result = liandan("data", "check", tmp_path, "--model", "none-needed")
    one_line_error(result, f"{tmp_path}: no train.jsonl")
    if files:
        assert "train.JSONL" in result.stderr
    (tmp_path / "test.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')  # what `lora --test` reads: fine
    assert liandan("data", "check", tmp_path).returncode in (0, 1)


def test_show_reports_a_render_error_at_its_line_and_keeps_the_report(tmp_path, tiny_llama):
    template = tmp_path / "t.jinja"
    template.write_text("{%- for m in messages -%}{%- if m['content'] == 'boom' -%}{{ raise_exception('no boom') }}"
                        "{%- endif -%}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}"
                        "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [{"prompt": "q1", "completion": "a1"}, {"prompt": "boom", "completion": "a"},
                                       {"prompt": "q3", "completion": "a3"}])
    result = liandan("data", "check", data, "--model", tiny_llama, "--chat-template", template, "--show", "3")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stdout + result.stderr
    assert "1 error(s)" in result.stdout and "tokens per example" in result.stdout
    assert f"{data / 'train.jsonl'}:2: the chat template failed to render" in result.stdout
    assert "--- train.jsonl:3" in result.stdout and "⟦" in result.stdout.split("--- train.jsonl:3")[1]


def test_long_text_warning_says_it_is_split(tmp_path, llama_tokenizer):
    from liandan.data.check import check, render_report
    from liandan.data.formats import FieldNames
    from liandan.data.render import Encoder, make_rendering

    encoder = Encoder(llama_tokenizer, make_rendering(llama_tokenizer))
    write_jsonl(tmp_path / "train.jsonl", [{"text": "word " * 300}])
    write_jsonl(tmp_path / "valid.jsonl", [{"prompt": "word " * 300, "completion": "a"}])
    text = "\n".join(render_report(check(tmp_path, encoder, 100, FieldNames()), encoder)[0])
    text_warning, chat_warning = [line for line in text.splitlines() if "longer than --max-seq-length" in line]
    assert "splits each into pieces" in text_warning and "truncated" not in text_warning
    assert "truncated in training" in chat_warning and "split" not in chat_warning


# 7. A local path is never taken for a Hub dataset.

@pytest.mark.parametrize("data", ["./typo_dir", "../typo_dir", "/no/such/dir", "~/no-such-liandan-dir", "tests/typo"])
def test_a_mistyped_local_path_is_not_a_hub_dataset(data, monkeypatch):
    from liandan.data.formats import check_data_path, is_hub_dataset

    monkeypatch.chdir(Path(__file__).parent.parent)  # where tests/ exists: tests/typo is a local path
    assert not is_hub_dataset(data)
    with pytest.raises(LiandanError, match=f"^--data {data}: no such directory$"):
        check_data_path(data)
    with pytest.raises(LiandanError, match="no such directory"):
        load_splits(data)


def test_a_hub_name_is_still_a_hub_dataset():
    from liandan.data.formats import check_data_path, is_hub_dataset

    assert is_hub_dataset("mlx-community/wikisql")
    check_data_path("mlx-community/wikisql")


# 8. Tools are optional per chat, as in mlx-lm.

CHAT = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
TOOLS = [{"type": "function", "function": {"name": "f", "description": "d", "parameters": {"type": "object", "properties": {}}}}]
CALL = {"messages": [{"role": "user", "content": "weather?"},
                     {"role": "assistant", "content": None,
                      "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]},
                     {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}]}


# A tool-use template that iterates `tools` unguarded, as Hermes-style templates do.
TOOLS_TEMPLATE = ("{%- for t in tools -%}{{ '<tools>' + t['function']['name'] + '</tools>\\n' }}{%- endfor -%}"
                  "{%- for m in messages -%}{{ '<|im_start|>' + m['role'] + '\\n' + (m['content'] or 'call') + '<|im_end|>\\n' }}"
                  "{%- endfor -%}{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}")


@pytest.mark.parametrize("rows, fmt", [
    ([CHAT, dict(CALL, tools=TOOLS)], "tools"),
    ([dict(CALL, tools=TOOLS), CHAT], "tools"),
    ([dict(CHAT, tools=None), CALL], "chat"),
    ([dict(CHAT, tools=None), dict(CHAT, tools=TOOLS)], "tools"),
])
def test_chat_and_tools_lines_mix(tmp_path, rows, fmt, llama_tokenizer):
    from liandan.data.render import Encoder, make_rendering

    data = read_jsonl(write_jsonl(tmp_path / "train.jsonl", rows))
    assert data.format == fmt and len(data) == 2
    assert [e.tools for e in data.examples] == [r.get("tools") for r in rows]
    (tmp_path / "tools.jinja").write_text(TOOLS_TEMPLATE)
    encoder = Encoder(llama_tokenizer, make_rendering(llama_tokenizer, chat_template=str(tmp_path / "tools.jinja")))
    for example in data.examples:
        encoded = encoder.encode(example)
        assert encoded.n_trained > 0
        assert ("<tools>f</tools>" in llama_tokenizer.decode(encoded.input_ids)) == (example.tools is not None)


def test_chat_and_tools_mix_in_a_saved_dataset(tmp_path):
    """A datasets column holds null where a row has no tools."""
    datasets = pytest.importorskip("datasets")
    tools = [{"type": "function", "function": {"name": "f", "description": "d"}}]
    datasets.Dataset.from_list([dict(CHAT, tools=None), dict(CHAT, tools=tools)]).save_to_disk(str(tmp_path / "ds"))
    train = load_splits(tmp_path / "ds")["train"]
    assert train.format == "tools" and [e.tools for e in train.examples] == [None, tools]
