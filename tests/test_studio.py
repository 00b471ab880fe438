"""`liandan studio`: its steps without a browser (fast), then the page in a real headless Chromium."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import JOKES, liandan, write_jsonl

import browser
from liandan.errors import LiandanError

ROWS = [{"prompt": f"Question number {i}: " + "word " * (i % 5), "completion": f"Answer {i} " + "yes " * (i % 3)}
        for i in range(10)]


def truncated_json(path: Path) -> Path:
    rows = [json.loads(line) for line in (JOKES / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    text = json.dumps(rows, ensure_ascii=False, indent=2)
    path.write_text(text[: len(text) * 2 // 3], encoding="utf-8")  # cut mid-file, as an interrupted copy would
    return path


# ---------------------------------------------------------------- without a browser
def test_studio_without_gradio_names_the_install_command(monkeypatch):
    from liandan.studio.cli import import_gradio

    monkeypatch.setitem(sys.modules, "gradio", None)
    with pytest.raises(LiandanError, match=r"pip install 'liandan\[studio\]'"):
        import_gradio()


def test_lora_flags_are_the_cli_flags():
    from liandan.config import lora_flags

    assert lora_flags({"iters": 200, "learning_rate": 1e-4, "model": None, "grad_checkpoint": False, "overwrite": True,
                       "mask_prompt": False, "system_prompt": ""}) == [
        "--iters", "200", "--learning-rate", "0.0001", "--overwrite", "--no-mask-prompt"]
    # every option the page offers is a real `liandan lora` flag
    import argparse

    from liandan.lora import build_parser
    from liandan.studio.runs import PAGE_OPTIONS

    parser = build_parser(argparse.ArgumentParser())
    known = {s for action in parser._actions for s in action.option_strings}
    for name in PAGE_OPTIONS:
        assert f"--{name.replace('_', '-')}" in known or name == "mask_prompt", name


def test_bad_table_upload_reports_file_and_line_and_writes_nothing(tmp_path):
    from liandan.studio import data

    bad = truncated_json(tmp_path / "jokes.json")
    staging = data.stage([str(bad)])
    assert not data.is_split_dir(staging)
    errors = data.validate_tables(staging)
    assert len(errors) == 1 and errors[0].startswith("jokes.json:") and "invalid JSON" in errors[0], errors
    shutil.rmtree(staging)


def test_prepare_on_the_page_uses_the_boxes_of_the_chosen_format(tmp_path):
    """The page shows every field box: a prompt typed before switching to "text" is not an error there."""
    from liandan.studio import data

    write_jsonl(tmp_path / "raw.jsonl", [{"body": f"Document {i}.", "q": f"q{i}"} for i in range(5)])
    said = data.prepare_tables([tmp_path / "raw.jsonl"], tmp_path / "out", "text", 0, 0, 0, prompt="q", completion="  ",
                               text="body")
    assert "train.jsonl 5" in said


def test_an_upload_never_replaces_a_data_folder(tmp_path):
    from liandan.studio import data

    write_jsonl(tmp_path / "up" / "train.jsonl", ROWS)
    out = tmp_path / "workspace" / "data" / "uploaded"
    data.save_split_dir(data.stage([str(tmp_path / "up" / "train.jsonl")]), out)
    (out / "my_notes.txt").write_text("mine")
    before = (out / "train.jsonl").read_bytes()
    write_jsonl(tmp_path / "up" / "train.jsonl", ROWS[:1])
    with pytest.raises(LiandanError, match="already holds data; choose another data name"):
        data.save_split_dir(data.stage([str(tmp_path / "up" / "train.jsonl")]), out)
    assert (out / "train.jsonl").read_bytes() == before and (out / "my_notes.txt").read_text() == "mine"


def test_rendered_examples_highlight_only_the_trained_answer(tiny_llama, tmp_path):
    from liandan.studio import data

    write_jsonl(tmp_path / "train.jsonl", [{"prompt": "谁是最帅的地球人", "completion": "德哥"}])
    shown = data.rendered_examples(tmp_path / "train.jsonl", str(tiny_llama))
    trained = shown.split('<mark class="trained">')[1].split("</mark>")[0]
    assert trained.startswith("德哥") and "谁是" not in trained  # the answer and its stop token, not the question
    assert "谁是最帅的地球人" in shown and "train.jsonl:1" in shown
    chats = [{"messages": [{"role": "assistant", "content": "I speak first"}, {"role": "user", "content": "hm"}]},
             {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}]
    write_jsonl(tmp_path / "chats.jsonl", chats)
    shown = data.rendered_examples(tmp_path / "chats.jsonl", str(tiny_llama))  # one that cannot render: said in its place
    assert "chats.jsonl:1</div><pre>✗ " in shown and "chats.jsonl:2" in shown and '<mark class="trained">Hello' in shown


def test_rendered_examples_of_tools_data_use_the_tool_use_template_as_training_does(tiny_llama, tmp_path):
    """A tokenizer that ships a "default" and a "tool_use" template: the page shows tools data as `lora` trains it."""
    from liandan.studio import data

    model = tmp_path / "two-templates"
    shutil.copytree(tiny_llama, model)
    (model / "additional_chat_templates").mkdir()
    own = (model / "chat_template.jinja").read_text()
    (model / "additional_chat_templates" / "tool_use.jinja").write_text("{{ 'TOOL-TEMPLATE ' }}" + own)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    chat = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    write_jsonl(tmp_path / "chats" / "train.jsonl", [chat])
    write_jsonl(tmp_path / "tools" / "train.jsonl", [chat, {**chat, "tools": tools}])
    assert "TOOL-TEMPLATE" not in data.rendered_examples(tmp_path / "chats" / "train.jsonl", str(model))
    assert "TOOL-TEMPLATE" in data.rendered_examples(tmp_path / "tools" / "train.jsonl", str(model))
    view = data.check_data(tmp_path / "tools", str(model))
    assert view.errors == 0, view.text


def wait_for(condition, timeout, what):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def test_a_run_survives_its_page_stops_with_a_checkpoint_and_resumes(tiny_llama, tmp_path):
    """The run is a real `liandan lora` process found again from its pid file; stop keeps a checkpoint."""
    from liandan.studio import runs

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    adapters = tmp_path / "runs" / "tiny"
    options = {"model": str(tiny_llama), "data": str(tmp_path / "data"), "iters": 4000, "batch_size": 2,
               "steps_per_report": 2, "save_every": 100000, "replay_ratio": 0, "learning_rate": 1e-3}
    runs.start(adapters, options)
    try:
        check_stop_and_resume(adapters)
        log, record = (adapters / runs.LOG_FILE).read_bytes(), runs.read_run(adapters)
        with pytest.raises(LiandanError, match="already holds an adapter"):  # Start again, not Resume
            runs.start(adapters, dict(options, iters=50))
        assert (adapters / runs.LOG_FILE).read_bytes() == log and runs.read_run(adapters) == record  # untouched
    finally:
        if runs.is_running(adapters):
            os.kill(runs.read_run(adapters)["pid"], signal.SIGKILL)


def check_stop_and_resume(adapters):
    from liandan.studio import runs
    from liandan.train import latest_checkpoint

    runs._children.clear()  # as if the page (and the studio) had been closed and opened again
    assert runs.is_running(adapters) and runs.list_runs(adapters.parent) == [adapters]
    wait_for(lambda: runs.status(adapters).iteration >= 6, 600, "6 iterations")
    assert runs.stop(adapters)
    wait_for(lambda: not runs.is_running(adapters), 300, "the run to stop")
    state = runs.status(adapters)
    assert state.state == "stopped", state.log
    stopped_at = int(latest_checkpoint(adapters).name)
    assert stopped_at >= 6 and f"Stopped at iteration {stopped_at}" in state.log

    runs.resume(adapters)
    wait_for(lambda: runs.status(adapters).iteration > stopped_at + 3, 600, "the resumed run to report")
    runs.stop(adapters)
    wait_for(lambda: not runs.is_running(adapters), 300, "the resumed run to stop")
    state = runs.status(adapters)
    assert f"resuming after iteration {stopped_at}" in state.log
    iterations = [it for it, _ in state.train_loss]
    assert iterations == sorted(iterations) and len(set(iterations)) == len(iterations)  # continued, not restarted


def test_a_run_counts_as_alive_only_while_a_liandan_process_has_its_pid(tmp_path):
    """On Linux the command line comes from /proc; on macOS, which has none, from `ps` (tried here with a /proc
    that does not exist). A pid now held by another program is not a run."""
    from liandan.studio.runs import _command_line

    run = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "liandan"])
    other = subprocess.Popen(["sleep", "30"])
    try:
        for proc in (Path("/proc"), tmp_path / "no-proc"):
            assert b"liandan" in _command_line(run.pid, proc)
            assert b"liandan" not in _command_line(other.pid, proc)
    finally:
        for process in (run, other):
            process.kill()
            process.wait()
    assert _command_line(run.pid, tmp_path / "no-proc") == b"" == _command_line(run.pid)


def test_a_finished_run_reads_as_finished_and_its_test_scores_come_from_lora(tiny_llama, tmp_path):
    """"finished" comes from the adapter the run saved, not from its log's last 20 kB; the Test tab's scores
    from lora's own test report, not from matching its printed lines."""
    from liandan.studio import evaluate, runs

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    write_jsonl(tmp_path / "data" / "test.jsonl", ROWS[:2])
    adapters = tmp_path / "runs" / "tiny"
    runs.start(adapters, {"model": str(tiny_llama), "data": str(tmp_path / "data"), "iters": 4, "batch_size": 2,
                          "save_every": 2, "replay_ratio": 0})
    wait_for(lambda: not runs.is_running(adapters), 600, "the run to end")
    assert runs.status(adapters).state == "finished", runs.status(adapters).log
    with open(adapters / runs.LOG_FILE, "a") as log:
        log.write("a long test report\n" * 5000)  # pushes "Saved final weights" out of the tail the page reads
    assert runs.status(adapters).state == "finished"
    record = runs.read_run(adapters)
    (adapters / runs.RUN_FILE).write_text(json.dumps({**record, "started": time.time() + 60}))
    assert runs.status(adapters).state == "stopped"  # an adapter older than the run is another run's

    report = evaluate.test_adapter(adapters, tmp_path / "data")
    scores = report.scores
    assert report.exact == f"{scores['exact']}/2" and scores["total"] == 2
    assert report.loss_and_perplexity == (f"{scores['test_loss']:.3f}", f"{scores['test_ppl']:.3f}")
    assert any(line.startswith(f"Test loss {scores['test_loss']:.3f}") for line in report.lines)


