"""A hostile or careless user, through the real CLI: every probe ends in one or two lines on stderr, exit 2
(bad input) or 3 (a bug, logged), never a traceback or exit 1, and nothing the user had is changed."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
from conftest import liandan, one_line_error, write_jsonl

from liandan.atomic import check_output, removed_if_failed
from liandan.cli import run
from liandan.config import load_config
from liandan.data.formats import load_splits, read_jsonl
from liandan.data.prepare import prepare
from liandan.errors import LiandanError


def snapshot(root):
    """Every file under root (or root itself) with its content hash: equal snapshots = nothing changed."""
    root = os.fspath(root)
    if os.path.isfile(root):
        return {"": hashlib.sha256(open(root, "rb").read()).hexdigest()}
    found = {}
    for folder, _, files in os.walk(root):
        for name in files:
            path = os.path.join(folder, name)
            found[os.path.relpath(path, root)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def assert_refused(result, *expected, code=2):
    both = result.stdout + result.stderr
    assert result.returncode == code, both[-3000:]
    assert "Traceback" not in both
    assert len(result.stderr.strip().splitlines()) <= 2, result.stderr
    for text in expected:
        assert text in both, both[-3000:]


GOOD = '{"prompt": "q", "completion": "a"}'
# What a careless or hostile user put on a line, and the message expected for it at file:line.
BAD_LINES = [
    ('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}", "JSON nested deeper than 1024 levels"),
    ('{"prompt": "q", "completion": "a", "n": ' + "7" * 5000 + "}", "a number too large"),
    ('{"prompt": "q\\ud800", "completion": "a"}', "a lone UTF-16 surrogate"),
]
SPECIAL_FILES = {"fifo": "a FIFO", "directory": "a directory", "device": "a device"}


def special_file(kind, path):
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "directory":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")  # a device that never ends a line
    return path


@pytest.mark.parametrize("line, expected", BAD_LINES)
def test_reader_refuses_with_file_and_line(line, expected, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [GOOD, line])
    with pytest.raises(LiandanError, match=f"train.jsonl:2: {expected}"):
        read_jsonl(path)


@pytest.mark.parametrize("kind", SPECIAL_FILES)
def test_special_files_are_refused_not_read(kind, tmp_path):
    special_file(kind, tmp_path / "train.jsonl")
    with pytest.raises(LiandanError, match=f"train.jsonl: {SPECIAL_FILES[kind]}, not a regular file"):
        load_splits(tmp_path)


def test_data_check_reports_every_probe_at_its_line(tmp_path, tiny_llama):
    """One run over all probes: a bad line never stops the check of the others, nor crashes it."""
    over_cap = '{"prompt": "' + "x" * 400_000 + '", "completion": "a"}'
    train = write_jsonl(tmp_path / "train.jsonl", [GOOD] + [line for line, _ in BAD_LINES] + [over_cap, GOOD])
    before = snapshot(train)
    for kind, name in zip(SPECIAL_FILES, ("valid", "test", "extra")):
        special_file(kind, tmp_path / f"{name}.jsonl")
    result = liandan("data", "check", tmp_path, "--model", tiny_llama, "--max-line-bytes", 300_000, timeout=300)
    expected = [f"train.jsonl:{n}: {message}" for n, (_, message) in enumerate(BAD_LINES, start=2)]
    expected += ["train.jsonl:5: the line is longer than --max-line-bytes 300,000"]
    expected += [f"{name}.jsonl: {SPECIAL_FILES[kind]}, not a regular file" for kind, name in zip(SPECIAL_FILES, ("valid", "test"))]
    expected += ["Not checked, as training does not read them: extra.jsonl"]  # (what lora writes there, e.g. metrics.jsonl)
    assert_refused(result, "train.jsonl: completions, 2 example(s)", *expected)
    assert snapshot(train) == before


@pytest.mark.parametrize("probe", ["surrogate", "fifo"])
def test_lora_train_refuses_and_leaves_no_adapter_directory(probe, tiny_llama, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    if probe == "fifo":
        special_file("fifo", data / "train.jsonl")
        expected = "train.jsonl: a FIFO, not a regular file"
    else:
        write_jsonl(data / "train.jsonl", [GOOD, BAD_LINES[2][0]])
        expected = f"train.jsonl:2: {BAD_LINES[2][1]}"
    out = tmp_path / "runs"
    result = liandan("lora", "--model", tiny_llama, "--train", "--data", data, "--iters", 1,
                     "--adapter-path", out / "a" / "adapters", timeout=300)
    assert_refused(result, expected)
    assert not out.exists()  # the failed run removed the directories it had created, and only those


def test_failed_run_removes_only_the_empty_directories_it_created(tmp_path):
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError):
        with removed_if_failed(tmp_path / "kept" / "new" / "adapters"):
            (tmp_path / "kept" / "new" / "adapters" / "checkpoints" / "empty").mkdir(parents=True)
            raise RuntimeError
    assert [p.name for p in tmp_path.iterdir()] == ["kept"] and not any((tmp_path / "kept").iterdir())
    with pytest.raises(RuntimeError):
        with removed_if_failed(tmp_path / "new" / "adapters"):
            (tmp_path / "new" / "adapters" / "checkpoints").mkdir(parents=True)
            (tmp_path / "new" / "adapters" / "checkpoints" / "saved").write_text("a checkpoint")
            raise RuntimeError
    assert (tmp_path / "new" / "adapters" / "checkpoints" / "saved").is_file()
    with pytest.raises(RuntimeError):  # a log opened before the failure, nothing in it
        with removed_if_failed(tmp_path / "other" / "adapters"):
            (tmp_path / "other" / "adapters").mkdir(parents=True)
            (tmp_path / "other" / "adapters" / "metrics.jsonl").touch()
            raise RuntimeError
    assert not (tmp_path / "other").exists()


def test_ten_thousand_turn_chat_is_checked(tmp_path, tiny_llama):
    turns = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(10_000)]
    write_jsonl(tmp_path / "train.jsonl", [{"messages": turns}])
    result = liandan("data", "check", tmp_path, "--model", tiny_llama, timeout=300)
    assert result.returncode == 1, result.stdout + result.stderr  # a warning: longer than --max-seq-length
    assert "1 example(s) longer than --max-seq-length 2048" in result.stdout


def test_a_bug_is_exit_3_with_one_line_and_a_log(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("LIANDAN_DEBUG", raising=False)
    assert run(lambda args: {}["boom"], None) == 3
    stderr = capsys.readouterr().err
    assert stderr.startswith("liandan: internal error: KeyError: 'boom' (please report; details in ")
    assert len(stderr.splitlines()) == 1
    logs = list((tmp_path / "cache" / "logs").glob("crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in stderr and "Traceback" in logs[0].read_text()


def test_a_path_the_system_refuses_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    """Not a bug of liandan's: the user's to fix, so one line (the traceback still goes to the log)."""
    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))

    def refused(args):
        raise PermissionError(13, "Permission denied", "/srv/models/out")

    assert run(refused, None) == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("liandan: error: /srv/models/out: Permission denied (details in ") and len(stderr.splitlines()) == 1


def test_a_full_disk_is_one_line_too(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))

    def full(args):
        raise OSError(__import__("errno").ENOSPC, "No space left on device")  # write() names no file

    assert run(full, None) == 2
    assert capsys.readouterr().err.startswith("liandan: error: No space left on device (details in ")


def test_an_output_under_a_file_is_refused_before_any_work(tmp_path):
    (tmp_path / "afile").write_text("mine")
    (tmp_path / "t.csv").write_text("prompt,completion\nq,a\n")
    for out in ("afile", "afile/sub"):
        one_line_error(liandan("data", "prepare", tmp_path / "t.csv", "--out", tmp_path / out),
                       f"{tmp_path / 'afile'} is not a folder")
        one_line_error(liandan("docs", "index", tmp_path, "--out", tmp_path / "afile" / "sub"),
                       f"{tmp_path / 'afile'} is not a folder")
    assert (tmp_path / "afile").read_text() == "mine"


def test_misused_commands_say_what_to_do_in_one_line(tmp_path, tiny_llama):
    """Found by running the CLI as a user would: each was a traceback, a misleading message or a silent no-op."""
    json = __import__("json")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    moved = tmp_path / "moved"
    moved.mkdir()
    (moved / "liandan.json").write_text(json.dumps({"base_model": str(tmp_path / "gone"), "fine_tune_type": "lora"}))
    listed = tmp_path / "listed"
    listed.mkdir()
    (listed / "liandan.json").write_text("[]")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Title\n\nSome words about a product, enough to index.\n")
    (tmp_path / "loop").symlink_to(tmp_path / "loop")
    (tmp_path / "t.csv").write_text("prompt,completion\nq,a\n")
    write_jsonl(tmp_path / "first" / "train.jsonl", [{"messages": [{"role": "assistant", "content": "hi"}]}])
    cases = [
        (["fuse", "--adapter-path", adapter, "--outtype", "q8_0"], "--outtype applies to the GGUF; add --export-gguf"),
        (["fuse", "--adapter-path", adapter, "--gguf-path", tmp_path / "x.gguf"], "--gguf-path applies to the GGUF"),
        (["data", "from-docs", docs, "--out", tmp_path / "o1", "--chunk-tokens", "2"], "--chunk-tokens must be at least 16"),
        (["data", "from-docs", docs, "--out", tmp_path / "o2", "--overlap", "-3"], "--overlap -3 must be 0 or more"),
        (["data", "from-docs", docs, "--out", tmp_path / "o3", "--chunk-tokens", "0", "--model", tmp_path / "none"],
         "--chunk-tokens must be at least 16"),  # before the tokenizer (here: no model) loads
        (["docs", "search", docs, "-q", "product", "--top-k", "0"], "--top-k must be at least 1, got 0"),
        (["docs", "index", tmp_path / "loop", "--out", tmp_path / "ix"], "loop: no such file or directory"),
        (["generate", "--adapter-path", moved, "-p", "hi"], f"names the base model {tmp_path / 'gone'}, which is not "
                                                            "there any more; pass --model"),
        (["generate", "--adapter-path", listed, "-p", "hi"], "liandan.json: expected a JSON object"),
        (["export", "ollama", "--model", adapter, "--name", "m"], "is an adapter, not a model; give it as --adapter-path"),
        (["data", "check", tmp_path / "t.csv"], "data check reads JSONL, as training does; convert this table first"),
        (["eval", tmp_path, "--model", tiny_llama], "a folder; give the questions file"),
        (["export", "gguf", "--model", tiny_llama, "--outfile", tmp_path / "y.gguf", "--data", tmp_path],
         "--data is the validation data of --check; add --check"),
    ]
    for argv, expected in cases:
        one_line_error(liandan(*argv), expected)
    report = liandan("data", "check", tmp_path / "first", "--model", tiny_llama)  # not "an empty conversation"
    assert report.returncode == 2 and "train.jsonl:1: the chat starts with an assistant turn" in report.stdout


def test_written_files_get_the_usual_permissions(tmp_path):
    """safetensors' save_file replaces the file it is given with a 0600 one; the adapter must be readable by the
    group and others as every other output is (a shared model folder, a container running as another user)."""
    from safetensors.torch import save_file

    from liandan.atomic import atomic_dir, atomic_path

    old = os.umask(0o022)
    try:
        with atomic_path(tmp_path / "a.safetensors") as tmp:
            save_file({"x": __import__("torch").zeros(1)}, str(tmp))
        with atomic_dir(tmp_path / "fused") as tmp:
            save_file({"x": __import__("torch").zeros(1)}, str(tmp / "model.safetensors"))
    finally:
        os.umask(old)
    assert (tmp_path / "a.safetensors").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "fused" / "model.safetensors").stat().st_mode & 0o777 == 0o644


CRASH = "import sys, liandan.data.cli as c; c.main = lambda args: {}['boom']; from liandan.cli import main; main(sys.argv[1:])"


def test_a_bug_through_the_real_entry_point_with_liandan_debug(tmp_path):
    env = dict(os.environ, LIANDAN_CACHE=str(tmp_path / "cache"), LIANDAN_DEBUG="1")
    result = subprocess.run([sys.executable, "-c", CRASH, "data", "check", "x"], capture_output=True, text=True, env=env)
    assert result.returncode == 3  # never 1, which `data check` uses for warnings
    assert result.stderr.startswith("liandan: internal error: KeyError: 'boom' (please report; details in ")
    assert "Traceback" in result.stderr  # LIANDAN_DEBUG=1 prints it


def test_outputs_never_are_contain_or_lie_inside_inputs(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.gguf").write_bytes(b"x")
    reads = {"--model": model}
    for target, directory in ((model, True), (model / "sub", True), (tmp_path, True), (model / "model.gguf", False)):
        with pytest.raises(LiandanError, match="which this command reads"):
            check_output(target, "--out", reads, overwrite=True, directory=directory)
    check_output(model / "new.gguf", "--outfile", reads, overwrite=False)  # a new file beside the model is fine


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    """A trained LoRA adapter (2 steps on the tiny model), with the user's own notes kept beside it."""
    from liandan.lora import run

    root = tmp_path_factory.mktemp("hostile")
    write_jsonl(root / "data" / "train.jsonl", [{"prompt": "Capital of France?", "completion": "Paris"}] * 2)
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(root / "data"), iters=2, batch_size=2,
                               adapter_path=str(root / "adapters"), save_every=1, replay_ratio=0)), log=lambda *_: None)
    (root / "adapters" / "notes.txt").write_text("mine")
    return root / "adapters"


