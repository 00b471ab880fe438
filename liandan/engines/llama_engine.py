"""The llama.cpp engine, through llama-cpp-python's thin wrappers of the C API.

One llama_model (the cached GGUF, plus the adapter's LoRA GGUF applied to every context) and `slots`
llama_contexts over it: each context holds one sequence's KV cache, and llama.cpp's C calls release
the GIL, so `slots` generations run at once. A context keeps the tokens it last saw and reuses their
KV cache for the common prefix of the next prompt (a chat's earlier turns, a repeated system prompt).

Sampling and stopping are liandan's own (generate.sample_next, the trained stop ids): the engines
differ only in the arithmetic that produces the logits.
"""

from __future__ import annotations

import ctypes
import os
import queue
import sys
import threading
import time

from liandan.engines import DEFAULT_GGUF_TYPE, Engine, Sampling, llama_model_params, require_llama_cpp
from liandan.errors import LiandanError

BATCH = 512  # prompt tokens per llama_decode call
CLOSE_WAIT = 30.0  # seconds close() waits for running generations to hand their slots back


class LlamaEngine(Engine):
    kind = "llama.cpp"

    def __init__(self, pipe, gguf_type: str = DEFAULT_GGUF_TYPE, slots: int = 1, ctx_size: int | None = None):
        super().__init__(pipe, ctx_size)
        self.slots = slots
        self.gguf_type = gguf_type
        self._load_where_it_fits()
        threads = max(1, cpu_count() // slots)
        self.free: queue.LifoQueue = queue.LifoQueue()  # last used first: its KV cache is the warmest
        self.made = 0  # slots created: close() frees them all, once every one is back in `free`
        self.closing = threading.Event()
        try:
            for _ in range(slots):
                self.free.put(_Slot(self.model, self.lora, self.context, threads, exact=gguf_type == "f32"))
                self.made += 1
        except ValueError:  # llama.cpp could not allocate a context (its KV cache)
            self.close()
            raise LiandanError(f"llama.cpp could not allocate {slots} context(s) of {self.context} tokens; "
                               "lower --ctx-size (or --parallel)") from None

    def _load_where_it_fits(self) -> None:
        """Every layer on the GPU of a CUDA or Metal build of llama.cpp, on the CPU when the model does not fit
        there; a cached file that parses but llama.cpp still refuses is converted again, once."""
        llama_cpp = require_llama_cpp()
        on_gpu = (True, False) if llama_cpp.llama_supports_gpu_offload() else (False,)
        for rebuild in (False, True):
            for gpu in on_gpu:
                try:
                    self._load(rebuild=rebuild and gpu == on_gpu[0], gpu=gpu)
                except ValueError:
                    continue
                if gpu != on_gpu[0]:
                    print("Note: llama.cpp could not load the model on the GPU (too little free memory?); it runs on the CPU",
                          file=sys.stderr)
                return
        raise LiandanError(f"llama.cpp cannot load {self.pipe.gguf_file or 'the converted GGUF'} (a GGUF version or "
                           "architecture this llama.cpp does not know?); try --engine torch")

    def _load(self, rebuild: bool, gpu: bool) -> None:
        from liandan.engines.gguf_cache import engine_ggufs

        llama_cpp = require_llama_cpp()
        from llama_cpp import _internals
        from llama_cpp._logger import set_verbose

        set_verbose(False)
        llama_cpp.llama_backend_init()
        model_path, lora_path = engine_ggufs(self.pipe, self.gguf_type, rebuild)
        params = llama_model_params(llama_cpp)
        if not gpu:  # else llama.cpp's own default: every layer on the GPU (-1) in the version setup.sh installs
            params.n_gpu_layers = 0
        self.model = _internals.LlamaModel(path_model=str(model_path), params=params, verbose=False)
        self.lora = None
        if lora_path is not None:
            self.lora = llama_cpp.llama_adapter_lora_init(self.model.model, str(lora_path).encode())
            if not self.lora:
                self.model.close()
                raise ValueError(f"llama.cpp cannot load the LoRA GGUF {lora_path}")
        if self.model.n_vocab() < len(self.pipe.tokenizer):
            fix = "check that it is the model you meant" if self.pipe.gguf_file else "delete the file to convert it again"
            raise LiandanError(f"{model_path}: {self.model.n_vocab()} tokens in the GGUF, "
                               f"{len(self.pipe.tokenizer)} in the tokenizer; {fix}")

    def stream(self, prompt_ids, max_tokens, sampling: Sampling, result=None, give_up=None):
        import torch

        from liandan.generate import GenerationResult, make_generator, sample_next

        result = result if result is not None else GenerationResult()
        result.prompt_tokens = len(prompt_ids)
        max_tokens = self.budget(prompt_ids, max_tokens)  # an empty prompt would sample the slot's last logits
        generator = make_generator(sampling.temp, sampling.seed)
        stop_ids = set(self.pipe.stop_ids)
        slot = self._take_slot()
        try:
            if give_up is not None and give_up():
                return
            start = time.perf_counter()
            logits = slot.prefill(prompt_ids)
            result.prompt_seconds = time.perf_counter() - start
            start = time.perf_counter()
            for _ in range(max_tokens):
                if self.closing.is_set():
                    raise LiandanError("the llama.cpp engine is shutting down")
                token = sample_next(torch.from_numpy(logits), sampling.temp, sampling.top_p, sampling.min_p, generator)
                if token in stop_ids:
                    result.stopped = True
                    break
                result.tokens.append(token)
                yield token
                logits = slot.append(token)
            result.generation_seconds = time.perf_counter() - start
        finally:
            self.free.put(slot)

    def _take_slot(self) -> "_Slot":
        while not self.closing.is_set():
            try:
                return self.free.get(timeout=0.1)
            except queue.Empty:
                pass
        raise LiandanError("the llama.cpp engine is shutting down")

    def close(self, wait: float = CLOSE_WAIT) -> None:
        """Stop the generations (each at its next token), wait for their slots, then free the contexts and
        the model. A generation is a thread that may still be inside llama_decode when the server stops (a
        forced Ctrl-C): freeing the model under it would crash the process, so if a slot is not back in time
        the memory is left to the process's exit instead."""
        llama_cpp = require_llama_cpp()
        if self.closing.is_set():  # closed already (or closing in another thread)
            return
        self.closing.set()
        deadline = time.monotonic() + wait
        slots = []
        try:
            while len(slots) < self.made:
                slots.append(self.free.get(timeout=max(0.0, deadline - time.monotonic())))
        except queue.Empty:
            return
        for slot in slots:
            slot.close()
        if self.lora:
            llama_cpp.llama_adapter_lora_free(self.lora)
            self.lora = None
        self.model.close()


class _Slot:
    """One llama_context (one sequence's KV cache) and the tokens it holds."""

    def __init__(self, model, lora, n_ctx: int, threads: int, exact: bool):
        import llama_cpp
        from llama_cpp import _internals

        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_ctx
        params.n_batch = params.n_ubatch = min(BATCH, n_ctx)
        params.n_threads = params.n_threads_batch = threads
        params.n_seq_max = 1
        params.no_perf = True
        if exact:  # an f32 GGUF promises PyTorch's numbers: an f16 KV cache alone costs ~1e-3 of relative error
            params.type_k = params.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = _internals.LlamaContext(model=model, params=params, verbose=False)
        if lora:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            if llama_cpp.llama_set_adapters_lora(self.ctx.ctx, adapters, 1, (ctypes.c_float * 1)(1.0)):
                raise ValueError("llama.cpp cannot apply the LoRA adapter")
        self.n_batch = params.n_batch
        self.batch = _internals.LlamaBatch(n_tokens=self.n_batch, embd=0, n_seq_max=1, verbose=False)
        self.n_vocab = model.n_vocab()
        self.cached: list[int] = []

    def prefill(self, tokens: list[int]):
        """Logits after `tokens`, reusing the KV cache of their common prefix with the last sequence."""
        keep = 0
        limit = min(len(self.cached), len(tokens) - 1)  # at least one token is decoded, for its logits
        while keep < limit and self.cached[keep] == tokens[keep]:
            keep += 1
        if not self.ctx.kv_cache_seq_rm(0, keep, -1):  # some caches cannot drop a suffix: start over
            self.ctx.kv_cache_clear()
            keep = 0
        del self.cached[keep:]
        return self._decode(tokens[keep:])

    def append(self, token: int):
        return self._decode([token])

    def _decode(self, tokens: list[int]):
        import numpy as np

        try:
            for i in range(0, len(tokens), self.n_batch):
                chunk = tokens[i : i + self.n_batch]
                self.batch.set_batch(chunk, n_past=len(self.cached), logits_all=False)
                self.ctx.decode(self.batch)
                self.cached.extend(chunk)
        except Exception:
            self.ctx.kv_cache_clear()  # unknown state: the next prompt starts from an empty cache
            self.cached = []
            raise
        return np.ctypeslib.as_array(self.ctx.get_logits(), shape=(self.n_vocab,))

    def close(self) -> None:
        self.batch.close()
        self.ctx.close()


def cpu_count() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
