import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import fixtures  # noqa: E402

# Converted models (the embedded one too) go to a cache owned by the tests, not the user's.
os.environ.setdefault("LIANDAN_CACHE", str(fixtures.CACHE / "liandan"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

REPO = Path(__file__).resolve().parent.parent
JOKES = REPO / "liandan" / "examples" / "jokes"


@pytest.fixture(scope="session")
def tiny_llama():
    return fixtures.tiny_llama()


@pytest.fixture(scope="session")
def tiny_llama_calm():
    return fixtures.tiny_llama_calm()


@pytest.fixture(scope="session")
def tiny_llama_k():
    return fixtures.tiny_llama_k()


@pytest.fixture(scope="session")
def tiny_qwen2():
    return fixtures.tiny_qwen2()


@pytest.fixture(scope="session")
def llama_tokenizer(tiny_llama):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama)


@pytest.fixture(scope="session")
def qwen_tokenizer(tiny_qwen2):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_qwen2)


def write_jsonl(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path


def liandan(*args, cwd=None, timeout=600, input=None):
    """Run the real CLI in a subprocess (`input`: its stdin); returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "liandan", *map(str, args)], cwd=cwd, capture_output=True, input=input,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def pytest_collection_modifyitems(config, items):
    """With LIANDAN_REQUIRE_ALL=1 (CI), a missing llama.cpp, Go or browser fails the run instead of skipping checks.
    Tests marked `unverified` (end-to-end tests written but not yet run to completion on a quiet machine) run only
    with LIANDAN_RUN_UNVERIFIED=1, so that a test nobody has seen pass cannot sink a CI run; each issue's note says
    which they are."""
    if os.environ.get("LIANDAN_RUN_UNVERIFIED") != "1":
        skip = pytest.mark.skip(reason="not yet run to completion on a quiet machine: LIANDAN_RUN_UNVERIFIED=1 runs it")
        for item in items:
            if "unverified" in item.keywords:
                item.add_marker(skip)
    if os.environ.get("LIANDAN_REQUIRE_ALL") != "1":
        return
    import importlib.util
    import shutil

    import browser

    missing = [name for name, ok in (("llama-cpp-python", importlib.util.find_spec("llama_cpp")), ("go", shutil.which("go")))
               if not ok] + browser.missing()
    if missing:
        raise pytest.UsageError(f"LIANDAN_REQUIRE_ALL=1 but {', '.join(missing)} missing: run scripts/setup.sh --test")


@pytest.fixture(scope="session")
def all_templates_tokenizer():
    """One tokenizer for every real chat template (tests set its chat_template): tokenization only."""
    return fixtures.all_templates_tokenizer()


# Real chat templates the end-to-end tests train the embedded model under: (template name, BOS, EOS).
E2E_TEMPLATES = {
    "deepseek-r1-distill-qwen": ("deepseek-ai-DeepSeek-R1-Distill-Qwen-32B", "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"),
    "llama-3.1": ("meta-llama-Llama-3.1-8B-Instruct", "<|begin_of_text|>", "<|eot_id|>"),
    "gemma-2": ("google-gemma-2-2b-it", "<bos>", "<eos>"),
}


@pytest.fixture(scope="session")
def template_adapter(tmp_path_factory):
    """template_adapter(name) -> (model dir, adapter dir): the embedded model speaking a real chat template
    (E2E_TEMPLATES), fine-tuned on the seed's jokes with the demo's settings, replay off (it doubles the run and
    is not what these tests check). Trained once per session, on first use, so every test that needs it
    (training, GGUF, Ollama) shares one run."""
    made = {}

    def make(name: str):
        if name not in made:
            template_name, bos, eos = E2E_TEMPLATES[name]
            template = fixtures.real_templates()[template_name]
            model = fixtures.embedded_model_with_template(template_name, template, bos, eos, fixtures.CACHE / f"embedded-{name}")
            adapters = tmp_path_factory.mktemp(name) / "adapters"
            train = liandan("lora", "--model", model, "--train", "--data", JOKES, "--learning-rate", "1e-4",
                            "--batch-size", "2", "--iters", "200", "--replay-ratio", "0", "--adapter-path", adapters,
                            timeout=2700)
            assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-3000:]
            made[name] = (model, adapters)
        return made[name]

    return make


def one_line_error(result, *expected):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    for text in expected:
        assert text in result.stderr, result.stderr