@pytest.mark.parametrize("save", ["same", "base model"])
def test_fuse_never_writes_over_what_it_reads(save, adapter, tiny_llama, tmp_path):
    base = shutil.copytree(tiny_llama, tmp_path / "base")  # a copy: the shared fixture is never at risk
    target = {"same": adapter, "inside": adapter / "fused", "parent": adapter.parent, "base model": base}[save]
    before, base_before = snapshot(adapter.parent), snapshot(base)
    result = liandan("fuse", "--model", base, "--adapter-path", adapter, "--save-path", target, "--overwrite")
    assert_refused(result, "which this command reads")
    assert snapshot(adapter.parent) == before and snapshot(base) == base_before


def test_fuse_overwrite_keeps_the_users_files(adapter, tiny_llama, tmp_path):
    target = tmp_path / "fused"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    (target / "config.json").write_text("{}")
    result = liandan("fuse", "--adapter-path", adapter, "--save-path", target, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (target / "notes.txt").read_text() == "mine" and (target / "model.safetensors").is_file()
    assert (target / "config.json").read_text() != "{}"  # the file fuse writes is replaced
    assert [p.name for p in tmp_path.iterdir()] == ["fused"]  # no temporary or old directory left beside it


def test_export_gguf_onto_an_existing_file(tiny_llama, tmp_path):
    existing = tmp_path / "existing.gguf"
    existing.write_bytes(b"the user's file")
    assert_refused(liandan("export", "gguf", "--model", tiny_llama, "--outfile", existing), "already exists; pass --overwrite")
    assert existing.read_bytes() == b"the user's file"
    assert liandan("export", "gguf", "--model", tiny_llama, "--outfile", existing, "--overwrite").returncode == 0
    assert existing.read_bytes()[:4] == b"GGUF"


def test_data_prepare_onto_existing_data(tmp_path):
    source = write_jsonl(tmp_path / "raw.jsonl", [{"question": f"q{i}", "answer": f"a{i}"} for i in range(10)])
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", [GOOD])
    (data / "notes.txt").write_text("mine")
    before = snapshot(data)
    assert_refused(liandan("data", "prepare", source, "--out", data), "data/train.jsonl already exists; pass --overwrite")
    assert snapshot(data) == before
    # Reading train.jsonl and writing it: refused even with --overwrite.
    with pytest.raises(LiandanError, match="is the input"):
        prepare([data / "train.jsonl"], data, "completions", 0.1, 0.1, 0, log=lambda *_: None, overwrite=True)
    assert snapshot(data) == before
    result = liandan("data", "prepare", source, "--out", data, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert (data / "notes.txt").read_text() == "mine" and snapshot(data)["train.jsonl"] != before["train.jsonl"]


def test_progress_is_reported_while_a_file_is_read(tmp_path, monkeypatch, capsys):
    from liandan.data.check import Progress, check_file
    from liandan.data.formats import FieldNames

    monkeypatch.setattr(Progress, "EVERY", 0.0)  # every line, instead of every 5 s
    check_file(write_jsonl(tmp_path / "train.jsonl", [GOOD] * 3), None, 2048, FieldNames())
    assert "liandan data check: train.jsonl: line 3, 100% read" in capsys.readouterr().err


def test_bad_csv_for_prepare_is_an_input_error(tmp_path):
    from liandan.data.prepare import read_rows

    (tmp_path / "bad.csv").write_bytes(b'question,answer\nq1,a1\nq2,"\xff"\n')
    (tmp_path / "big.csv").write_text('question,answer\nq,"' + "x" * 200_000 + '"\n')
    with pytest.raises(LiandanError, match="bad.csv: not valid UTF-8"):
        list(read_rows(tmp_path / "bad.csv"))
    with pytest.raises(LiandanError, match="big.csv:2: invalid CSV: field larger than field limit"):
        list(read_rows(tmp_path / "big.csv"))
