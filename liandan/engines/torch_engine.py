"""The PyTorch engine: liandan's own decoding loop (generate.stream) on the transformers model."""

from __future__ import annotations

import threading

from liandan.engines import Engine, Sampling


class TorchEngine(Engine):
    """One generation at a time: on a CPU or one GPU, two decodes at once only split the same compute,
    and one model instance holds one KV cache per forward pass without batching code."""

    kind = "torch"
    slots = 1

    def __init__(self, pipe, ctx_size: int | None = None):
        super().__init__(pipe, ctx_size)
        self.lock = threading.Lock()

    def stream(self, prompt_ids, max_tokens, sampling: Sampling, result=None, give_up=None):
        from liandan.generate import stream

        max_tokens = self.budget(prompt_ids, max_tokens)
        with self.lock:
            if give_up is not None and give_up():
                return
            yield from stream(self.pipe.model, prompt_ids, max_tokens, self.pipe.stop_ids,
                              self.pipe.device.torch_device, sampling.temp, sampling.top_p, sampling.min_p,
                              sampling.seed, result)

    def close(self) -> None:
        import gc

        self.pipe.model = None
        gc.collect()
