"""`liandan generate`: one prompt in, one completion out, rendered and stopped exactly as in training.

The decoding loop is written here rather than calling transformers' `generate` because we need
separate prompt/generation timings (the numbers mlx_lm.generate prints), token-by-token streaming
for chat/serve, and stop handling driven by the adapter's record.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from liandan.data.render import stop_token_ids
from liandan.device import peak_memory_gb
from liandan.errors import LiandanError


# ---------------------------------------------------------------- sampling
def sample_next(logits: torch.Tensor, temp: float, top_p: float, min_p: float, generator) -> int:
    """Pick the next token from 1-D logits: greedy at temp 0, else temperature + min-p + top-p."""
    if temp <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temp, dim=-1)
    if min_p > 0:
        probs = torch.where(probs < min_p * probs.max(), torch.zeros_like(probs), probs)
    if 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=generator))


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended on a stop token (not on the token budget)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


def stream(model, prompt_ids: list[int], max_tokens: int, stop_ids, device, temp: float = 0.0,
           top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, result: GenerationResult | None = None):
    """Yield generated token ids one at a time (stop tokens are not yielded); fill `result` on the way."""
    result = result if result is not None else GenerationResult()
    result.prompt_tokens = len(prompt_ids)
    generator = None
    if temp > 0:
        generator = torch.Generator(device="cpu")
        generator.manual_seed(seed if seed is not None else int(time.time_ns() % 2**31))
    stop_ids = set(stop_ids)
    cache_arg = _cache_arg(model)
    with torch.inference_mode():
        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = _cache_of(out)
        result.prompt_seconds = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(max_tokens):
            token = sample_next(out.logits[0, -1].to("cpu"), temp, top_p, min_p, generator)
            if token in stop_ids:
                result.stopped = True
                break
            result.tokens.append(token)
            yield token
            out = model(input_ids=torch.tensor([[token]], device=device), use_cache=True, **{cache_arg: past})
            past = _cache_of(out)
        result.generation_seconds = time.perf_counter() - start


def _cache_arg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; the old name warns until it is removed."""
    from liandan.models import unwrap

    base = unwrap(model)
    return "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"


def _cache_of(out):
    return out.get("cache", None) if out.get("cache", None) is not None else out.get("past_key_values", None)


def generate(model, prompt_ids, max_tokens, stop_ids, device, **sampling) -> GenerationResult:
    result = GenerationResult()
    for _ in stream(model, prompt_ids, max_tokens, stop_ids, device, result=result, **sampling):
        pass
    return result


class TextStreamer:
    """Turns token ids into text increments, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.printed = 0

    def add(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=False)
        if text.endswith("\ufffd"):
            return ""
        new, self.printed = text[self.printed:], len(text)
        return new


# ---------------------------------------------------------------- loading
@dataclass
class Pipeline:
    """A model ready for inference, with the rendering it was trained with."""

    model: object
    tokenizer: object
    encoder: object
    stop_ids: list[int]
    device: object
    record: dict


def load_pipeline(model_spec: str | None, adapter_path: str | None, system_prompt: str | None = None,
                  extra_eos: list[str] | None = None, dtype: str | None = None,
                  trust_remote_code: bool = False) -> Pipeline:
    from liandan.adapters import load_adapter, read_record
    from liandan.data.render import Encoder, rendering_of
    from liandan.models import load_model, pick_device, resolve_model

    record = read_record(Path(adapter_path)) if adapter_path else {}
    if model_spec is None and record.get("base_model"):
        model_spec = record["base_model"]  # the adapter knows its base model
    device = pick_device(dtype)
    model_dir = resolve_model(model_spec)
    if not adapter_path:
        record = read_record(model_dir, required=False)  # a fused model keeps its training-time rendering
    model, tokenizer = load_model(model_dir, device, trust_remote_code)
    if adapter_path:
        model = load_adapter(model, Path(adapter_path), record)
    rendering = rendering_of(record, tokenizer, system_prompt)
    encoder = Encoder(tokenizer, rendering)
    return Pipeline(model, tokenizer, encoder, stop_token_ids(tokenizer, model, rendering, extra_eos), device, record)


def prompt_ids_for(pipe: Pipeline, prompt: str, ignore_chat_template: bool = False) -> list[int]:
    """Render a user prompt the way the model was trained (chat template), or raw."""
    if ignore_chat_template or pipe.encoder.rendering.prompt_style == "raw":
        return pipe.tokenizer(prompt, add_special_tokens=True)["input_ids"]
    return pipe.encoder.prompt_ids([{"role": "user", "content": prompt}])


# ---------------------------------------------------------------- CLI
def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--model", help="Model directory, .gguf file, Hub id, or 'smollm2-135m' (default; "
                        "with --adapter-path, the adapter's base model)")
    parser.add_argument("--adapter-path", help="Adapter directory written by `liandan lora`")
    parser.add_argument("--prompt", "-p", default="hello", help="Message to the model ('-' reads stdin)")
    parser.add_argument("--max-tokens", "-m", type=int, default=100, help="Maximum number of tokens to generate")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (0 = greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--extra-eos-token", nargs="+", default=[], help="More tokens that stop generation")
    parser.add_argument("--system-prompt", default=None, help="System prompt (default: the one used in training)")
    parser.add_argument("--ignore-chat-template", action="store_true", help="Use the raw prompt without the chat template")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on CUDA)")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model directory")
    return parser


def main(args: argparse.Namespace) -> int:
    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    if args.max_tokens <= 0:
        raise LiandanError(f"--max-tokens must be positive, got {args.max_tokens}")
    pipe = load_pipeline(args.model, args.adapter_path, args.system_prompt, args.extra_eos_token, args.dtype,
                         args.trust_remote_code)
    ids = prompt_ids_for(pipe, prompt, args.ignore_chat_template)
    result = GenerationResult()
    text = TextStreamer(pipe.tokenizer)
    print("==========", flush=True)
    for token in stream(pipe.model, ids, args.max_tokens, pipe.stop_ids, pipe.device.torch_device, args.temp,
                        args.top_p, args.min_p, args.seed, result):
        print(text.add(token), end="", flush=True)
    print("\n==========")
    n = len(result.tokens) + (1 if result.stopped else 0)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tokens / max(result.prompt_seconds, 1e-9):.3f} tokens-per-sec")
    print(f"Generation: {n} tokens, {n / max(result.generation_seconds, 1e-9):.3f} tokens-per-sec")
    print(f"Peak memory: {peak_memory_gb():.3f} GB")
    return 0
