"""The Chat tab: the fine-tuned model and its base model answering side by side, streamed.

Both are loaded the way `liandan chat` loads them (generate.load_pipeline), so prompts are rendered
with the training chat template and generation ends at the trained stop token.
"""

from __future__ import annotations

import threading
from pathlib import Path

_pipelines: dict[tuple, object] = {}
_lock = threading.Lock()  # one model load at a time; generations share the CPU anyway


def _stamp(adapter_dir: Path | None) -> tuple:
    """Size and time of the adapter's weights and record: a run saves new weights at every checkpoint, and a chat
    opened during training must not keep answering from the first ones it loaded."""
    from liandan.adapters import FULL_WEIGHTS, PEFT_WEIGHTS, RECORD

    if adapter_dir is None:
        return ()
    paths = [Path(adapter_dir) / name for name in (PEFT_WEIGHTS, FULL_WEIGHTS, RECORD)]
    return tuple((p.stat().st_size, p.stat().st_mtime_ns) for p in paths if p.is_file())


def pipeline(adapter_dir: Path | None, base: bool = False):
    """The adapter's pipeline, or (base=True) its base model with the same system prompt, cached until the
    adapter's files change."""
    from liandan.adapters import read_record
    from liandan.generate import load_pipeline

    record = read_record(Path(adapter_dir)) if adapter_dir else {}
    key = (str(adapter_dir), base, _stamp(adapter_dir) if not base else ())
    with _lock:
        if key not in _pipelines:
            for stale in [k for k in _pipelines if k[:2] == key[:2]]:  # older weights of this run: free them
                del _pipelines[stale]
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
    from liandan.generate import GenerationResult, TextStreamer, context_size, stream

    context = context_size(pipe)
    _, ids = fit_history(pipe.encoder, history, context, max_tokens)
    result, text, reply = GenerationResult(), TextStreamer(pipe.tokenizer), ""
    for token in stream(pipe.model, ids, max_tokens, pipe.stop_ids, pipe.device.torch_device, temp, result=result):
        reply += text.add(token)
        yield reply, False
    yield reply, result.stopped