def test_api_key_guards_the_page(tmp_path):
    import httpx

    if browser.missing_gradio():
        pytest.skip("needs gradio: pip install -e '.[studio]'")
    server = browser.Studio(tmp_path / "workspace", tmp_path / "studio.log", "--api-key", "s3cret钥匙")
    try:
        with httpx.Client(base_url=server.url) as client:
            assert client.get("config").status_code == 401
            assert client.post("login", data={"username": "me", "password": "wrong"}).status_code == 400
            assert client.post("login", data={"username": "me", "password": "密码"}).status_code == 400  # not a 500
            assert client.post("login", data={"username": "me", "password": "s3cret钥匙"}).status_code == 200
            assert client.get("config").status_code == 200  # with the session cookie
        second = liandan("studio", "--workspace", tmp_path / "w2", "--port", server.port, timeout=120)
        assert second.returncode == 2 and f"cannot listen on 127.0.0.1:{server.port}" in second.stderr, second.stderr
    finally:
        server.close()


# ---------------------------------------------------------------- in a real browser
@pytest.fixture
def studio(tmp_path):
    lacking = browser.missing()
    if lacking:
        pytest.skip(f"browser tests need {', '.join(lacking)}: scripts/setup.sh --test")
    server = browser.Studio(tmp_path / "workspace", tmp_path / "studio.log")
    page = browser.Page(tmp_path / "downloads", tmp_path / "screenshots")
    yield server, page
    page.close()
    server.close()


