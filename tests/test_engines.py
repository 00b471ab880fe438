"""Inference engines: torch and llama.cpp give the same greedy tokens; the GGUF cache; sampling that cannot NaN."""

import os
import subprocess
import sys

import pytest
import torch
from conftest import liandan, write_jsonl

from liandan.errors import LiandanError


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        pytest.skip("llama-cpp-python is not installed (scripts/setup.sh --test installs it)")
    return llama_cpp


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory, tiny_llama):
    """A LoRA adapter on every layer of the tiny model, trained until it changes the greedy answers."""
    from liandan.config import load_config
    from liandan.lora import run

    root = tmp_path_factory.mktemp("engines")
    write_jsonl(root / "data" / "train.jsonl", [{"prompt": "Capital of France?", "completion": "Paris is the capital."}] * 2)
    run(load_config(None, dict(model=str(tiny_llama), train=True, data=str(root / "data"), iters=30, batch_size=2,
                               learning_rate=1e-2, num_layers=-1, replay_ratio=0, adapter_path=str(root / "lora"))),
        log=lambda *_: None)
    return root / "lora"


PROMPTS = ["Capital of France?", "Tell me a long story about rivers", "What is 2 plus 2?"]


def _greedy(engine, prompt, n=24):
    from liandan.engines import Sampling
    from liandan.generate import GenerationResult, prompt_ids_for

    result = GenerationResult()
    list(engine.stream(prompt_ids_for(engine.pipe, prompt), n, Sampling(), result))
    return result.tokens, result.stopped


def test_llama_cpp_greedy_tokens_equal_torch(tiny_llama, lora_adapter):
    """Base model alone, then base GGUF + LoRA GGUF: the same greedy tokens and stops as PyTorch."""
    _llama_cpp()
    from liandan.engines import load_engine

    answers = {}
    for model, adapter in ((str(tiny_llama), None), (None, str(lora_adapter))):
        torch_engine = load_engine("torch", model, adapter)
        expected = [_greedy(torch_engine, p) for p in PROMPTS]
        torch_engine.close()
        llama = load_engine("llama.cpp", model, adapter, gguf_type="f32")
        try:
            assert [_greedy(llama, p) for p in PROMPTS] == expected
            assert _greedy(llama, PROMPTS[0]) == expected[0]  # again, through the reused KV-cache prefix
        finally:
            llama.close()
        answers[adapter] = expected
    assert answers[None] != answers[str(lora_adapter)]  # the adapter changes the answers: it is applied


