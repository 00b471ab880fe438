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


def liandan(*args, cwd=None, timeout=600):
    """Run the real CLI in a subprocess; returns CompletedProcess with text output."""
    return subprocess.run([sys.executable, "-m", "liandan", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, PYTHONUNBUFFERED="1"))


def pytest_collection_modifyitems(config, items):
    """With LIANDAN_REQUIRE_ALL=1 (CI), a missing llama.cpp or Go fails the run instead of skipping checks."""
    if os.environ.get("LIANDAN_REQUIRE_ALL") != "1":
        return
    import importlib.util
    import shutil

    missing = [name for name, ok in (("llama-cpp-python", importlib.util.find_spec("llama_cpp")), ("go", shutil.which("go")))
               if not ok]
    if missing:
        raise pytest.UsageError(f"LIANDAN_REQUIRE_ALL=1 but {', '.join(missing)} missing: run scripts/setup.sh --test")
