"""Hostile and careless clients against a real `liandan serve` process: every answer is JSON, nothing
crashes the server, and it answers correctly afterwards (issue 15's server probes, issue 18's limits)."""

import os
import threading
import time

import httpx
import pytest
from test_serve import Server

openai = pytest.importorskip("openai")
KEY = "s3cret"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def server(tiny_llama):
    s = Server("--model", tiny_llama, "--model-name", "tiny", "--api-key", KEY, "--max-queue", "0",
               "--max-tokens-limit", "400", "--max-body-bytes", 3_000_000)
    yield s
    s.stop()


def post(server, body, path="/v1/completions", headers=AUTH, **kwargs):
    return httpx.post(server.url + path, json=body, headers=headers, timeout=120, **kwargs)


def greedy(server, prompt="Hello", max_tokens=8, headers=AUTH, **extra):
    reply = post(server, {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, **extra}, headers=headers)
    assert reply.status_code == 200, reply.text
    return reply.json()["choices"][0]["text"]


def assert_error(response, status, code=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and (code is None or error["code"] == code)
    return error


def test_auth_comes_first_and_covers_the_docs(server):
    for path in ("/v1/models", "/docs", "/openapi.json", "/redoc", "/health"):
        assert_error(httpx.get(server.url + path), 401, "invalid_api_key")
        assert_error(httpx.get(server.url + path, headers={"Authorization": f"Bearer {KEY}x"}), 401)
    # An invalid body without the key: 401, not 400 (the body is never read).
    bad = httpx.post(server.url + "/v1/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert_error(bad, 401)
    assert httpx.get(server.url + "/openapi.json", headers=AUTH).status_code == 200
    assert "/v1/completions" in httpx.get(server.url + "/openapi.json", headers=AUTH).json()["paths"]


def test_body_and_max_tokens_caps(server):
    expected = greedy(server)
    assert_error(post(server, {"model": "tiny", "prompt": "x" * 3_100_000}), 413, "request_too_large")

    def chunks():
        yield b'{"model": "tiny", "prompt": "Hello"}'

    assert_error(httpx.post(server.url + "/v1/completions", content=chunks(), headers=AUTH), 411)
    error = assert_error(post(server, {"model": "tiny", "prompt": "Hello", "max_tokens": 401}), 400)
    assert "max_tokens" in error["message"]
    assert greedy(server) == expected


def test_sampling_values_that_used_to_crash(server):
    expected = greedy(server)
    for extra in ({"top_p": 1e-300, "temperature": 2}, {"seed": 2**70, "temperature": 1.0}, {"seed": -5, "temperature": 1},
                  {"temperature": 1e-300}):
        assert isinstance(greedy(server, **extra), str)
    assert greedy(server, temperature=1e-300) == expected  # the limit of sampling as temp → 0 is greedy
    assert greedy(server, stop="") == expected and greedy(server, stop=["", "\x00"]) == expected
    for bad in ({"top_p": 0}, {"min_p": 1}, {"stop": ["a"] * 17}, {"temperature": 2.5}):
        assert_error(post(server, {"model": "tiny", "prompt": "Hello", **bad}), 400)
    for value in (b"NaN", b"Infinity", b"-Infinity"):  # Python's json module reads these; they are not numbers here
        body = b'{"model": "tiny", "prompt": "Hello", "top_p": %s}' % value
        assert_error(httpx.post(server.url + "/v1/completions", content=body, headers=AUTH), 400)
    assert greedy(server) == expected


FAULT = """
from liandan.engines.torch_engine import TorchEngine
healthy = TorchEngine.stream
def stream(self, prompt_ids, *args):
    if self.pipe.tokenizer.decode(prompt_ids).endswith("boom"):
        raise RuntimeError("an injected fault")
    return healthy(self, prompt_ids, *args)
TorchEngine.stream = stream
"""


def test_an_unexpected_error_is_a_json_500_with_an_id_and_the_server_keeps_serving(tiny_llama):
    server = Server("--model", tiny_llama, "--model-name", "tiny", prelude=FAULT)
    try:
        expected = greedy(server, headers={})
        error = assert_error(post(server, {"model": "tiny", "prompt": "boom"}, headers={}), 500, "internal_error")
        assert error["type"] == "server_error" and "RuntimeError" in error["message"]
        error_id = "err-" + error["message"].split("err-")[1].split(":")[0]
        assert error_id in server.log() and "an injected fault" in server.log()
        with httpx.stream("POST", server.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "boom", "stream": True}) as r:
            events = [line for line in r.iter_lines() if line.startswith("data: ")]
        assert '"code": "internal_error"' in events[-2] and events[-1] == "data: [DONE]"
        assert greedy(server, headers={}) == expected
    finally:
        server.stop()


def test_full_queue_answers_429_with_retry_after(server):
    expected = greedy(server, "Once upon a time", 300)
    results = [None] * 8

    def ask(i):
        results[i] = post(server, {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 300})

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(results))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    busy = [r for r in results if r.status_code == 429]
    accepted = [r for r in results if r.status_code == 200]
    assert busy and accepted and len(busy) + len(accepted) == len(results)
    for r in busy:
        assert_error(r, 429, "rate_limit_exceeded")
        assert int(r.headers["retry-after"]) >= 1
    assert all(r.json()["choices"][0]["text"] == expected for r in accepted)


