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

from liandan.data.render import CHAT_TEMPLATE_HELP, stop_token_ids
from liandan.device import DTYPE_HELP, peak_memory_gb
from liandan.docs.prompt import TOP_K_HELP
from liandan.errors import LiandanError
from liandan.models import DEFAULT_MODEL
from liandan.reasoning import ShownAnswer, splitter_for


# ---------------------------------------------------------------- sampling
# Below this temperature, sampling is greedy: dividing fp32 logits by a smaller number overflows to inf.
MIN_TEMP = 1e-6


def sample_next(logits: torch.Tensor, temp: float, top_p: float, min_p: float, generator) -> int:
    """Pick the next token from 1-D logits: greedy at temp 0, else temperature + min-p + top-p.

    The most likely token always survives the min-p and top-p cuts, so no combination of values
    (a top_p of 1e-300 rounds to 0 in fp32) can leave an all-zero distribution.
    """
    if temp < MIN_TEMP:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / temp, dim=-1)
    if min_p > 0:
        probs = torch.where(probs < min_p * probs.max(), torch.zeros_like(probs), probs)
    if 0 < top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < top_p
        keep[0] = True
        sorted_probs = torch.where(keep, sorted_probs, torch.zeros_like(sorted_probs))
        probs = torch.zeros_like(probs).scatter(0, order, sorted_probs)
    total = probs.sum()
    if not torch.isfinite(total) or total <= 0:
        return int(torch.argmax(logits))
    return int(torch.multinomial(probs / total, 1, generator=generator))


def make_generator(temp: float, seed: int | None):
    """The sampling PRNG (None when greedy); seeds are taken modulo 2**63, the range torch accepts."""
    if temp < MIN_TEMP:
        return None
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed % 2**63 if seed is not None else time.time_ns() % 2**31)
    return generator


@dataclass
class GenerationResult:
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended on a stop token (not on the token budget)
    prompt_tokens: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0


def require_prompt(prompt_ids: list[int]) -> None:
    """Every engine's first check: a model needs at least one token to continue from."""
    if not prompt_ids:
        raise LiandanError("the prompt is empty: there is no token to continue from")


def stream(model, prompt_ids: list[int], max_tokens: int, stop_ids, device, temp: float = 0.0,
           top_p: float = 1.0, min_p: float = 0.0, seed: int | None = None, result: GenerationResult | None = None):
    """Yield generated token ids one at a time (stop tokens are not yielded); fill `result` on the way."""
    result = result if result is not None else GenerationResult()
    result.prompt_tokens = len(prompt_ids)
    require_prompt(prompt_ids)
    generator = make_generator(temp, seed)
    stop_ids = set(stop_ids)
    cache_arg = _cache_arg(model)
    with torch.inference_mode():
        start = time.perf_counter()
        ids = torch.tensor([prompt_ids], device=device)
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        past = _cache_of(out)
        if ids.device.type == "cuda":  # GPU kernels run asynchronously: wait for the prompt's before timing it
            torch.cuda.synchronize(ids.device)
        elif ids.device.type == "mps":
            torch.mps.synchronize()
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
    """A model ready for inference, with the rendering it was trained with (model is None when only
    the rendering was loaded, for an engine that runs its own copy of the weights)."""

    model: object
    tokenizer: object
    encoder: object
    stop_ids: list[int]
    device: object
    record: dict
    model_dir: Path | None = None
    adapter_path: Path | None = None
    gguf_file: Path | None = None  # the user's own .gguf when --model named one: llama.cpp runs it as it is


def load_pipeline(model_spec: str | None, adapter_path: str | None, system_prompt: str | None = None,
                  extra_eos: list[str] | None = None, dtype: str | None = None,
                  trust_remote_code: bool = False, load_weights: bool = True,
                  chat_template: str | None = None) -> Pipeline:
    from liandan.adapters import RECORD, base_model_of, load_adapter, read_record
    from liandan.data.render import Encoder, rendering_of
    from liandan.models import load_model, load_tokenizer, pick_device, resolve_model

    record = read_record(Path(adapter_path)) if adapter_path else {}
    model_spec = base_model_of(adapter_path, record, model_spec)  # the adapter knows its base model
    device = pick_device(dtype)
    model_dir = resolve_model(model_spec)
    if not adapter_path and (model_dir / RECORD).is_file():
        record = read_record(model_dir)  # a fused model keeps its training-time rendering
    if load_weights:
        model, tokenizer = load_model(model_dir, device, trust_remote_code)
        if adapter_path:
            model = load_adapter(model, Path(adapter_path), record)
        eos_source = model
    else:
        model, tokenizer = None, load_tokenizer(model_dir, trust_remote_code)
        eos_source = _generation_config_holder(model_dir)
    rendering = rendering_of(record, tokenizer, system_prompt, chat_template)
    encoder = Encoder(tokenizer, rendering)
    stops = stop_token_ids(tokenizer, eos_source, rendering, extra_eos)
    given = Path(model_spec).expanduser() if model_spec else None
    return Pipeline(model, tokenizer, encoder, stops, device, record, model_dir,
                    Path(adapter_path) if adapter_path else None,
                    given if given and given.suffix.lower() == ".gguf" and given.is_file() else None)