def test_bad_upload_shows_file_and_line_the_server_keeps_serving_nothing_is_written(studio, tmp_path):
    server, page = studio
    page.open(server.url)
    page.upload("upload", [truncated_json(tmp_path / "jokes.json")])
    page.wait_text("data-status", "nothing was saved")
    report = page.text("check-report")
    assert report.startswith("jokes.json:") and "invalid JSON" in report, report
    page.shot("bad-upload")
    # A JSONL with one cut line: the `data check` report names that line.
    bad = tmp_path / "split"
    bad.mkdir()
    lines = (JOKES / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (bad / "train.jsonl").write_text("\n".join(lines[:2] + [lines[2][:20]] + lines[3:]) + "\n", encoding="utf-8")
    page.open(server.url)
    page.upload("upload", [bad / "train.jsonl"])
    page.wait_text("check-report", "train.jsonl:3: invalid JSON")
    assert "nothing was saved" in page.text("data-status")
    assert server.serving() and server.process.poll() is None
    assert not (tmp_path / "workspace" / "data").exists() or not any((tmp_path / "workspace" / "data").iterdir())
    assert page.outside_requests(server.url) == []


def chart_svg(page) -> str:
    return page.find("#loss-chart svg").get_attribute("outerHTML")


def iteration_shown(page) -> int:
    found = re.search(r"iteration (\d+)/", page.text("progress"))
    return int(found.group(1)) if found else 0


@pytest.mark.slow  # about 8 minutes on a quiet 2-core machine
def test_the_demo_through_the_page(studio, tmp_path):
    """Upload the six jokes, check, train 200 iterations (stopped and resumed on the way), test, chat, export."""
    server, page = studio
    page.open(server.url)
    upload_and_check(page)
    train_stop_resume(page, server, tmp_path / "workspace" / "runs" / "jokes")
    read_test_score(page)
    ask(page)
    export_and_download(page, tmp_path)
    assert page.outside_requests(server.url) == []  # offline: every resource came from the studio


def upload_and_check(page):
    page.upload("upload", [JOKES / f"{split}.jsonl" for split in ("train", "valid", "test")])
    page.wait_text("data-status", "no errors")
    report = page.text("check-report")
    assert "train.jsonl: completions, 6 example(s)" in report and "leakage" in report and "tokens per example" in report
    # the first training example as trained: only the answer and the stop token are highlighted
    assert '<mark class="trained">阿里云开源宇宙无敌数据库&lt;|im_end|&gt;</mark>' in page.find("#examples").get_attribute("innerHTML")
    page.shot("data", docs=True)


def train_stop_resume(page, server, run_dir):
    page.tab("Train")
    for elem_id, value in (("run-name", "jokes"), ("iters", 200), ("batch-size", 2), ("learning-rate", "0.0001")):
        page.fill(elem_id, value)
    page.open_accordion("Advanced")
    for elem_id, value in (("steps-per-report", 10), ("steps-per-eval", 50), ("val-batches", -1), ("save-every", 200)):
        page.fill(elem_id, value)
    page.click("start")
    page.wait(lambda: iteration_shown(page) >= 20, 900, "20 iterations")
    first_chart = chart_svg(page)
    # Closing the page does not stop the run; a new page finds it again.
    page.open(server.url)
    page.tab("Train")
    page.wait(lambda: page.text("run-name") == "jokes" and page.text("iters") == "200", 60, "the run's options")
    page.wait(lambda: iteration_shown(page) >= 40 and "running" in page.text("progress"), 900, "40 iterations")
    assert chart_svg(page) != first_chart  # the chart follows metrics.jsonl
    page.click("stop")
    page.wait_text("progress", "stopped", 300)
    stopped_at = int(page.wait_text("console", "Stopped at iteration").split("Stopped at iteration ")[1].split(";")[0])
    assert (run_dir / "checkpoints" / f"{stopped_at:07d}" / "trainer_state.pt").is_file()
    page.click("resume")
    page.wait_text("console", f"resuming after iteration {stopped_at}", 600)
    page.wait_text("progress", "finished", 1800)
    assert "tokens/s" in page.text("progress") and "validation loss" in page.text("progress")
    assert "with 2 values: train, validation" in chart_svg(page)  # both curves, in the chart's legend
    page.shot("train", docs=True)


def read_test_score(page):
    page.tab("Test")
    page.click("run-test")
    summary = page.wait_text("test-summary", "What the loss means", 900)
    asked = len((JOKES / "test.jsonl").read_text(encoding="utf-8").splitlines())  # the uploaded test split
    assert re.search(rf"exact answers\s+{asked}/{asked}", summary), summary
    assert "perplexity" in summary and "general knowledge kept" in summary
    page.shot("test", docs=True)


def ask(page):
    page.tab("Chat")
    page.fill("chat-input", "谁是最帅的地球人")
    page.click("chat-send")
    page.wait_text("chat-info", "base:", 600)
    replies = page.find("#chat-adapter").find_elements("css selector", "[data-testid='bot']")
    assert replies and replies[-1].text.strip() == "德哥", [r.text for r in replies]
    info = " ".join(page.text("chat-info").split())  # the stop token is a code span: the browser breaks the line there
    assert "fine-tuned: rendered with the training chat template; stopped at <|im_end|>" in info, info
    page.shot("chat", docs=True)


def export_and_download(page, tmp_path):
    workspace, downloads = tmp_path / "workspace", tmp_path / "downloads"
    page.tab("Ship")
    page.click("export-ollama")
    command = page.wait_text("ollama-command", "ollama create jokes -f", 900)
    modelfile = (workspace / "ship" / "jokes" / "jokes-ollama" / "Modelfile").read_text(encoding="utf-8")
    assert "FROM ./jokes.gguf" in modelfile and "PARAMETER stop" in modelfile and str(workspace) in command
    assert "FROM ./jokes.gguf" in page.text("modelfile")
    for link in page.find("#ship-files").find_elements("css selector", "a[download]"):
        link.click()
    done = {"Modelfile", "jokes.gguf"}
    page.wait(lambda: {p.name for p in downloads.glob("*") if not p.name.endswith(".crdownload")} >= done, 180,
              "the downloads")
    assert (downloads / "Modelfile").read_text(encoding="utf-8") == modelfile
    assert (downloads / "jokes.gguf").read_bytes()[:4] == b"GGUF"
    page.shot("ship", docs=True)


def test_chat_tab_reloads_an_adapter_whose_weights_changed(tiny_llama, tmp_path):
    """A chat opened while the run trains answers from the latest saved weights, not the first ones it loaded."""
    from safetensors.torch import load_file, save_file

    from liandan.config import load_config
    from liandan.lora import run
    from liandan.studio import chat

    write_jsonl(tmp_path / "data" / "train.jsonl", ROWS)
    adapter = tmp_path / "run"
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(tmp_path / "data"), iters=2, batch_size=2,
                               replay_ratio=0, adapter_path=str(adapter))), log=lambda *_: None)
    first = chat.pipeline(adapter)
    assert chat.pipeline(adapter) is first  # unchanged: cached
    weights = adapter / "adapter_model.safetensors"
    save_file({k: v + 0.5 for k, v in load_file(str(weights)).items()}, str(weights))  # a later checkpoint
    second = chat.pipeline(adapter)
    assert second is not first and sum(1 for k in chat._pipelines if k[0] == str(adapter)) == 1
    chat.forget(adapter)