def test_gguf_cache_key_follows_adapter_content_and_rebuilds_corrupt_files(tiny_llama, lora_adapter, tmp_path):
    _llama_cpp()
    import shutil

    from liandan.engines import load_engine
    from liandan.engines.gguf_cache import content_hash, engine_ggufs, readable_gguf

    adapter = tmp_path / "copy"
    shutil.copytree(lora_adapter, adapter)
    llama = load_engine("llama.cpp", None, str(adapter), gguf_type="f32")
    base, lora = engine_ggufs(llama.pipe, "f32")
    expected = _greedy(llama, PROMPTS[0])
    llama.close()
    assert content_hash(adapter) in lora.name and readable_gguf(base) and readable_gguf(lora)
    # A damaged cache (a truncated base, garbage for the adapter) is rebuilt on the next load, with the same answers.
    base.write_bytes(base.read_bytes()[: base.stat().st_size // 2])
    lora.write_bytes(b"GGUF" + b"\0" * 64)
    assert not readable_gguf(base) and not readable_gguf(lora)
    llama = load_engine("llama.cpp", None, str(adapter), gguf_type="f32")
    try:
        assert _greedy(llama, PROMPTS[0]) == expected and readable_gguf(base) and readable_gguf(lora)
    finally:
        llama.close()
    # New weights in the same directory: a new key, not the stale file.
    from safetensors.torch import load_file, save_file

    weights = load_file(str(adapter / "adapter_model.safetensors"))
    save_file({k: v * 0.5 for k, v in weights.items()}, str(adapter / "adapter_model.safetensors"))
    assert content_hash(adapter) not in lora.name


def test_a_model_that_does_not_fit_the_gpu_runs_on_the_cpu_without_reconverting(tiny_llama, monkeypatch, capfd):
    """On a CUDA or Metal build, every layer goes to the GPU; when that load fails (a model larger than the GPU's
    memory), llama.cpp runs it on the CPU and says so, instead of deleting the cached GGUF and converting it again.
    Faked here: this machine's build has no GPU, so the "GPU" load is made to fail."""
    llama_cpp = _llama_cpp()
    from llama_cpp import _internals

    from liandan.engines import load_engine

    real = _internals.LlamaModel
    placements = []

    def model(path_model, params, verbose):
        placements.append(params.n_gpu_layers)
        if params.n_gpu_layers != 0:
            raise ValueError("Failed to load model from file")  # what llama.cpp reports when the GPU is too small
        return real(path_model=path_model, params=params, verbose=verbose)

    monkeypatch.setattr(llama_cpp, "llama_supports_gpu_offload", lambda: True)
    monkeypatch.setattr(_internals, "LlamaModel", model)
    llama = load_engine("llama.cpp", str(tiny_llama), None, gguf_type="f32")
    try:
        assert _greedy(llama, PROMPTS[0])[0]
    finally:
        llama.close()
    assert placements == [-1, 0]  # llama.cpp's own default (all layers), then none
    err = capfd.readouterr().err
    assert "could not load the model on the GPU (too little free memory?); it runs on the CPU" in err and "rebuilding" not in err


def test_a_build_with_amx_loads_models_without_its_weight_layout(monkeypatch):
    """llama.cpp's AMX kernels crash on multi-token prompts on some Xeons (seen on a machine this project is built on): where
    the build has them, models load with the plain CPU layout; elsewhere llama.cpp's defaults stay."""
    llama_cpp = _llama_cpp()
    from liandan.engines import llama_model_params

    info = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | {} | OPENMP = 1 | REPACK = 1 | "
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info.format("AMX_INT8 = 1").encode())
    assert llama_model_params(llama_cpp).use_extra_bufts is False
    monkeypatch.setattr(llama_cpp, "llama_print_system_info", lambda: info.format("AVX512_BF16 = 1").encode())
    assert llama_model_params(llama_cpp).use_extra_bufts is True


def test_a_gguf_given_as_model_runs_as_it_is(tiny_llama, lora_adapter, tmp_path, monkeypatch):
    """A q4_k_m (here q8_0) file of the user's is what llama.cpp runs: not dequantized and requantized."""
    _llama_cpp()
    from liandan.engines import load_engine
    from liandan.engines.gguf_cache import engine_ggufs
    from liandan.export.gguf import export_gguf

    monkeypatch.setenv("LIANDAN_CACHE", str(tmp_path / "cache"))
    own = tmp_path / "mine-q8_0.gguf"
    export_gguf(tiny_llama, own, "q8_0", log=lambda *_: None)
    before = own.stat().st_mtime_ns
    for adapter in (None, str(lora_adapter)):
        llama = load_engine("llama.cpp", str(own), adapter, gguf_type="f32")
        try:
            base, lora = engine_ggufs(llama.pipe, "f32")
            assert base == own and (lora is None) == (adapter is None)
            assert _greedy(llama, PROMPTS[0])[0]  # it answers
        finally:
            llama.close()
    assert own.stat().st_mtime_ns == before
    assert not list((tmp_path / "cache" / "gguf").glob("mine*"))  # no converted copy of the file


def test_generate_and_chat_cli_with_llama_cpp(lora_adapter):
    _llama_cpp()
    runs = [liandan("generate", "--engine", engine, "--gguf-type", "f32", "--adapter-path", lora_adapter, "-m", "12",
                    "-p", "Capital of France?") for engine in ("torch", "llama.cpp")]
    assert all(r.returncode == 0 for r in runs), runs[1].stderr
    answer = runs[0].stdout.splitlines()[1]
    assert runs[1].stdout.splitlines()[1] == answer
    proc = subprocess.run([sys.executable, "-m", "liandan", "chat", "--engine", "llama.cpp", "--gguf-type", "f32",
                           "--adapter-path", str(lora_adapter), "-m", "12", "--min-p", "0.05"],
                          input="Capital of France?\n/exit\n", capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[1] == answer


def test_missing_llama_cpp_is_one_line_with_the_install_command(tmp_path, tiny_llama):
    fake = tmp_path / "shadow" / "llama_cpp"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named llama_cpp')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(fake.parent), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "liandan", "generate", "--engine", "llama.cpp", "--model",
                           str(tiny_llama)], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "liandan: error: --engine llama.cpp needs llama-cpp-python: pip install 'liandan[llama]'"]


def test_sampling_never_yields_nan_and_takes_any_seed():
    from liandan.generate import make_generator, sample_next

    logits = torch.randn(1000) * 30
    best = int(torch.argmax(logits))
    for temp, top_p, min_p in ((2.0, 1e-300, 0.0), (1e-300, 0.5, 0.0), (2.0, 1.0, 0.999999), (100.0, 1e-45, 0.5)):
        token = sample_next(logits, temp, top_p, min_p, make_generator(temp, 2**70))
        assert 0 <= token < 1000
    assert sample_next(logits, 1e-300, 1.0, 0.0, make_generator(1e-300, None)) == best
    a, b = (sample_next(logits, 1.0, 0.9, 0.0, make_generator(1.0, 2**70 + 3)) for _ in range(2))
    assert a == b  # the seed is taken modulo 2**63, deterministically


