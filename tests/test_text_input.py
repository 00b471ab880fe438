"""Text that is not UTF-8 (lone surrogates: argv's or stdin's undecodable bytes, JSON "\\ud800" escapes) and
careless serve options are one line (exit 2) or a 4xx JSON error: never a traceback, an internal error, a 500."""

import json
import os
import subprocess
import sys

import httpx
import pytest
from test_serve import Server

from liandan.errors import LiandanError

KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


def run(*args, stdin: bytes = b""):
    """The real CLI; bytes arguments reach its argv undecoded (as a shell passes $'caf\\xe9')."""
    return subprocess.run([sys.executable, "-m", "liandan", *args], input=stdin, capture_output=True, timeout=300,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))


def one_line_error(result, expected: str) -> None:
    stderr = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, stderr
    assert expected in stderr and stderr.strip().count("\n") == 0, stderr


def test_check_text_is_the_one_check():
    from liandan.generate import check_text, read_prompt

    assert check_text("café 🙂", "--system-prompt") == "café 🙂"
    with pytest.raises(LiandanError, match=r"^--system-prompt is not UTF-8 text \(at position 3\)"):
        check_text("caf\udce9", "--system-prompt")  # b"caf\xe9" decoded with surrogateescape
    with pytest.raises(LiandanError, match=r"^-p: the prompt is not UTF-8 text \(at position 0\)"):
        read_prompt("\ud800")


@pytest.mark.parametrize("command", ["generate", "chat"])
def test_an_undecodable_system_prompt_is_one_line(command, tiny_llama):
    result = run(command, "--model", str(tiny_llama), "--system-prompt", b"caf\xe9", "-m", "2", stdin=b"hi\n")
    one_line_error(result, "--system-prompt is not UTF-8 text (at position 3)")


def test_serve_refuses_an_undecodable_system_prompt_before_loading(tmp_path):
    one_line_error(run("serve", "--model", str(tmp_path / "no-model"), "--system-prompt", b"caf\xe9"),
                   "--system-prompt is not UTF-8 text")


@pytest.mark.parametrize("locale", [{}, {"LC_ALL": "C.UTF-8", "PYTHONUTF8": "0"}])
def test_chat_notes_an_undecodable_line_and_goes_on(tiny_llama, locale, monkeypatch):
    for name, value in locale.items():
        monkeypatch.setenv(name, value)
    result = run("chat", "--model", str(tiny_llama), "-m", "3", stdin=b"hi\n\xff\xfe bad\n/reset\nok\n")
    stdout, stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, stderr
    assert "(this message is not UTF-8 text (at position 0)" in stdout, stdout
    assert "(conversation reset)" in stdout  # the session went on past the bad line


@pytest.mark.parametrize("port", ["70000", "-1", "0"])
def test_serve_refuses_a_port_out_of_range_before_loading(port, tmp_path):
    # A missing model: the port must be refused before the model loads (which would be the error otherwise).
    one_line_error(run("serve", "--model", str(tmp_path / "no-model"), "--port", port),
                   f"--port must be between 1 and 65535, got {port}")


def test_serve_refuses_an_empty_api_key(tmp_path):
    one_line_error(run("serve", "--model", str(tmp_path / "no-model"), "--api-key", ""), "--api-key is empty")


@pytest.fixture(scope="module")
def server(tiny_llama):
    s = Server("--model", tiny_llama, "--model-name", "tiny", "--api-key", KEY)
    yield s
    s.stop()


def post(server, body, path="/v1/chat/completions", headers=AUTH):
    """json.dumps escapes a lone surrogate as \\ud800, as a client's JSON would carry it."""
    return httpx.post(server.url + path, content=json.dumps(body).encode(), timeout=120,
                      headers={**headers, "content-type": "application/json"})


def assert_400(response, *fragments):
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert all(f in message for f in fragments), message


def user(content):
    return {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": content}]}


def test_serve_answers_a_lone_surrogate_with_400(server):
    assert_400(post(server, user("\ud800")), "messages.0.content is not UTF-8 text (at position 0)")
    assert_400(post(server, {**user("hi"), "stream": True, "messages": [{"role": "user", "content": "ok \udce9"}]}),
               "messages.0.content is not UTF-8 text (at position 3)")
    assert_400(post(server, user([{"type": "text", "text": "\udfff"}])), "messages.0.content.0.text is not UTF-8")
    for extra in ({}, {"stream": True}):
        completion = {"model": "tiny", "prompt": "a\ud800", **extra}
        assert_400(post(server, completion, "/v1/completions"), "prompt is not UTF-8")
    assert_400(post(server, {"model": "tiny\ud800", "prompt": "a"}, "/v1/completions"), "model is not UTF-8")
    assert_400(post(server, {"model": "tiny", "prompt": "a", "\ud800": 1}, "/v1/completions"), "a key in the body")
    untyped = httpx.post(server.url + "/v1/completions", headers=AUTH,
                         content=b'{"model": "tiny", "prompt": "\\ud800"}')
    assert untyped.status_code == 400, untyped.text  # no content type: the body stays bytes, refused as not an object
    ok = post(server, user("a pair is fine: \U0001f642"))  # json.dumps writes it as the pair \ud83d\ude42
    assert ok.status_code == 200, ok.text


def test_serve_wants_content_in_a_user_message(server):
    assert_400(post(server, user(None)), "messages.0: a user message needs content")
    assert_400(post(server, {"model": "tiny", "messages": [{"role": "user"}]}), "a user message needs content")
    call = [{"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]
    tools = [{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": None, "tool_calls": call},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}, {"role": "user", "content": "So?"}]
    reply = post(server, {"model": "tiny", "max_tokens": 3, "messages": tools})
    assert reply.status_code == 200, reply.text


def test_serve_takes_the_bearer_scheme_in_any_case(server):
    for scheme in ("bearer", "BEARER", "Bearer"):
        assert post(server, user("hi"), headers={"Authorization": f"{scheme} {KEY}"}).status_code == 200
    for wrong in (f"Basic {KEY}", f"bearer {KEY}x", KEY):
        assert post(server, user("hi"), headers={"Authorization": wrong}).status_code == 401
