"""The Chat tab: the fine-tuned model and its base model answering side by side, streamed.

Both are loaded the way `liandan chat` loads them (generate.load_pipeline), so prompts are rendered
with the training chat template and generation ends at the trained stop token.
"""

from __future__ import annotations

import threading
from pathlib import Path

_pipelines: dict[tuple, object] = {}
_lock = threading.Lock()  # one model load at a time; generations share the CPU anyway


def pipeline(adapter_dir: Path | None, base: bool = False):
    """The adapter's pipeline, or (base=True) its base model with the same system prompt, cached."""
    from liandan.adapters import read_record
    from liandan.generate import load_pipeline

    record = read_record(Path(adapter_dir)) if adapter_dir else {}
    key = (str(adapter_dir), base)
    with _lock:
        if key not in _pipelines:
            if base:
                system = (record.get("rendering") or {}).get("system_prompt")
                _pipelines[key] = load_pipeline(record.get("base_model"), None, system)
            else:
                _pipelines[key] = load_pipeline(None, str(adapter_dir))
        return _pipelines[key]


def forget(adapter_dir: Path | None) -> None:
    """Drop cached pipelines of a run (its adapter changed: more training, or a new run of that name)."""
    for key in [k for k in _pipelines if k[0] == str(adapter_dir)]:
        del _pipelines[key]


def stop_tokens(pipe) -> list[str]:
    return list(pipe.encoder.rendering.stop_tokens)


def answer(pipe, history: list[dict], max_tokens: int = 256, temp: float = 0.0):
    """Yield (answer so far, stopped) while the model writes its reply to the conversation `history`."""
    from liandan.chat import fit_history
    from liandan.generate import GenerationResult, TextStreamer, stream

    context = int(getattr(pipe.model.config, "max_position_embeddings", 0) or 2048)
    _, ids = fit_history(pipe.encoder, history, context, max_tokens)
    result, text, reply = GenerationResult(), TextStreamer(pipe.tokenizer), ""
    for token in stream(pipe.model, ids, max_tokens, pipe.stop_ids, pipe.device.torch_device, temp, result=result):
        reply += text.add(token)
        yield reply, False
    yield reply, result.stopped
