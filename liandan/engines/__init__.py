"""Inference engines behind one interface: prompt token ids + sampling + stop ids → a stream of token ids.

generate, chat and serve render prompts with liandan's own Encoder (the rendering recorded at
training time) and hand the token ids to an engine, so every engine sees the same tokens and stops
at the same trained stop tokens; only the arithmetic differs.

* torch: the PyTorch model (+ PEFT adapter), one generation at a time;
* llama.cpp: the base model's GGUF + the adapter's LoRA GGUF (or a fused GGUF for DoRA and full
  fine-tunes), converted once and cached; `slots` contexts generate concurrently.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Iterator

from liandan.errors import ContextExceeded, LiandanError

ENGINES = ("torch", "llama.cpp")
# The base model's tensor types --engine llama.cpp converts to on the fly (gguf-py writes them without a
# quantize pass); k-quants come from `liandan export gguf` and run with --model FILE.gguf.
GGUF_TYPES = ("f32", "f16", "q8_0")
DEFAULT_GGUF_TYPE = "q8_0"
LLAMA_INSTALL = "pip install 'liandan[llama]'"
# llama.cpp allocates every slot's whole KV cache up front: at a model's full 32k-128k positions that is GiBs per
# slot, so --engine llama.cpp uses at most this many unless --ctx-size asks for more (llama-server and Ollama
# default to a few thousand too). The torch engine's cache grows with the text, so it keeps the model's limit.
# `export ollama` writes the same cap as the Modelfile's num_ctx.
LLAMA_DEFAULT_CTX = 4096


def require_llama_cpp(purpose: str = "--engine llama.cpp"):
    """llama_cpp, or one line naming what needs it and the install command (the engine, k-quants, --check)."""
    try:
        import llama_cpp
    except ImportError:
        raise LiandanError(f"{purpose} needs llama-cpp-python: {LLAMA_INSTALL}") from None
    return llama_cpp


def llama_has_amx(llama_cpp) -> bool:
    """Whether this llama.cpp build has the AMX kernels (llama_model_params; scripts/setup.sh builds without)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


def llama_model_params(llama_cpp):
    """llama.cpp's default model parameters, less the AMX weight layout where the build compiled it in.

    llama.cpp's AMX matrix multiply (Intel Xeon since Sapphire Rapids, which a native build turns on) crashes
    the process on prompts of more than one token on some of these machines (llama.cpp issue 20824; seen here
    on a cloud Xeon VM, with every quantized GGUF): a crash no error handling can catch. Without the extra
    weight layouts llama.cpp uses its plain CPU kernels and runs; the cost is AMX's speed and that of the other
    extra layout, the weights repacked for the AVX2/AVX-512 kernels."""
    params = llama_cpp.llama_model_default_params()
    if llama_has_amx(llama_cpp):
        params.use_extra_bufts = False
    return params


@dataclass(frozen=True)
class Sampling:
    temp: float = 0.0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None


class Engine:
    """A loaded model that turns prompt ids into generated ids. `pipe` holds the tokenizer, the
    encoder (training-time rendering), the stop ids and the record; `slots` generations may run at once."""

    kind = "base"
    slots = 1

    def __init__(self, pipe, ctx_size: int | None = None):
        from liandan.generate import context_size

        self.pipe = pipe
        limit = context_size(pipe)  # may read config.json: once
        self.context = min(limit, ctx_size) if ctx_size else limit

    def budget(self, prompt_ids: list[int], max_tokens: int) -> int:
        """How many tokens may follow this prompt: at most max_tokens, and what the context has left after it."""
        from liandan.generate import require_prompt

        require_prompt(prompt_ids)
        if len(prompt_ids) >= self.context:
            raise ContextExceeded(f"the prompt has {len(prompt_ids)} tokens; the context is {self.context}")
        return min(max_tokens, self.context - len(prompt_ids))

    def stream(self, prompt_ids: list[int], max_tokens: int, sampling: Sampling, result=None,
               give_up=None) -> Iterator[int]:
        """Yield generated ids (stop tokens are not yielded); fill `result` (a GenerationResult) on the way.
        Closing the iterator early stops the generation and frees its slot. `give_up()`, asked once the slot is
        this request's (it may have waited in a queue), ends it there, before the prompt is read: nothing yielded."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def load_engine(kind: str, model: str | None, adapter_path: str | None, system_prompt: str | None = None,
                extra_eos: list[str] | None = None, dtype: str | None = None, trust_remote_code: bool = False,
                gguf_type: str = DEFAULT_GGUF_TYPE, slots: int = 1, chat_template: str | None = None,
                ctx_size: int | None = None) -> Engine:
    from liandan.generate import load_pipeline

    if kind not in ENGINES:
        raise LiandanError(f"--engine {kind}: expected one of {', '.join(ENGINES)}")
    if kind == "llama.cpp":
        from liandan.engines.llama_engine import LlamaEngine

        require_llama_cpp()  # before anything slow loads
        pipe = load_pipeline(model, adapter_path, system_prompt, extra_eos, None, trust_remote_code, load_weights=False,
                             chat_template=chat_template)
        return LlamaEngine(pipe, gguf_type, slots, ctx_size or LLAMA_DEFAULT_CTX)
    from liandan.engines.torch_engine import TorchEngine

    return TorchEngine(load_pipeline(model, adapter_path, system_prompt, extra_eos, dtype, trust_remote_code,
                                     chat_template=chat_template), ctx_size)


def engine_from_args(args: argparse.Namespace, slots: int = 1) -> Engine:
    """The engine `add_inference_args`' options describe."""
    return load_engine(args.engine, args.model, args.adapter_path, args.system_prompt, args.extra_eos_token,
                       args.dtype, args.trust_remote_code, args.gguf_type, slots, getattr(args, "chat_template", None),
                       getattr(args, "ctx_size", None))