def test_bad_engine_options_are_refused_before_loading():
    bad = liandan("generate", "--engine", "vllm")
    assert bad.returncode == 2 and "invalid choice: 'vllm'" in bad.stderr
    for flag, value, message in (("--top-p", "0", "--top-p must be in (0, 1]"), ("--min-p", "1.5", "--min-p must be"),
                                 ("--temp", "-1", "--temp must be between"), ("--ctx-size", "8", "--ctx-size must be")):
        proc = liandan("chat", flag, value, "--model", "/nonexistent")
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_context_size_rule(tiny_llama):
    from liandan.generate import context_size, load_pipeline

    pipe = load_pipeline(str(tiny_llama), None, load_weights=False)
    assert context_size(pipe) == 512
    from liandan.engines import Engine

    assert Engine(pipe).context == 512 and Engine(pipe, 4096).context == 512 and Engine(pipe, 100).context == 100
    with pytest.raises(LiandanError, match="no adapter found"):
        load_pipeline(None, "/nonexistent", load_weights=False)


def test_llama_cpp_close_waits_for_running_generations(tiny_llama):
    """Serve's shutdown closes the engine while generation threads may still decode: close() stops them at
    their next token and frees the model only once every slot is back (freeing it under a decode crashes)."""
    _llama_cpp()
    import threading

    from liandan.engines import Sampling, load_engine
    from liandan.generate import prompt_ids_for

    llama = load_engine("llama.cpp", str(tiny_llama), None, gguf_type="f32", slots=2)
    ids = prompt_ids_for(llama.pipe, PROMPTS[1])
    running = llama.stream(ids, 64, Sampling())
    next(running)  # one generation holds a slot, suspended between two tokens
    closer = threading.Thread(target=llama.close)
    closer.start()
    closer.join(0.5)
    assert closer.is_alive()  # waiting for that slot; the model is still there
    with pytest.raises(LiandanError, match="shutting down"):
        next(running)  # the generation resumes, stops at its next token and hands its slot back
    closer.join(10)
    assert not closer.is_alive()
    with pytest.raises(LiandanError, match="shutting down"):
        list(llama.stream(ids, 4, Sampling()))  # no new generation after close
    llama.close()  # twice is harmless

    stuck = load_engine("llama.cpp", str(tiny_llama), None, gguf_type="f32")
    held = stuck.stream(ids, 64, Sampling())
    next(held)
    stuck.close(wait=0.2)  # the slot never comes back in time: nothing is freed under it
    with pytest.raises(LiandanError, match="shutting down"):
        next(held)


def test_both_engines_keep_to_the_context_and_refuse_undecodable_prompts(tiny_llama):
    """--ctx-size holds for the torch engine as for llama.cpp: a prompt that fills it is one line, and the answer
    stops where the context ends; a prompt that is not UTF-8 (stdin or argv) is one line, not an internal error."""
    from liandan.engines import Sampling, load_engine
    from liandan.generate import GenerationResult

    engine = load_engine("torch", str(tiny_llama), None, ctx_size=20)
    with pytest.raises(LiandanError, match="the prompt has 25 tokens; the context is 20"):
        list(engine.stream(list(range(5, 30)), 8, Sampling()))
    result = GenerationResult()
    list(engine.stream(list(range(5, 20)), 50, Sampling(), result))
    assert len(result.tokens) + result.stopped <= 5  # 15 prompt tokens + at most 5 new ones
    given_up = GenerationResult()
    assert list(engine.stream(list(range(5, 20)), 5, Sampling(), given_up, give_up=lambda: True)) == []
    assert given_up.prompt_seconds == 0  # a request that gives up once its slot is free is not even prefilled
    long_prompt = liandan("generate", "--model", tiny_llama, "--ctx-size", "16", "-m", "30", "-p", "word " * 40)
    assert long_prompt.returncode == 2 and "the context is 16" in long_prompt.stderr, long_prompt.stderr
    cut = liandan("generate", "--model", tiny_llama, "--ctx-size", "40", "-m", "100", "-p", "hello there")
    assert cut.returncode == 0 and "Prompt: 32 tokens" in cut.stdout and "Generation: 8 tokens" in cut.stdout
    assert "Note: the answer was cut at the end of the context (40 tokens, prompt included), before -m 100" in cut.stderr
    piped = subprocess.run([sys.executable, "-m", "liandan", "generate", "--model", str(tiny_llama), "-p", "-"],
                           input=b"hi \xff\xfe there", capture_output=True, timeout=300)
    assert piped.returncode == 2 and b"stdin: the prompt is not UTF-8 text (at position 3)" in piped.stderr
    argv = subprocess.run([sys.executable, "-m", "liandan", "generate", "--model", str(tiny_llama), "-p", b"hi \xff"],
                          capture_output=True, timeout=300)
    assert argv.returncode == 2 and b"-p: the prompt is not UTF-8 text" in argv.stderr, argv.stderr
