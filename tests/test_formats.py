import pytest
from conftest import write_jsonl

from liandan.data.formats import FieldNames, load_splits, read_jsonl
from liandan.errors import LiandanError


def test_detects_each_format(tmp_path):
    cases = {
        "text": {"text": "hello"},
        "completions": {"prompt": "q", "completion": "a", "extra": 1},
        "chat": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        "tools": {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                  "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    }
    for fmt, row in cases.items():
        data = read_jsonl(write_jsonl(tmp_path / f"{fmt}.jsonl", [row, row]))
        assert data.format == fmt and len(data) == 2


def test_completions_become_two_messages(tmp_path):
    data = read_jsonl(write_jsonl(tmp_path / "a.jsonl", [{"prompt": "PolarDB是什么", "completion": "数据库"}]))
    assert data.examples[0].messages == [{"role": "user", "content": "PolarDB是什么"},
                                         {"role": "assistant", "content": "数据库"}]


def test_custom_feature_names(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"question": "q", "answer": "a"}])
    data = read_jsonl(path, FieldNames(prompt="question", completion="answer"))
    assert data.format == "completions"


@pytest.mark.parametrize("lines, message", [
    (['{"prompt": "q", "completion": "a"}', '{"prompt": "q", "completion": '], ":2: invalid JSON"),
    (['{"question": "q"}'], ":1: no known keys"),
    (['[1, 2]'], ":1: expected a JSON object"),
    (['{"prompt": 3, "completion": "a"}'], ":1: 'prompt' must be a string"),
    (['{"prompt": "q", "completion": ""}'], ":1: 'completion' is empty"),
    (['{"messages": []}'], ":1: 'messages' must be a non-empty list"),
    (['{"messages": [{"role": "user", "content": "q"}]}'], ":1: the chat has no assistant turn"),
    (['{"messages": [{"role": "bot", "content": "q"}]}'], ":1: message 0 has role 'bot'"),
    (['{"text": "a"}', '{"prompt": "q", "completion": "a"}'], ":2: this line is in the completions format"),
    ([], "the file is empty"),
    (['', '   '], "the file is empty"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, message):
    path = write_jsonl(tmp_path / "train.jsonl", lines)
    with pytest.raises(LiandanError) as err:
        read_jsonl(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value)
    assert "\n" not in str(err.value)


def test_bom_crlf_and_bad_utf8(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "a"}\r\n{"text": "b"}\r\n')
    assert [e.text for e in read_jsonl(path).examples] == ["a", "b"]
    bad = tmp_path / "bad.jsonl"
    bad.write_bytes(b'{"text": "a"}\n{"text": "\xff"}\n')
    with pytest.raises(LiandanError, match=r"bad.jsonl:2: not valid UTF-8"):
        read_jsonl(bad)


def test_load_splits(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [{"text": "a"}])
    splits = load_splits(tmp_path)
    assert splits["train"].format == "text" and splits["valid"] is None
    with pytest.raises(LiandanError, match="no such directory"):
        load_splits(tmp_path / "nope")
    with pytest.raises(LiandanError, match="not a directory"):
        load_splits(tmp_path / "train.jsonl")
