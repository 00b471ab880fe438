"""LoRA / DoRA / full fine-tuning set-up, and saving/loading adapters with their record.

On disk an adapter directory is PEFT's format (adapter_config.json + adapter_model.safetensors),
so PEFT, vLLM and llama.cpp's converter read it too, plus `liandan.json`: the base model, the exact
rendering used in training (chat template, stop tokens, system prompt) and the training options.
Full fine-tuning stores the changed tensors in `trained_weights.safetensors` instead.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from liandan.atomic import atomic_path, atomic_write_text
from liandan.config import TrainConfig
from liandan.data.render import Rendering
from liandan.errors import LiandanError
from liandan.models import unwrap

RECORD = "liandan.json"
FULL_WEIGHTS = "trained_weights.safetensors"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"


def decoder_layers(model) -> torch.nn.ModuleList:
    """The list of transformer blocks, whatever the architecture calls it."""
    base = unwrap(model)
    decoder = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", base)
    for name in ("layers", "h", "blocks"):
        layers = getattr(decoder, name, None)
        if isinstance(layers, torch.nn.ModuleList):
            return layers
    raise LiandanError(f"cannot find the transformer layers of {type(base).__name__}")


def _layer_prefix(model, index: int) -> str:
    layers = decoder_layers(model)
    for name, module in model.named_modules():
        if module is layers[index]:
            return name + "."
    raise LiandanError("cannot name the transformer layers")  # pragma: no cover


def selected_layers(model, num_layers: int) -> list[int]:
    total = len(decoder_layers(model))
    if num_layers == -1 or num_layers >= total:  # config.py has refused other values below 1
        return list(range(total))
    return list(range(total - num_layers, total))


def target_modules(model, cfg: TrainConfig) -> list[str]:
    """Full names of the linear layers to adapt: the last --num-layers blocks, filtered by lora_parameters.keys."""
    keys = cfg.lora_parameters.keys
    names = []
    for index in selected_layers(model, cfg.num_layers):
        prefix = _layer_prefix(model, index)
        for name, module in model.named_modules():
            if not name.startswith(prefix) or not isinstance(module, torch.nn.Linear):
                continue
            local = name[len(prefix):]
            if keys is None or any(local == k or local.endswith("." + k) or local.split(".")[-1] == k for k in keys):
                names.append(name)
    if not names:
        raise LiandanError(f"lora_parameters.keys {keys} matched no linear layer in the selected layers")
    return names


def setup_finetuning(model, cfg: TrainConfig):
    """Return the model ready to train (PEFT-wrapped for lora/dora) and a one-line summary."""
    total = sum(p.numel() for p in model.parameters())
    if cfg.fine_tune_type == "full":
        layers = decoder_layers(model)
        for index in selected_layers(model, cfg.num_layers):
            for p in layers[index].parameters():
                p.requires_grad_(True)
                # Mixed precision, as HF Trainer's bf16=True: the trained weights are kept in fp32 (the forward
                # pass still runs in bf16/fp16, under autocast: train.LossModule). Adam's steps at the
                # usual 1e-5 are below bf16's resolution for any weight above ~4e-3: trained in bf16 they barely move.
                p.data = p.data.float()
        trained = model
    else:
        from peft import LoraConfig, get_peft_model

        lp = cfg.lora_parameters
        config = LoraConfig(
            r=lp.rank,
            lora_alpha=lp.lora_alpha,
            lora_dropout=lp.dropout,
            target_modules=target_modules(model, cfg),
            use_dora=cfg.fine_tune_type == "dora",
            bias="none",
            task_type="CAUSAL_LM",
        )
        trained = get_peft_model(model, config)
    if cfg.grad_checkpoint:
        base = unwrap(trained)
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        base.config.use_cache = False
    n_train = sum(p.numel() for p in trained.parameters() if p.requires_grad)
    summary = f"Trainable parameters: {100 * n_train / total:.3f}% ({n_train / 1e6:.3f}M/{total / 1e6:.3f}M)"
    n_layers = len(decoder_layers(model))
    if cfg.num_layers > n_layers:  # liandan trains them all, and says so
        summary += f" (--num-layers {cfg.num_layers}: the model has {n_layers} layers, all trained)"
    return trained, summary


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_adapter_files(model, directory: Path, record: dict, weights: dict | None = None) -> None:
    """Write the adapter and its record, each file atomically; `weights` replaces the model's own
    trainable tensors (full fine-tuning gathered from FSDP shards)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if record["fine_tune_type"] == "full":
        with atomic_path(directory / FULL_WEIGHTS) as tmp:
            save_file(weights if weights is not None else trainable_state(model), str(tmp))
    else:
        from peft import get_peft_model_state_dict

        state = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
        with atomic_path(directory / PEFT_WEIGHTS) as tmp:
            save_file(state, str(tmp), metadata={"format": "pt"})
        with tempfile.TemporaryDirectory(dir=directory, prefix=".config.") as tmp:  # PEFT writes in place: swap it in
            model.peft_config["default"].save_pretrained(tmp)
            os.replace(Path(tmp) / PEFT_CONFIG, directory / PEFT_CONFIG)
    atomic_write_text(directory / RECORD, json.dumps(record, indent=2, ensure_ascii=False))


def holds_adapter(directory: Path) -> bool:
    """Whether a training run already left its adapter (or record) here: a new run must not replace it unasked."""
    return any((Path(directory) / name).exists() for name in (RECORD, PEFT_WEIGHTS, FULL_WEIGHTS))


