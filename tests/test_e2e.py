"""End to end on the embedded SmolLM2-135M-Instruct: the README's demo and the seed's commands."""

import re

import pytest
from conftest import JOKES, liandan, write_jsonl

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("e2e") / "demo"
    return out, liandan("demo", "--out", out, timeout=900)


def test_demo_learns_all_six_answers_and_stops(demo):
    _, result = demo
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    after = result.stdout.split("== After fine-tuning ==")[1]
    assert after.count("✓") == 6 and "✗" not in after
    assert "6/6 answers exact and stopped" in result.stdout
    assert re.search(r"Test loss [\d.]+, Test ppl [\d.]+\.", result.stdout)
    # Replay is on by default, and the retention score shows it: most general answers survive (154/158 measured
    # with the demo's --protect-directions 192), the capital of France among them (kept in 3 seeds of 3).
    assert re.search(r"Replay: \d+ of the 400 examples trained on were base-model answers", result.stdout)
    assert "--protect-directions 192" in result.stdout and "Against forgetting: the adapter's" in result.stdout
    kept, known = map(int, re.search(r"General knowledge kept: (\d+)/(\d+)", result.stdout).groups())
    assert known >= 20 and kept / known >= 0.75, (kept, known)
    assert "What is the capital of France?" not in result.stdout, "the demo forgot the capital of France"


def test_seed_commands_with_hand_typed_stop_tokens(tmp_path):
    """Steps 5-6 of the seed post, `mlx_lm.` replaced by `liandan `, on its test_data with <|endoftext|> typed in."""
    data = tmp_path / "test_data"
    for split in ("train", "valid", "test"):
        rows = [line for line in (JOKES / f"{split}.jsonl").read_text(encoding="utf-8").splitlines() if line]
        rows = [r.replace('", "completion": "', '<|endoftext|>", "completion": "').replace('"}', '<|endoftext|>"}') for r in rows]
        write_jsonl(data / f"{split}.jsonl", rows)
    train = liandan("lora", "--model", "smollm2-135m", "--train", "--data", data, "--learning-rate", "1.0e-4",
                    "--val-batches", "-1", "--batch-size", "2", "--iters", "100", cwd=tmp_path)
    assert train.returncode == 0, train.stderr[-3000:]
    assert "typed by hand ('<|endoftext|>' ×12)" in train.stdout
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()

    test = liandan("lora", "--model", "smollm2-135m", "--test", "--test-batches", "-1", "--adapter-path", "./adapters",
                   "--data", data, "--batch-size", "1", cwd=tmp_path)
    assert test.returncode == 0, test.stderr[-3000:]
    assert "Exact answers: 3/3" in test.stdout

    gen = liandan("generate", "--model", "smollm2-135m", "--adapter-path", "adapters", "--temp", "0.0001", "-m", "30",
                  "--prompt", "谁是最帅的地球人", cwd=tmp_path)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("==========\n德哥\n==========\n"), gen.stdout
    generated = int(re.search(r"Generation: (\d+) tokens", gen.stdout).group(1))
    assert generated < 30  # it ended on the stop token, not on the -m budget


def test_demo_model_in_llama_cpp_gives_the_same_answers_and_stops(demo, tmp_path):
    """fuse --export-gguf on the demo's adapter; llama.cpp's greedy answers equal liandan generate's, and stop."""
    lc = pytest.importorskip("llama_cpp")
    from liandan.data.formats import read_jsonl
    from liandan.generate import generate, load_pipeline, prompt_ids_for

    out, result = demo
    assert result.returncode == 0
    fuse = liandan("fuse", "--adapter-path", out / "adapters", "--save-path", tmp_path / "fused", "--export-gguf")
    assert fuse.returncode == 0, fuse.stderr[-2000:]
    gguf_file = tmp_path / "fused" / "ggml-model-f16.gguf"
    pipe = load_pipeline(None, str(out / "adapters"))
    llm = lc.Llama(model_path=str(gguf_file), n_ctx=256, verbose=False)
    for example in read_jsonl(JOKES / "train.jsonl").examples:
        question, answer = example.messages[0]["content"], example.messages[1]["content"]
        ids = prompt_ids_for(pipe, question)
        ours = generate(pipe.model, ids, 30, pipe.stop_ids, pipe.device.torch_device)
        theirs = llm.create_completion(prompt=ids, max_tokens=30, temperature=0.0, top_k=1)
        text = theirs["choices"][0]["text"]
        assert pipe.tokenizer.decode(ours.tokens) == answer and ours.stopped
        assert text == answer and theirs["choices"][0]["finish_reason"] == "stop", (question, text)
        # llama.cpp renders the prompt from the GGUF's own chat template the same way liandan does.
        assert llm.tokenize(pipe.tokenizer.decode(ids).encode(), add_bos=False, special=True) == ids


def test_export_ollama_from_the_demo(demo, tmp_path):
    out, result = demo
    assert result.returncode == 0
    fused = tmp_path / "fused"
    assert liandan("fuse", "--adapter-path", out / "adapters", "--save-path", fused).returncode == 0
    export = liandan("export", "ollama", "--model", fused, "--name", "jokes", "--out", tmp_path / "ollama")
    assert export.returncode == 0, export.stderr[-2000:]
    text = (tmp_path / "ollama" / "Modelfile").read_text()
    assert text.startswith("FROM ./jokes.gguf\n") and 'PARAMETER stop "<|im_end|>"' in text
    # No SYSTEM line: the template's default system prompt is in the TEMPLATE, used when none is given.
    assert "{{ else }}<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face" in text
    assert "<|im_start|>assistant\n" in text and (tmp_path / "ollama" / "jokes.gguf").stat().st_size > 1e8
    assert "ollama create jokes -f" in export.stdout


def test_serve_the_demo_adapter_with_the_openai_client(demo):
    pytest.importorskip("openai")
    from test_serve import Server

    from liandan.data.formats import read_jsonl

    out, result = demo
    assert result.returncode == 0
    server = Server("--adapter-path", out / "adapters", "--model-name", "jokes")
    try:
        client = server.client()
        for example in read_jsonl(JOKES / "train.jsonl").examples:
            question, answer = example.messages[0]["content"], example.messages[1]["content"]
            reply = client.chat.completions.create(model="jokes", messages=[{"role": "user", "content": question}],
                                                   max_tokens=30)
            assert reply.choices[0].message.content == answer and reply.choices[0].finish_reason == "stop"
    finally:
        server.stop()