def _generation_config_holder(model_dir: Path):
    """Something with the model's `generation_config` (for its EOS ids) without loading the weights."""
    from types import SimpleNamespace

    from transformers import GenerationConfig

    try:
        return SimpleNamespace(generation_config=GenerationConfig.from_pretrained(str(model_dir)))
    except (OSError, ValueError):  # no generation_config.json: the tokenizer's EOS is the model's
        return SimpleNamespace(generation_config=None)


def context_size(pipe: Pipeline) -> int:
    """The one context-window rule: the model's max_position_embeddings, else the tokenizer's limit, else 2048."""
    config = getattr(pipe.model, "config", None)
    config = config.to_dict() if config is not None else {}
    if not config and pipe.model_dir is not None and (pipe.model_dir / "config.json").is_file():
        import json

        config = json.loads((pipe.model_dir / "config.json").read_text(encoding="utf-8"))
    positions = config.get("text_config", config).get("max_position_embeddings")
    if positions:
        return int(positions)
    limit = getattr(pipe.tokenizer, "model_max_length", None)
    return int(limit) if limit and limit < 10**7 else 2048  # transformers uses ~1e30 for "no limit"


def prompt_ids_for(pipe: Pipeline, prompt: str | list[dict], ignore_chat_template: bool = False) -> list[int]:
    """Render a user prompt (or messages: --docs may add a system turn) the way the model was trained, or raw."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if ignore_chat_template or pipe.encoder.rendering.prompt_style == "raw":
        return pipe.tokenizer("\n\n".join(m["content"] for m in messages), add_special_tokens=True)["input_ids"]
    return pipe.encoder.prompt_ids(messages)


# ---------------------------------------------------------------- CLI
def add_inference_args(parser: argparse.ArgumentParser, max_tokens: int) -> argparse.ArgumentParser:
    """The options generate, chat and serve share: model, adapter, rendering, sampling, engine."""
    from liandan.engines import DEFAULT_GGUF_TYPE, ENGINES, GGUF_TYPES, LLAMA_DEFAULT_CTX, LLAMA_INSTALL

    parser.add_argument("--model", help=f"Model directory, .gguf file, Hub id, or '{DEFAULT_MODEL}' (default; "
                        "with --adapter-path, the adapter's base model)")
    parser.add_argument("--adapter-path", help="Adapter directory written by `liandan lora`")
    parser.add_argument("--system-prompt", default=None, help="System prompt (default: the one used in training)")
    parser.add_argument("--max-tokens", "-m", type=int, default=max_tokens,
                        help=f"Maximum number of tokens to generate (default {max_tokens})")
    parser.add_argument("--temp", type=float, default=0.0, help="Sampling temperature (default 0: greedy)")
    parser.add_argument("--top-p", type=float, default=1.0, help="Sampling top-p")
    parser.add_argument("--min-p", type=float, default=0.0, help="Sampling min-p")
    parser.add_argument("--seed", type=int, default=None, help="PRNG seed")
    parser.add_argument("--extra-eos-token", nargs="+", default=[], help="More tokens that stop generation")
    parser.add_argument("--chat-template", help=CHAT_TEMPLATE_HELP)
    parser.add_argument("--engine", choices=ENGINES, default="torch",
                        help=f"torch (default) or llama.cpp (needs `{LLAMA_INSTALL}`; the GGUFs "
                             "are converted once and cached)")
    parser.add_argument("--gguf-type", choices=GGUF_TYPES, default=DEFAULT_GGUF_TYPE,
                        help=f"With --engine llama.cpp: the tensor type a model directory is converted to (default "
                             f"{DEFAULT_GGUF_TYPE}); a .gguf file given as --model runs as it is")
    parser.add_argument("--ctx-size", type=int, default=None,
                        help="Context window in tokens, prompt and answer (default: the model's; with --engine "
                             f"llama.cpp at most {LLAMA_DEFAULT_CTX}, as its KV cache is allocated up front for every slot)")
    parser.add_argument("--dtype", default=None, help=f"With --engine torch: {DTYPE_HELP}")
    parser.add_argument("--trust-remote-code", action="store_true", help="Allow model code from the model directory")
    parser.add_argument("--docs", help="Answer from these documents: a folder (Markdown/text/HTML) or a `liandan docs index`")
    parser.add_argument("--top-k", type=int, default=None, help=TOP_K_HELP)
    return parser


def check_inference_args(args: argparse.Namespace) -> None:
    """Refuse out-of-range sampling options and undecodable text options before anything loads."""
    if args.max_tokens <= 0:
        raise LiandanError(f"--max-tokens must be positive, got {args.max_tokens}")
    if getattr(args, "ctx_size", None) is not None and args.ctx_size < 16:
        raise LiandanError(f"--ctx-size must be at least 16, got {args.ctx_size}")
    if not 0 <= args.temp <= 100:
        raise LiandanError(f"--temp must be between 0 and 100, got {args.temp}")
    if not 0 < args.top_p <= 1:
        raise LiandanError(f"--top-p must be in (0, 1], got {args.top_p}")
    if not 0 <= args.min_p < 1:
        raise LiandanError(f"--min-p must be in [0, 1), got {args.min_p}")
    texts = [("--system-prompt", args.system_prompt)] + [("--extra-eos-token", t) for t in args.extra_eos_token]
    for flag, text in texts:
        if text is not None:  # these reach the tokenizer, which fails on undecodable text with a TypeError
            check_text(text, flag)


def sampling_of(args: argparse.Namespace):
    from liandan.engines import Sampling

    return Sampling(args.temp, args.top_p, args.min_p, args.seed)


def build_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_inference_args(parser, max_tokens=100)
    parser.add_argument("--prompt", "-p", default="hello", help="Message to the model ('-' reads stdin)")
    parser.add_argument("--ignore-chat-template", action="store_true", help="Use the raw prompt without the chat template")
    parser.add_argument("--show-thinking", action="store_true",
                        help="Thinking models: also print the reasoning (before the answer); by default only the answer")
    return parser


def check_text(text: str, what: str) -> str:
    """`text` itself if it is Unicode text, else a one-line LiandanError naming `what`. Undecodable bytes (argv and
    stdin decode them with surrogateescape) and unpaired JSON "\\ud800" escapes become lone surrogates, which the
    tokenizer refuses with a TypeError; they are exactly the code points UTF-8 cannot encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise LiandanError(f"{what} is not UTF-8 text (at position {exc.start}): an undecodable byte or a lone "
                           "surrogate such as \\ud800") from None
    return text