def base_model_of(adapter_dir: Path, record: dict, given: str | None = None) -> str | None:
    """--model when given, else the base model the adapter's record names. A recorded folder that has moved
    is one line naming the record and the fix, not a bare "model not found"."""
    if given:  # an empty --model "$BASE" (BASE unset) is not given
        return given
    base = record.get("base_model")
    if base and os.path.isabs(base) and not os.path.exists(base):
        raise LiandanError(f"{Path(adapter_dir) / RECORD} names the base model {base}, which is not there any more; "
                           "pass --model with where it is now")
    return base


def read_record(directory: Path, required: bool = True) -> dict:
    """The record in an adapter or fused model directory; {} when there is none and `required` is False."""
    path = Path(directory) / RECORD
    if not path.is_file():
        if not required or (Path(directory) / PEFT_WEIGHTS).is_file():
            return {}  # a plain PEFT adapter from another tool: usable, without a rendering record
        raise LiandanError(f"--adapter-path {directory}: no adapter found (expected {RECORD} and {PEFT_WEIGHTS})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        where = f"{path}:{exc.lineno}" if isinstance(exc, json.JSONDecodeError) else str(path)
        raise LiandanError(f"{where}: invalid JSON: {getattr(exc, 'msg', exc)}") from None
    if not isinstance(record, dict):
        raise LiandanError(f"{path}: expected a JSON object (liandan's record of the adapter), got {type(record).__name__}")
    return record


def load_adapter(model, directory: Path, record: dict):
    """Apply a saved adapter to a freshly loaded base model, for inference."""
    directory = Path(directory)
    if record.get("fine_tune_type") == "full":
        state = load_file(str(directory / FULL_WEIGHTS))
        missing = set(state) - set(dict(model.named_parameters()))
        if missing:
            raise LiandanError(f"{directory / FULL_WEIGHTS} does not fit this base model (e.g. {sorted(missing)[0]})")
        model.load_state_dict(state, strict=False)
        return model
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(directory), is_trainable=False)
    except Exception as exc:  # PEFT's message is a header line, then the first mismatch, which says what is wrong
        said = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        base = record.get("base_model")
        raise LiandanError(f"cannot apply the adapter in {directory} to this model: {' '.join(said[:2])[:300]}"
                           + (f"; it was trained on {base}" if base else "")) from exc
    model.eval()
    return model


def load_weights_into(model, path: Path) -> None:
    """--resume-adapter-file (and --resume's checkpoint): start from saved weights, like mlx_lm. The file must fit
    this set-up exactly: a partial or foreign file would silently train from scratch or mix two runs."""
    from safetensors import SafetensorError

    path = Path(path)
    if path.is_dir():
        path = path / (FULL_WEIGHTS if (path / FULL_WEIGHTS).is_file() else PEFT_WEIGHTS)
    if not path.is_file():
        raise LiandanError(f"--resume-adapter-file {path}: file not found")
    try:
        state = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LiandanError(f"{path}: cannot read it as safetensors weights ({str(exc).splitlines()[0]})") from None
    try:
        if hasattr(model, "peft_config"):
            from peft import set_peft_model_state_dict

            result = set_peft_model_state_dict(model, state)
        else:
            result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # torch lists every size mismatch, one per line: the first one says enough
        lines = str(exc).splitlines() or [type(exc).__name__]
        first = next((line.strip() for line in lines if "size mismatch" in line), lines[0])
        raise LiandanError(f"{path}: does not fit this model ({first}); was it trained with another LoRA rank, "
                           "--num-layers or base model?") from None
    kind = "LoRA/DoRA" if hasattr(model, "peft_config") else "full fine-tuning"
    unexpected = list(result.unexpected_keys)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    missing = sorted(k for k in result.missing_keys if k in trainable)
    if len(unexpected) == len(state):
        example = f" (e.g. {unexpected[0]})" if unexpected else ""
        raise LiandanError(f"{path}: none of its {len(state)} tensors fits this {kind} set-up{example}; "
                           "check --fine-tune-type, --num-layers and the base model")
    if unexpected or missing:
        what = f"{len(unexpected)} tensor(s) this set-up lacks (e.g. {unexpected[0]})" if unexpected else \
            f"no weights for {len(missing)} trained tensor(s) (e.g. {missing[0]})"
        raise LiandanError(f"{path}: does not fit this {kind} set-up: it has {what}; check --fine-tune-type, "
                           "--num-layers, lora_parameters and the base model")


def make_record(cfg: TrainConfig, base_model: str, rendering: Rendering, iteration: int,
                docs_layout: dict | None = None, trained_dtype: str | None = None) -> dict:
    """docs_layout: the retrieval prompt layout of `data from-docs --questions` data (liandan.docs.prompt).
    trained_dtype: the precision the weights trained in ("float32"), which an unset --dtype leaves to the machine."""
    return {
        "liandan_version": __import__("liandan").__version__,
        "base_model": base_model,
        "fine_tune_type": cfg.fine_tune_type,
        "iteration": iteration,
        "rendering": rendering.to_dict(),
        "training": cfg.to_dict(),
        **({"docs_layout": docs_layout} if docs_layout else {}),
        **({"trained_dtype": trained_dtype} if trained_dtype else {}),
    }
