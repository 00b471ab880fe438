"""`liandan serve` with the official openai client against real server processes on loopback, and `liandan chat`."""

import os
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import write_jsonl

openai = pytest.importorskip("openai")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A real `liandan serve` process on a free loopback port; its output goes to a file (a pipe nobody
    reads would block the server once full)."""

    def __init__(self, *args, prelude: str | None = None):
        """`prelude`: Python run in the server process before `liandan serve` starts (to inject faults)."""
        import tempfile

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.output = tempfile.NamedTemporaryFile(prefix="liandan-serve-", suffix=".log", delete=False)
        launcher = ["-c", f"{prelude}\nfrom liandan.cli import main\nmain()"] if prelude else ["-m", "liandan"]
        self.proc = subprocess.Popen([sys.executable, *launcher, "serve", "--port", str(self.port), *map(str, args)],
                                     stdout=self.output, stderr=subprocess.STDOUT, env=dict(os.environ, PYTHONUNBUFFERED="1"))
        deadline = time.time() + 300
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(self.log())
            try:
                httpx.get(self.url + "/openapi.json", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("server did not start")

    def client(self, key="none"):
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key, max_retries=0, timeout=120)

    def log(self) -> str:
        with open(self.output.name, encoding="utf-8", errors="replace") as f:
            return f.read()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=30)
        os.unlink(self.output.name)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_llama):
    """A tiny model fine-tuned to answer 'Capital of France?' with 'Paris is the capital.'."""
    from liandan.config import load_config
    from liandan.lora import run

    root = tmp_path_factory.mktemp("serve")
    write_jsonl(root / "data" / "train.jsonl", [{"prompt": "Capital of France?", "completion": "Paris is the capital."}] * 2)
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(root / "data"), iters=40, batch_size=2,
                               learning_rate=3e-3, num_layers=-1, fine_tune_type="full", replay_ratio=0,
                               adapter_path=str(root / "paris"))), log=lambda *_: None)
    return root / "paris"


@pytest.fixture(scope="module")
def server(adapter):
    s = Server("--adapter-path", adapter)
    yield s
    s.stop()


def test_models_and_the_fine_tuned_answer(server):
    client = server.client()
    assert [m.id for m in client.models.list().data] == ["paris"]
    reply = client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "Capital of France?"}])
    assert reply.choices[0].message.content == "Paris is the capital."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens > 0 and reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streaming_equals_non_streaming(server):
    client = server.client()
    for content, max_tokens in (("Capital of France?", 20), ("Tell me a long story about rivers", 25)):
        messages = [{"role": "user", "content": content}]
        whole = client.chat.completions.create(model="paris", messages=messages, max_tokens=max_tokens)
        chunks = list(client.chat.completions.create(model="paris", messages=messages, max_tokens=max_tokens, stream=True))
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == whole.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    text = client.completions.create(model="paris", prompt="The river", max_tokens=10).choices[0].text
    streamed = "".join(c.choices[0].text for c in client.completions.create(model="paris", prompt="The river",
                                                                           max_tokens=10, stream=True))
    assert streamed == text


def test_stop_sequences_and_sampling_seed(server):
    client = server.client()
    reply = client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "Capital of France?"}],
                                           stop=[" the"])
    assert reply.choices[0].message.content == "Paris is" and reply.choices[0].finish_reason == "stop"
    kwargs = dict(model="paris", messages=[{"role": "user", "content": "Say anything"}], temperature=1.0, top_p=0.9,
                  seed=5, max_tokens=12)
    assert client.chat.completions.create(**kwargs).choices[0].message.content == \
        client.chat.completions.create(**kwargs).choices[0].message.content


PROMPTS = [f"Question {i}: what is {i} plus {i}?" for i in range(15)] + ["Capital of France?"]


def ask_all_at_once(server, prompts, max_tokens=8):
    """Each prompt from its own openai client, all at once; every other one streamed."""
    got = [None] * len(prompts)

    def ask(i):
        c = server.client()
        messages = [{"role": "user", "content": prompts[i]}]
        if i % 2:
            got[i] = "".join(ch.choices[0].delta.content or "" for ch in
                             c.chat.completions.create(model="paris", messages=messages, max_tokens=max_tokens, stream=True)
                             if ch.choices)
        else:
            got[i] = c.chat.completions.create(model="paris", messages=messages,
                                               max_tokens=max_tokens).choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    return got


def one_by_one(server, prompts, max_tokens=8):
    client = server.client()
    return [client.chat.completions.create(model="paris", messages=[{"role": "user", "content": p}],
                                           max_tokens=max_tokens).choices[0].message.content for p in prompts]


def test_sixteen_concurrent_clients_get_their_own_answers(server):
    expected = one_by_one(server, PROMPTS)
    got = ask_all_at_once(server, PROMPTS)
    assert got == expected and got[-1] == "Paris is the capital."


def test_llama_cpp_server_runs_concurrent_clients_with_the_torch_answers(server, adapter):
    pytest.importorskip("llama_cpp")
    expected = one_by_one(server, PROMPTS)
    llama = Server("--adapter-path", adapter, "--engine", "llama.cpp", "--gguf-type", "f32", "--parallel", "4")
    try:
        health = httpx.get(llama.url + "/health").json()
        assert health["engine"] == "llama.cpp" and health["slots"] == 4
        assert ask_all_at_once(llama, PROMPTS) == expected
        assert one_by_one(llama, PROMPTS[-1:]) == ["Paris is the capital."]
    finally:
        llama.stop()


def test_bad_requests_get_4xx_json_and_the_server_keeps_serving(server):
    client = server.client()
    raw = httpx.post(server.url + "/v1/chat/completions", content=b'{"model": "paris", "messages": [',
                     headers={"content-type": "application/json"})
    assert raw.status_code == 400 and "error" in raw.json()
    with pytest.raises(openai.NotFoundError, match="does not exist") as err:
        client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "hi"}])
    assert err.value.code == "model_not_found"
    for bad in (dict(temperature=5.0), dict(top_p=0.0), dict(max_tokens=0)):
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "hi"}], **bad)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "word " * 600}])
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="paris", messages=[])
    assert client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "Capital of France?"}]) \
        .choices[0].message.content == "Paris is the capital."
    schema = httpx.get(server.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"] and "/v1/completions" in schema["paths"]


def test_content_parts_and_the_developer_role_are_read_as_text(server):
    client = server.client()
    plain = client.chat.completions.create(model="paris", messages=[{"role": "user", "content": "Capital of France?"}])
    parts = client.chat.completions.create(model="paris", messages=[
        {"role": "user", "content": [{"type": "text", "text": "Capital of "}, {"type": "text", "text": "France?"}]}])
    assert parts.choices[0].message.content == plain.choices[0].message.content == "Paris is the capital."
    developer = client.chat.completions.create(model="paris", max_tokens=4, messages=[
        {"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Capital of France?"}])
    assert developer.choices[0].finish_reason in ("stop", "length")


def test_stream_usage_only_when_asked_in_a_last_chunk_without_choices(server):
    client = server.client()
    ask = dict(model="paris", messages=[{"role": "user", "content": "Capital of France?"}], stream=True)
    plain = list(client.chat.completions.create(**ask))
    assert all(c.usage is None for c in plain) and plain[-1].choices[0].finish_reason == "stop"
    counted = list(client.chat.completions.create(**ask, stream_options={"include_usage": True}))
    assert counted[-1].choices == [] and counted[-1].usage.completion_tokens > 0
    assert counted[-2].choices[0].finish_reason == "stop" and counted[-2].usage is None


def test_a_port_in_use_is_one_line_before_the_model_loads(tiny_llama):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        result = subprocess.run([sys.executable, "-m", "liandan", "serve", "--model", str(tiny_llama), "--port",
                                 str(busy.getsockname()[1])], capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "cannot listen on 127.0.0.1:" in result.stderr


def test_api_key_and_a_client_that_disconnects_frees_its_slot(tiny_llama):
    server = Server("--model", tiny_llama, "--api-key", "s3cret", "--model-name", "tiny")
    try:
        with pytest.raises(openai.AuthenticationError):
            server.client("wrong").models.list()
        assert httpx.get(server.url + "/v1/models").status_code == 401
        client = server.client("s3cret")
        # A long stream, abandoned after a few chunks: the server must stop generating for it.
        with httpx.stream("POST", server.url + "/v1/completions", headers={"Authorization": "Bearer s3cret"},
                          json={"model": "tiny", "prompt": "Once upon a time", "max_tokens": 100000, "stream": True},
                          timeout=60) as response:
            for i, _ in enumerate(response.iter_lines()):
                if i > 3:
                    break
        started = time.time()
        reply = client.completions.create(model="tiny", prompt="Hello", max_tokens=3)
        assert reply.choices[0].text is not None and time.time() - started < 5
    finally:
        server.stop()


def test_chat_repl_multi_turn_reset_exit(adapter):
    proc = subprocess.run([sys.executable, "-m", "liandan", "chat", "--adapter-path", str(adapter), "-m", "12"],
                          input="Capital of France?\nCapital of France?\n/reset\nCapital of France?\n/exit\nnever read\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("liandan chat")
    assert lines.count("Paris is the capital.") >= 2 and "(conversation reset)" in lines


def test_history_is_trimmed_to_the_context(llama_tokenizer):
    from liandan.chat import fit_history
    from liandan.data.render import Encoder, make_rendering

    encoder = Encoder(llama_tokenizer, make_rendering(llama_tokenizer))
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"question {i} " * 5}, {"role": "assistant", "content": "answer " * 5}]
    history.append({"role": "user", "content": "last question"})
    kept, ids = fit_history(encoder, history, context=200, max_tokens=50)
    assert len(ids) + 50 <= 200 and kept[-1]["content"] == "last question" and kept[0]["role"] == "user"
    assert len(kept) < len(history)