def read_prompt(prompt: str) -> str:
    """-p TEXT, or stdin for "-": UTF-8 text, else one line."""
    if prompt == "-":  # surrogateescape: a bad byte becomes a surrogate that check_text places and refuses
        return check_text(sys.stdin.buffer.read().decode("utf-8", "surrogateescape"), "stdin: the prompt")
    return check_text(prompt, "-p: the prompt")


def main(args: argparse.Namespace) -> int:
    from liandan.engines import engine_from_args

    check_inference_args(args)
    prompt = read_prompt(args.prompt)
    engine = engine_from_args(args)
    sources = None
    if args.docs:
        from liandan.docs.prompt import DocsContext

        prompt, sources = DocsContext.open(args.docs, engine.pipe.record, args.top_k).apply(
            [{"role": "user", "content": prompt}])
    ids = prompt_ids_for(engine.pipe, prompt, args.ignore_chat_template)
    result = GenerationResult()
    text = TextStreamer(engine.pipe.tokenizer)
    show = ShownAnswer(None if args.ignore_chat_template else splitter_for(engine.pipe.encoder), args.show_thinking)
    print("==========", flush=True)
    for token in engine.stream(ids, args.max_tokens, sampling_of(args), result):
        show.feed(text.add(token))
    show.finish()
    print("\n==========")
    n = len(result.tokens) + (1 if result.stopped else 0)
    print(f"Prompt: {result.prompt_tokens} tokens, {result.prompt_tokens / max(result.prompt_seconds, 1e-9):.3f} tokens-per-sec")
    print(f"Generation: {n} tokens, {n / max(result.generation_seconds, 1e-9):.3f} tokens-per-sec")
    print(f"Peak memory: {peak_memory_gb('cpu' if engine.kind == 'llama.cpp' else None):.3f} GB")  # llama.cpp: no torch
    if not result.stopped and len(result.tokens) < args.max_tokens and len(ids) + len(result.tokens) >= engine.context:
        print(f"Note: the answer was cut at the end of the context ({engine.context} tokens, prompt included), "
              f"before -m {args.max_tokens}; see --ctx-size", file=sys.stderr)
    if sources is not None:
        from liandan.docs.prompt import describe_sources

        print(describe_sources(sources))
    return 0