def test_a_dropped_stream_frees_its_slot_within_a_second(server):
    full = post(server, {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400})
    started = time.perf_counter()
    post(server, {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400})
    whole_seconds = time.perf_counter() - started
    assert full.json()["usage"]["completion_tokens"] == 400  # a long generation, not one that stops by itself
    with httpx.stream("POST", server.url + "/v1/completions", headers=AUTH, timeout=60,
                      json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    dropped = time.perf_counter()
    while httpx.get(server.url + "/health", headers=AUTH).json()["active"]:
        assert time.perf_counter() - dropped < 1.0, "the dropped stream still holds its slot after 1 s"
        time.sleep(0.02)
    freed = time.perf_counter() - dropped
    assert freed < whole_seconds / 2, f"freed after {freed:.2f} s, a whole generation takes {whole_seconds:.2f} s"


def test_memory_returns_near_its_start_after_large_prompts(server):
    greedy(server)
    before = server.rss_mb()
    for _ in range(5):  # ~2.9 MB prompts: tokenized, then refused for the context
        assert_error(post(server, {"model": "tiny", "prompt": "word " * 580_000}), 400, "context_length_exceeded")
    deadline = time.time() + 5  # freed memory goes back to the OS just after each response is sent
    while (after := server.rss_mb()) > before + 100 and time.time() < deadline:
        time.sleep(0.2)
    assert after < before + 100, f"RSS {before:.0f} MB before, {after:.0f} MB 5 s after"
    assert greedy(server) == greedy(server)


def test_a_dropped_non_streamed_request_frees_its_slot(server):
    started = time.perf_counter()
    post(server, {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400})
    whole_seconds = time.perf_counter() - started
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting for the whole answer
        httpx.post(server.url + "/v1/completions", json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400},
                   headers=AUTH, timeout=whole_seconds / 4)
    dropped = time.perf_counter()
    while httpx.get(server.url + "/health", headers=AUTH).json()["active"]:
        assert time.perf_counter() - dropped < whole_seconds / 2, "the abandoned request still runs"
        time.sleep(0.02)
    assert greedy(server) == greedy(server)  # and the server answers as before


def test_empty_prompt_long_stop_strings_and_unknown_paths(server):
    assert_error(post(server, {"model": "tiny", "prompt": "", "max_tokens": 4}), 400)
    long_stop = "</answer>\n\nQuestion:"  # one stop string longer than 16 characters is fine; 17 strings are not
    assert greedy(server, stop=long_stop) == greedy(server)
    assert_error(post(server, {"model": "tiny", "prompt": "Hi", "stop": ["x"] * 17}), 400)
    assert_error(httpx.get(server.url + "/v1/chat/completions", headers=AUTH), 405)
    assert_error(post(server, {"input": "hi"}, path="/v1/embeddings"), 404)


def test_ctrl_c_ends_running_streams_and_the_server_exits_cleanly(tiny_llama):
    """One Ctrl-C stops the server promptly even while a long stream runs: the stream ends with a 503-style
    error event and [DONE], the process exits 0 with no traceback (uvicorn alone waits for the stream to end,
    and a second Ctrl-C then forced it out with tracebacks)."""
    import signal

    # Each token a little slower, so the stream is surely still running when the signal comes.
    slow = ("import time, liandan.generate as g; _next = g.sample_next\n"
            "g.sample_next = lambda *a, **k: (time.sleep(0.02), _next(*a, **k))[1]")
    s = Server("--model", tiny_llama, "--model-name", "tiny", prelude=slow)
    try:
        with httpx.stream("POST", s.url + "/v1/completions", timeout=60,
                          json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "stream": True}) as r:
            lines = []
            for line in filter(None, r.iter_lines()):
                lines.append(line)
                if len(lines) == 4:
                    s.proc.send_signal(signal.SIGINT)
        assert lines[-1] == "data: [DONE]" and '"code": "server_shutting_down"' in lines[-2], lines[-3:]
        assert s.proc.wait(timeout=30) == 0
        assert "Traceback" not in s.log(), s.log()
    finally:
        if s.proc.poll() is None:
            s.proc.kill()
        os.unlink(s.output.name)
